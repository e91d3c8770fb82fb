#!/usr/bin/env bash
# Every GPU figure the fast paths still need measured, as one device call (~7 minutes on one H200).
#
#   bash benchmarks/gpu_session.sh [BASELINE_MODELS_DIR]
#
# Runs, from the repository root, with nothing but PyTorch:
#   1. gpu_bench.py with its compile cases (training, inference incl. the batch-1 row graphs,
#      dynamic savings), the goals' table;
#   2. graph_step_check.py: the graphed training step against the eager one;
#   3. with BASELINE_MODELS_DIR (an older models/, e.g. `git archive REV models | tar -x -C base`,
#      left untracked so that the device copy carries it): the training and inference sections
#      again on those models, so that both versions are timed by one script on one warm machine.
#
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu-session. SMOKE=1 runs every
# step at CPU smoke size (what the tests run). Each step has its own time limit, so one that hangs
# cannot take the rest with it; the exit status is the number of steps that failed.
set -uo pipefail

cd "$(dirname "$0")/.."
out=${OUT:-gpu-session}
baseline=${1:-}
py=${PYTHON:-python}
if [[ -n $baseline && ! -f $baseline/network.py ]]; then
    echo "gpu_session: $baseline has no network.py; pass a copy of an older models/ folder" \
         "(git archive REV models | tar -x -C DIR, then DIR/models)" >&2
    exit 2
fi
mkdir -p "$out"

smoke=()
bench_budget=300
baseline_budget=90
if [[ ${SMOKE:-0} == 1 ]]; then
    smoke=(--smoke --device cpu)
    bench_budget=60
    baseline_budget=30
fi

failed=0
step() {  # step NAME LIMIT_S ARGS...: run one python script, its output to NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $py $*"
    timeout "$limit" "$py" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    if [[ $rc != 0 ]]; then
        echo "!! $name exited with $rc"
        failed=$((failed + 1))
    fi
}

if [[ ${SMOKE:-0} != 1 ]]; then
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$out/nvidia-smi.txt"
fi
step gpu_bench $((bench_budget + 120)) benchmarks/gpu_bench.py "${smoke[@]}" \
    --time-budget "$bench_budget" --json "$out/gpu_bench.json"
if [[ ${SMOKE:-0} == 1 ]]; then
    step graph_step_check 120 benchmarks/graph_step_check.py --device cpu --steps 3 --size 64
else
    step graph_step_check 120 benchmarks/graph_step_check.py --steps 12 --size 384
fi
if [[ -n $baseline ]]; then
    step gpu_bench-baseline $((baseline_budget + 60)) benchmarks/gpu_bench.py "${smoke[@]}" \
        --models "$baseline" --no-compile --only train --only infer \
        --time-budget "$baseline_budget" --json "$out/gpu_bench-baseline.json"
fi
echo "== done ($(date -u +%H:%M:%S)): $failed step(s) failed; logs in $out"
exit "$failed"
