"""A run's checkpoints under trouble, as `dynroute train` meets it: a disk that fills up while a
checkpoint is written leaves no partial checkpoint and a clear error, and the training resumes
from the last whole one once there is room; a run whose checkpoints all fail to load is refused
before training (it used to start over from step 0 and replace them), while a damaged newest one
still falls back to the one before."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynroute.platform.train import checkpoints

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def write_params(folder: Path, storage: Path, *, every: int = 2) -> Path:
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 4, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"name": "net", "storage": str(storage), "checkpoint_every": every},
        "tracking": {"uri": "none"}}))
    return params


def train(cwd: Path, data: Path, *args, run=subprocess.run, **kwargs):
    return run([BIN / "dynroute", "train", "--data", data, "--params", cwd / "params.yaml",
                *args], cwd=cwd, text=True, capture_output=True, timeout=300, **kwargs)


def test_a_full_disk_during_a_checkpoint_leaves_the_last_whole_one(prepared, tmp_path,
                                                                   small_disk):
    """The run's storage on `small_disk`: a real tmpfs that fills up (ENOSPC) where the test may
    mount one, else a file size limit (RLIMIT_FSIZE, EFBIG) on the training process."""
    run = small_disk.folder / "runs" / "net"
    write_params(tmp_path, small_disk.folder / "runs")
    first = train(tmp_path, prepared, "--iterations", "2", run=small_disk.run)
    assert first.returncode == 0, first.stdout + first.stderr
    state = run / "checkpoint_00000002" / checkpoints.STATE_FILE
    room = state.stat().st_size // 2  # the next state.pt cannot fit

    full = train(tmp_path, prepared, run=small_disk.run, room=room)
    assert full.returncode == 1, full.stdout + full.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000002"], \
        "no partial checkpoint, no temporary folder"
    assert sorted(p.name for p in state.parent.iterdir()) == ["spec.json", "state.pt"]
    assert torch.load(state, weights_only=True)["step"] == 2
    reason = "the disk is full" if small_disk.mounted else "file size limit"
    assert f"error: cannot write a checkpoint in {run}: " in full.stderr, full.stderr
    assert reason in full.stderr and "point run.storage (--storage) at another disk" in full.stderr
    assert "Traceback" not in full.stderr

    again = train(tmp_path, prepared, run=small_disk.run)  # room again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from checkpoint at step 2" in again.stdout + again.stderr
    assert torch.load(run / "checkpoint_00000004" / checkpoints.STATE_FILE,
                      weights_only=True)["step"] == 4


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a writer that died


def _trained_run(tmp_path: Path, data: Path) -> Path:
    """A run `net` trained 2 steps with a checkpoint after each: its folder."""
    write_params(tmp_path, tmp_path / "runs", every=1)
    res = train(tmp_path, data, "--iterations", "2", "--name", "net")
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "net"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000001", "checkpoint_00000002"]
    return run


def test_a_run_whose_checkpoints_all_fail_to_load_is_refused_before_training(prepared,
                                                                            tmp_path):
    run = _trained_run(tmp_path, prepared)
    _truncate(run / "checkpoint_00000002" / checkpoints.STATE_FILE)
    (run / "checkpoint_00000001" / checkpoints.STATE_FILE).unlink()
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    res = train(tmp_path, prepared, "--iterations", "4", "--name", "net")
    assert res.returncode == 1, res.stdout + res.stderr
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before, \
        "the checkpoints are kept as they were, and no new one is written"
    assert "train: step" not in res.stdout + res.stderr, "it trained"
    assert res.stderr.startswith(f"error: the run folder {run} has checkpoints but none of "
                                 f"them loads (checkpoint_00000002: RuntimeError: "), res.stderr
    assert "; checkpoint_00000001: FileNotFoundError: " in res.stderr
    assert "Remove that folder to start the run afresh, or give this training another " \
           "run.name (--name)" in res.stderr
    assert "Traceback" not in res.stderr

    other = train(tmp_path, prepared, "--iterations", "2", "--name", "other")  # the way out
    assert other.returncode == 0, other.stdout + other.stderr


def test_a_damaged_newest_checkpoint_resumes_training_from_the_one_before(prepared, tmp_path):
    run = _trained_run(tmp_path, prepared)
    _truncate(run / "checkpoint_00000002" / checkpoints.STATE_FILE)
    res = train(tmp_path, prepared, "--iterations", "4", "--name", "net")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from checkpoint at step 1" in res.stdout + res.stderr
    assert torch.load(run / "checkpoint_00000004" / checkpoints.STATE_FILE,
                      weights_only=True)["resumes"] == [1]
