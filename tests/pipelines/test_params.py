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
