"""What does the search's shared start save? (platform/warm_start.py)

In one run, on a fresh synthetic Cityscapes set and one local Ray instance, it runs the same
budget study twice, trials one at a time, without MLflow: once with every trial trained from
scratch (`warm_start=False`) and once with the shared start. It prints, for both, the wall time
of the study, the training steps run (read back from the checkpoints), and the ratios beside the
expected ratio of training steps, (P + N·(I − P)) / (N·I) for N trials of I steps sharing P.

    python benchmarks/warm_start.py            # minutes on a 2-core CPU
    python benchmarks/warm_start.py --smoke    # seconds, for CI: runs, checks nothing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch


def study_steps(results: Path) -> int:
    """Training steps the study ran, from its runs' final checkpoints: a run that started from
    the shared prefix ran its last step minus the prefix's."""
    total = 0
    for run in sorted(p for p in (results / "trials").iterdir() if p.is_dir()):
        last = max(run.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        total += int(state["step"]) - int((state.get("warm_start") or {}).get("step", 0))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.trials, args.iterations, args.layers, args.base_channels = 2, 5, 4, 4

    import ray

    from dynroute.models import NetworkConfig
    from dynroute.pipelines.prepare import prepare
    from dynroute.pipelines.synth import synthesize
    from dynroute.platform.search.study import SearchSpec
    from dynroute.platform.search.tune import run_study
    from dynroute.platform.train.ray_train import init_ray
    from dynroute.platform.train.recipe import TrainConfig
    from dynroute.platform.train.spec import TrainSpec

    budget_start = 0.4
    with tempfile.TemporaryDirectory(prefix="dynroute-warm-bench-") as tmp:
        work = Path(tmp)
        synthesize("cityscapes", work / "raw", train=16, val=6, height=64, width=128, seed=5)
        prepare("cityscapes", work / "raw", work / "prepared", workers=1)
        base = TrainSpec(data=str(work / "prepared"),
                         model=NetworkConfig(layers=args.layers, base_channels=args.base_channels),
                         train=TrainConfig(iterations=args.iterations, batch_size=4,
                                crop=[64, 64], warmup_iterations=1,
                                budget_start=budget_start),
                         checkpoint_every=max(1, args.iterations // 4),
                         log_every=max(1, args.iterations // 4))
        init_ray(num_cpus=2)
        figures = {}
        try:
            for warm in (False, True):
                name = "warm" if warm else "cold"
                search = SearchSpec(
                    study=name, storage=str(work / name / "optuna.journal"),
                    results=str(work / name), num_samples=args.trials,
                    space={"train.lambda2": {"low": 0.05, "high": 1.5, "log": True},
                           "train.mu": {"low": 0.0, "high": 0.6}},
                    iterations=args.iterations, seed_budgets=("dynamic-a",), max_concurrent=1,
                    cost_resolution=(64, 128), warm_start=warm)
                started = time.perf_counter()
                document = json.loads(run_study(search, base).read_text())
                seconds = time.perf_counter() - started
                states = [t["state"] for t in document["trials"]]
                figures[name] = (seconds, study_steps(work / name), states)
                print(f"  {name}: {seconds:.1f} s, trials {states}", file=sys.stderr)
        finally:
            ray.shutdown()

    shared = math.floor(budget_start * args.iterations)
    n, i = args.trials, args.iterations
    expected = (shared + n * (i - shared)) / (n * i)
    (cold_s, cold_steps, _), (warm_s, warm_steps, _) = figures["cold"], figures["warm"]
    print(f"\nshared start: {n} trials of {i} steps, one at a time, L={args.layers}, "
          f"C0={args.base_channels}, batch 4, crop 64x64, budget_start {budget_start} "
          f"(shared {shared} steps), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; wall time includes each trial's evaluation and Ray's start of trials")
    print(f"{'study':<14}{'wall s':>9}{'train steps':>13}")
    print(f"{'from scratch':<14}{cold_s:>9.1f}{cold_steps:>13}")
    print(f"{'shared start':<14}{warm_s:>9.1f}{warm_steps:>13}")
    print(f"ratio shared / scratch: wall {warm_s / cold_s:.3f}, train steps "
          f"{warm_steps / cold_steps:.3f} (expected {expected:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
