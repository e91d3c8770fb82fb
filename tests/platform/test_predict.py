"""`dynroute predict` on a checkpoint folder, as a user runs it: a truncated or corrupt image
among the inputs fails the command before it writes anything, naming that image, and a disk that
fills up while it writes leaves only whole output files behind."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.train import checkpoints
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrainSpec

BIN = Path(sys.executable).parent
MODEL = NetworkConfig(layers=4, base_channels=4)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with params.yaml (no tracking), a checkpoint `ckpt/` of a tiny Cityscapes
    network and three good images a.png, b.jpg, c.png."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": "none"}}))
    (tmp_path / "ckpt").mkdir()
    checkpoints.write(tmp_path / "ckpt", spec=TrainSpec(
        data="unused", model=MODEL, train=TrainConfig(iterations=4, batch_size=2, crop=(64, 64)),
        name="net"), state={"model": build_network(MODEL).state_dict(), "optimizer": {},
                            "step": 4, "mlflow_run_id": None, "resumes": []})
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def predict(cwd: Path, *args, run=subprocess.run, **kwargs) -> subprocess.CompletedProcess:
    return run([BIN / "dynroute", "predict", "--model", "ckpt", *map(str, args)], cwd=cwd,
               text=True, capture_output=True, timeout=300, env=os.environ | {"COLUMNS": "400"},
               **kwargs)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = b"\0" * (len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bad, damage", [("c.png", _truncate), ("b.jpg", _truncate),
                                         ("c.png", _corrupt)])
def test_a_damaged_image_fails_predict_before_any_output(project, bad, damage):
    old = predict(project, "a.png", "--out", "old")
    assert old.returncode == 0, old.stdout + old.stderr
    before = files(project / "old")
    assert set(before) == {"a_mask.png", "a_route.png", "predictions.json"}
    damage(project / bad)

    new = predict(project, "a.png", "b.jpg", "c.png", "--out", "new")
    assert new.returncode == 1, new.stdout + new.stderr
    assert not (project / "new").exists(), "nothing is written for the images before it"
    again = predict(project, "a.png", "b.jpg", "c.png", "--out", "old")
    assert again.returncode == 1, again.stdout + again.stderr
    assert files(project / "old") == before, "an earlier prediction is untouched"
    for res in (new, again):
        assert res.stderr.startswith(f"error: image {bad} cannot be decoded"), res.stderr
        assert "truncated or corrupt" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_full_disk_leaves_only_whole_output_files(project, small_disk):
    """The output folder on a disk that fills up after the first mask (`small_disk`: a real
    tmpfs, ENOSPC, where the test may mount one; else RLIMIT_FSIZE, EFBIG)."""
    out = small_disk.folder / "out"
    mask = predict(project, "a.png", "--out", project / "sizes")
    assert mask.returncode == 0, mask.stderr
    room = (project / "sizes" / "a_mask.png").stat().st_size + 1024  # not the route drawing
    assert (project / "sizes" / "a_route.png").stat().st_size > room + 4096

    res = predict(project, "a.png", "c.png", "--out", out, run=small_disk.run, room=room)
    assert res.returncode == 1, res.stdout + res.stderr
    left = files(out)
    assert set(left) <= {"a_mask.png"}, "no partial file and no temporary one stays"
    for data in left.values():
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # whole
    assert res.stderr.startswith(f"error: cannot write {out / 'a_route.png'}: "), res.stderr
    assert f"free space in {out} or choose another --out" in res.stderr
    assert "Traceback" not in res.stderr
    again = predict(project, "a.png", "c.png", "--out", out, run=small_disk.run)  # room again
    assert again.returncode == 0, again.stderr
    assert set(files(out)) == {"a_mask.png", "a_route.png", "c_mask.png", "c_route.png",
                               "predictions.json"}
