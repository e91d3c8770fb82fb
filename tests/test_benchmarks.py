"""Benchmarks run in CI at smoke size only: they must run, their figures are read by people."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dynamic_inference_benchmark_runs_at_smoke_size():
    res = subprocess.run([sys.executable, "benchmarks/dynamic_inference.py", "--smoke"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for scenario in ("all-open", "no-up-down", "alternate-rows", "random-40"):
        assert scenario in res.stdout
    table = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:6]}
    assert float(table["all-open"][2]) == 1.0
    assert all(float(row[2]) < 1.0 for name, row in table.items() if name != "all-open")


def test_science_check_runs_at_smoke_size():
    res = subprocess.run([sys.executable, "benchmarks/science_check.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for row in ("dynamic-raw", "dynamic-a", "(b) budget", "(c) dynamic-a by scene kind"):
        assert row in res.stdout


def test_warm_start_benchmark_runs_at_smoke_size():
    res = subprocess.run([sys.executable, "benchmarks/warm_start.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("  ")[0]: line.split() for line in res.stdout.splitlines()}
    scratch, shared = int(rows["from scratch"][-1]), int(rows["shared start"][-1])
    assert (scratch, shared) == (2 * 5, 2 + 2 * 3), "2 trials of 5 steps sharing ⌊0.4·5⌋ = 2"


def _session(tmp_path, *args):
    env = os.environ | {"SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_session_runs_every_step_and_times_a_baseline_models_folder(tmp_path):
    baseline = tmp_path / "base" / "models"
    shutil.copytree(ROOT / "models", baseline)  # stands for an older version of models/
    res = _session(tmp_path, str(baseline))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "gpu_bench.log", "gpu_bench.json", "graph_step_check.log", "gpu_bench-baseline.log",
        "gpu_bench-baseline.json"}
    assert "0 step(s) failed" in res.stdout
    assert f"models loaded from {baseline}" in (out / "gpu_bench-baseline.log").read_text()
    assert "OK: worst" in (out / "graph_step_check.log").read_text()


def test_gpu_session_refuses_a_baseline_that_is_not_a_models_folder(tmp_path):
    res = _session(tmp_path, str(tmp_path))
    assert res.returncode == 2
    assert "has no network.py" in res.stderr and str(tmp_path) in res.stderr
    assert not (tmp_path / "out").exists(), "nothing run, nothing written"
