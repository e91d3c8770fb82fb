"""The data-loader benchmark runs at smoke size in CI; its figures are read by people."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_loader_benchmark_runs_at_smoke_size():
    res = subprocess.run([sys.executable, "benchmarks/data_loader.py", "--smoke"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = lines[1].split()
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {"cityscapes-like", "voc-like"}
    for row in rows.values():
        assert len(row) == len(header)
        assert row[2] == "32x32"  # the smoke crop
        assert float(row[header.index("img/s/core")]) > 0
        assert float(row[header.index("KB/img")]) > 0
