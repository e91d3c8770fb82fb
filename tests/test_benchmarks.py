"""Benchmarks run in CI at smoke size only: they must run, their figures are read by people."""

import os
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
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    res = subprocess.run([sys.executable, "benchmarks/warm_start.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("  ")[0]: line.split() for line in res.stdout.splitlines()}
    scratch, shared = int(rows["from scratch"][-1]), int(rows["shared start"][-1])
    assert (scratch, shared) == (2 * 5, 2 + 2 * 3), "2 trials of 5 steps sharing ⌊0.4·5⌋ = 2"
