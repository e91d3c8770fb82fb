"""A rerun never silently mixes two trainings in one run: `dynroute train` continues a run only
when the network, the recipe (all but the number of iterations) and the data are the ones its
checkpoints were trained with, and only one process trains a run at a time."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.synth import synthesize

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def write_params(path: Path, **changes) -> Path:
    params = {"model": {"layers": 4, "base_channels": 4},
              "train": {"iterations": 4, "batch_size": 2, "crop": [64, 64],
                        "warmup_iterations": 1},
              "run": {"name": "r", "storage": str(path.parent / "runs"), "checkpoint_every": 2,
                      "log_every": 2},
              "tracking": {"uri": "none"}}
    for section, values in changes.items():
        params[section] = params[section] | values
    path.write_text(yaml.safe_dump(params))
    return path


def train(data: Path, params: Path, *extra: str, wait: bool = True):
    command = [str(BIN / "dynroute"), "train", "--data", str(data), "--params", str(params),
               *extra]
    if not wait:
        return subprocess.Popen(command, cwd=params.parent, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=params.parent, text=True, capture_output=True,
                          timeout=300)


def test_a_changed_recipe_or_network_is_refused_and_more_iterations_continue(prepared,
                                                                            tmp_path):
    assert train(prepared, write_params(tmp_path / "params.yaml")).returncode == 0
    res = train(prepared, write_params(tmp_path / "params.yaml", train={"lr": 0.01}))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "train.lr: 0.05 then, 0.01 now" in res.stderr and "--name" in res.stderr
    assert "Traceback" not in res.stderr
    res = train(prepared, write_params(tmp_path / "params.yaml", model={"layers": 5}))
    assert res.returncode == 1 and "model.layers: 4 then, 5 now" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = train(prepared, write_params(tmp_path / "params.yaml"), "--iterations", "6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from checkpoint at step 4" in res.stdout


def test_other_data_is_refused(prepared, tmp_path):
    other = tmp_path / "other"
    synthesize("cityscapes", other / "raw", train=8, val=2, height=64, width=128, seed=9)
    prepare("cityscapes", other / "raw", other / "prepared", workers=1)
    params = write_params(tmp_path / "params.yaml")
    assert train(prepared, params).returncode == 0
    res = train(other / "prepared", params)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "data: content hash" in res.stderr


def test_a_second_writer_of_the_same_run_is_refused(prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml", train={"iterations": 400})
    first = train(prepared, params, wait=False)
    try:
        lock = tmp_path / "runs" / ".r.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().startswith("process")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = train(prepared, params)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"being trained by process {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert not os.path.exists(tmp_path / "runs" / "r" / "checkpoint_00000400")
