import re
from pathlib import Path

import pytest
import yaml

from dynroute.platform.config.params import DataParams, Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_the_repository_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.raw == "data/raw/synthetic"
    assert params.synth.train > 0


def test_unknown_keys_are_refused_with_their_full_name(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  rwa: /data/cityscapes\n")
    with pytest.raises(ParamsError, match=r"data\.rwa"):
        load_params(path)
    path.write_text("trian: {}\n")
    with pytest.raises(ParamsError, match="trian"):
        load_params(path)


def test_types_are_checked(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("synth:\n  train: many\n")
    with pytest.raises(ParamsError, match=r"synth\.train = 'many': expected int"):
        load_params(path)
    path.write_text("synth: [1, 2]\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(path)


def test_missing_sections_take_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  raw: /mnt/cityscapes\n")
    params = load_params(path)
    assert params.data == DataParams(raw="/mnt/cityscapes")


def test_every_param_key_in_dvc_yaml_exists():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = load_params(ROOT / "params.yaml")
    for name, stage in stages.items():
        for key in stage.get("params", []):
            section, _, field = key.partition(".")
            assert hasattr(params, section), f"stage {name}: {key}"
            assert not field or hasattr(getattr(params, section), field), f"stage {name}: {key}"


def test_every_run_key_reaches_the_training_spec():
    """`run.*` keys become TrainSpec fields of the same name, none dropped on the way."""
    from dataclasses import fields, replace

    from dynroute.pipelines.run import train_spec
    from dynroute.platform.train.spec import RunSettings

    changed = {"name": "n", "storage": "s3://b/p", "workers": 3, "use_gpu": True,
               "loader_workers": 2, "checkpoint_every": 7, "log_every": 3, "max_failures": 5,
               "fast": False, "bf16": True, "channels_last": True}
    assert set(changed) == {f.name for f in fields(RunSettings)}, "cover every run key"
    params = replace(load_params(ROOT / "params.yaml"), run=RunSettings(**changed))
    spec = train_spec(params, data="d", uri="http://127.0.0.1:1")
    assert {k: getattr(spec, k) for k in changed} == changed
    assert spec.tracking.run_name == "n"


@pytest.mark.parametrize(("text", "key"), [
    ("train: {lambda2: -0.5}", "train.lambda2"),
    ("train: {mu: 1.5}", "train.mu"),
    ("train: {lr: 0}", "train.lr"),
    ("run: {checkpoint_every: 0}", "run.checkpoint_every"),
    ("run: {workers: -1}", "run.workers"),
    ("run: {name: ''}", "run.name"),
    ("run: {name: ../../elsewhere}", "run.name"),
    ("model: {layers: 3}", "layers=3"),
])
def test_impossible_values_are_refused_when_params_load(tmp_path, text, key):
    """Before any side effect: every stage loads params.yaml first."""
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ParamsError, match=re.escape(key)):
        load_params(path)


def test_a_bad_command_line_override_is_refused_before_anything_starts(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("tracking: {uri: local, dir: mlruns}\n")
    dynroute = Path(sys.executable).parent / "dynroute"
    res = subprocess.run([str(dynroute), "train", "--data", "nowhere", "--workers", "-1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "run.workers" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "mlruns").exists(), "an MLflow server started before the check"
