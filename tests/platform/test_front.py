"""The registry's pure half (`registry.front`): pareto.json checks, names, aliases and buckets.

No MLflow server: the pareto.json files are written by `pareto.analysis.write_front` from points
whose trial records name made-up runs. Registering such files is tested in test_registry.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dynroute.platform.pareto.analysis import Point, summarize, write_front
from dynroute.platform.registry.front import (
    ALIAS_BEST_MIOU,
    ALIAS_KNEE,
    ALIAS_MIN_GFLOPS,
    REQUIRED_META,
    RegistryError,
    automatic_budget_edges,
    desired_aliases,
    is_managed_alias,
    load_front,
    model_name,
)

# t0 (cheap), t1, t2 (accurate); t3 is dominated by t1.
FIGURES = {"t0": (0.50, 2.0), "t1": (0.60, 5.0), "t2": (0.64, 12.0), "t3": (0.55, 8.0)}


def trial(trial_id: str, miou: float, gflops: float) -> Point:
    """A point with the keys of the trial record the pareto stage writes."""
    meta = {"study": "study-a", "params": {"train.mu": 0.1}, "lambda2": 0.5, "mu": 0.1,
            "gflops_max": gflops * 1.25, "gflops_min": gflops * 0.75,
            "cost_resolution": [256, 512], "model_uri": f"runs:/run-{trial_id}/model",
            "data_hash": "d" * 64, "git_commit": "c" * 40, "dataset": "cityscapes"}
    assert set(REQUIRED_META) <= set(meta)
    return Point(trial_id, miou, gflops, meta)


@pytest.fixture
def pareto(tmp_path: Path) -> Path:
    path = tmp_path / "pareto.json"
    write_front(path, path.with_suffix(".csv"),
                [trial(t, miou, gflops) for t, (miou, gflops) in FIGURES.items()])
    return path


def test_front_imports_no_mlflow_or_ray():
    code = ("import sys, dynroute.platform.registry.front;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'mlflow', 'ray'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_load_front_reads_the_front_of_a_pareto_json(pareto):
    front = load_front(pareto)
    assert front.source == str(pareto)
    assert [p.id for p in front.points] == ["t0", "t1", "t2"]  # rank 0 only
    assert front.dataset == "cityscapes" and front.study == "study-a"
    assert front.ranks == {"t0": 0, "t1": 0, "t2": 0, "t3": 1}
    assert load_front(json.loads(pareto.read_text())).points == front.points


def test_bad_pareto_json_gives_a_clear_error(pareto, tmp_path):
    good = json.loads(pareto.read_text())

    with pytest.raises(RegistryError, match=r"absent\.json does not exist.*pareto"):
        load_front(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(RegistryError, match=r"broken\.json is not valid JSON"):
        load_front(broken)
    no_front = tmp_path / "no_front.json"
    no_front.write_text(json.dumps({"points": []}))
    with pytest.raises(RegistryError, match=r"no_front\.json: missing key 'front'"):
        load_front(no_front)

    no_uri = json.loads(json.dumps(good))
    del no_uri["front"][1]["meta"]["model_uri"]
    with pytest.raises(RegistryError,
                       match=r"front\[1\] \(trial 't1'\) has no key 'meta\.model_uri'"):
        load_front(no_uri)
    no_miou = json.loads(json.dumps(good))
    del no_miou["front"][0]["miou"]
    with pytest.raises(RegistryError, match=r"front\[0\] has no key 'miou'"):
        load_front(no_miou)
    untracked = json.loads(json.dumps(good))
    untracked["front"][0]["meta"]["model_uri"] = None
    with pytest.raises(RegistryError, match="not an MLflow model URI"):
        load_front(untracked)
    mixed = json.loads(json.dumps(good))
    mixed["front"][0]["meta"]["dataset"] = "voc"
    with pytest.raises(RegistryError, match="mixes datasets"):
        load_front(mixed)
    with pytest.raises(RegistryError, match="front is empty"):
        load_front(good | {"front": []})


def test_model_name_fills_the_dataset_only():
    assert model_name("dynroute-{dataset}", "voc") == "dynroute-voc"
    assert model_name("fixed", "voc") == "fixed"
    with pytest.raises(RegistryError, match="placeholder"):
        model_name("x-{study}", "voc")
    with pytest.raises(RegistryError, match="quotes"):
        model_name("it's-{dataset}", "voc")


def test_automatic_budget_edges_rule():
    assert automatic_budget_edges([12.0, 2.0, 5.0]) == (2.0, 5.0, 10.0)
    assert automatic_budget_edges([0.03, 0.4]) == (0.05, 0.1, 0.2)
    assert automatic_budget_edges([150.0, 900.0]) == (200.0, 500.0)
    assert automatic_budget_edges([3.1, 4.5]) == ()  # no series value in between
    assert automatic_budget_edges([7.0]) == ()
    assert automatic_budget_edges([math.nan, 0.0]) == ()


def test_desired_aliases_name_the_front_models_people_ask_for(pareto):
    front = load_front(pareto)
    knee = summarize([trial(t, m, g) for t, (m, g) in FIGURES.items()]).knee
    wanted = {alias: p.id for alias, p in desired_aliases(front, (1.0, 2.5, 6.0)).items()}
    assert wanted == {ALIAS_BEST_MIOU: "t2", ALIAS_MIN_GFLOPS: "t0", ALIAS_KNEE: knee.id,
                      "le-2p5g": "t0", "le-6g": "t1"}  # 1 GFLOPs: no model fits
    assert all(is_managed_alias(alias) for alias in wanted)
    assert not is_managed_alias("production") and not is_managed_alias("le-60")
    assert is_managed_alias("le-5e-05g")
