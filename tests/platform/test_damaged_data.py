"""Damaged data is refused, not trained on: a shard whose bytes no longer match the manifest's
SHA-256 (one flipped byte, as a bad disk or a truncated copy leaves it) stops `dynroute train`
and `dynroute evaluate` before they use it, naming the shard."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def flip_a_byte(prepared: Path, tmp_path: Path, split: str) -> tuple[Path, Path]:
    """A copy of the dataset with one byte of one `split` shard flipped: (root, that shard)."""
    copy = tmp_path / "damaged"
    shutil.copytree(prepared, copy)
    shard = sorted((copy / "shards").glob(f"{split}*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy, shard


def dynroute(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dynroute"), *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def test_training_refuses_a_shard_that_does_not_match_its_checksum(prepared, tmp_path):
    data, shard = flip_a_byte(prepared, tmp_path, "train")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 2, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"storage": str(tmp_path / "runs")}, "tracking": {"uri": "none"}}))
    res = dynroute("train", "--data", data, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert shard.name in res.stderr and "checksum" in res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("state.pt"))


def test_evaluation_refuses_a_shard_that_does_not_match_its_checksum(prepared, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 2, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"storage": str(tmp_path / "runs"), "name": "ok"},
        "evaluate": {"cost_resolution": [64, 128]}, "tracking": {"uri": "none"}}))
    assert dynroute("train", "--data", prepared, cwd=tmp_path).returncode == 0
    data, shard = flip_a_byte(prepared, tmp_path, "val")
    res = dynroute("evaluate", "--checkpoint", tmp_path / "runs" / "ok", "--data", data,
                   "--out", tmp_path / "eval", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert shard.name in res.stderr and "checksum" in res.stderr
