"""A checkpoint is read as data, never as code: a `state.pt` crafted to run a command when it is
unpickled (as an attacker who can write to a run folder or a shared storage path would plant
it) is refused by `dynroute evaluate` and by `dynroute train` resuming, and its command never
runs. The same checkpoint without the payload loads, so the refusal is the payload's doing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.train import checkpoints
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrainSpec

BIN = Path(sys.executable).parent
MODEL = NetworkConfig(layers=4, base_channels=4)
RECIPE = TrainConfig(iterations=4, batch_size=2, crop=(64, 64), warmup_iterations=1)


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_checkpoint(folder: Path, *, data: Path, marker: Path | None) -> Path:
    """A checkpoint of step 4 of a run named `net`: the genuine state, or with `marker` the
    genuine state plus a payload."""
    folder.mkdir(parents=True)
    state = {"model": build_network(MODEL).state_dict(), "optimizer": {}, "step": 4,
             "mlflow_run_id": None, "resumes": []}
    if marker is not None:
        state["extra"] = Payload(marker)
    spec = TrainSpec(data=str(data), model=MODEL, train=RECIPE, name="net")
    checkpoints.write(folder, state=state, spec=spec)
    return folder


def dynroute(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dynroute"), *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def test_the_payload_runs_when_unpickled(tmp_path, prepared):
    """The probe is real: loaded the old way (`weights_only=False`), the file runs its command."""
    marker = tmp_path / "ran"
    folder = write_checkpoint(tmp_path / "ckpt", data=prepared, marker=marker)
    torch.load(folder / checkpoints.STATE_FILE, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_evaluate_refuses_a_checkpoint_that_would_run_code(tmp_path, prepared):
    marker = tmp_path / "ran"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "evaluate": {"cost_resolution": [64, 128]}, "tracking": {"uri": "none"}}))
    bad = write_checkpoint(tmp_path / "bad" / "checkpoint_00000004", data=prepared, marker=marker)
    res = dynroute("evaluate", "--checkpoint", bad, "--data", prepared, "--out", tmp_path / "e",
                   cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert not marker.exists(), "the payload ran"
    assert str(bad / checkpoints.STATE_FILE) in res.stderr and "could run code" in res.stderr
    assert "Traceback" not in res.stderr

    good = write_checkpoint(tmp_path / "good" / "checkpoint_00000004", data=prepared, marker=None)
    network, spec = checkpoints.load(good)  # the loader evaluate uses
    assert spec.name == "net" and network.layers == MODEL.layers


@pytest.mark.slow
def test_a_resumed_training_refuses_a_checkpoint_that_would_run_code(tmp_path, prepared):
    marker = tmp_path / "ran"
    runs = tmp_path / "runs"
    write_checkpoint(runs / "net" / "checkpoint_00000004", data=prepared, marker=marker)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 8, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"name": "net", "storage": str(runs), "checkpoint_every": 4},
        "tracking": {"uri": "none"}}))
    res = dynroute("train", "--data", prepared, "--params", params, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert not marker.exists(), "the payload ran"
    assert "could run code" in res.stderr


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, prepared):
    run = tmp_path / "runs" / "net"
    older = write_checkpoint(run / "checkpoint_00000002", data=prepared, marker=None)
    newest = write_checkpoint(run / "checkpoint_00000004", data=prepared, marker=None)
    state = newest / checkpoints.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a writer that died
    network, spec = checkpoints.load(run)
    assert spec.name == "net" and network.layers == MODEL.layers

    (older / checkpoints.STATE_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint_00000004: .*; checkpoint_00000002: "):
        checkpoints.load(run)
