"""The `pareto` stage: trials.json → pareto.json/csv, PNG + HTML, MLflow artifacts on the study's
parent run, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dynroute.pipelines.pareto_stage import TrialsError, format_table, load_trials, run_pareto
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.synth import synthesize
from dynroute.platform.config.params import load_params
from dynroute.platform.data.shards import read_manifest
from dynroute.platform.tracking.server import MlflowServer

DYNROUTE = shutil.which("dynroute", path=str(Path(sys.executable).parent)) or "dynroute"

# (id, state, mIoU, GFLOPs): t1, t2 and t4 are non-dominated; t3 is dominated by t2; t5 has no
# mIoU (invalid); t6 failed and is left out altogether.
TRIALS = [("s-t000", "COMPLETE", 0.40, 2.0), ("s-t001", "COMPLETE", 0.35, 1.2),
          ("s-t002", "COMPLETE", 0.30, 1.5), ("s-t003", "PRUNED", 0.20, 0.6),
          ("s-t004", "COMPLETE", None, 1.0), ("s-t005", "FAILED", None, None)]


def trials_document(parent_run_id: str | None = None) -> dict:
    trials = []
    for number, (tid, state, miou, gflops) in enumerate(TRIALS):
        trials.append({"id": tid, "number": number, "state": state, "seeded_from": None,
                       "params": {"train.lambda2": 0.1 * (number + 1), "train.mu": 0.1},
                       "lambda2": 0.1 * (number + 1), "mu": 0.1, "iterations": 20,
                       "miou": miou, "gflops_mean": gflops, "gflops_max": gflops,
                       "gflops_min": gflops, "gflops_p50": gflops, "gflops_p90": gflops,
                       "checkpoint": None, "mlflow_run_id": None,
                       "model_uri": f"runs:/run{number}/model"})
    return {"study": "s", "mode": "pareto", "max_gflops": None, "storage": "x.journal",
            "objectives": [["miou", "max"], ["gflops_mean", "min"]],
            "cost_resolution": [256, 512], "parent_run_id": parent_run_id, "trials": trials}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A params.yaml whose data.prepared holds a real (tiny) prepared dataset."""
    root = tmp_path_factory.mktemp("pareto-project")
    synthesize("cityscapes", root / "raw", train=1, val=1, height=64, width=128, seed=2)
    prepare("cityscapes", root / "raw", root / "prepared", workers=1)
    params = {"data": {"prepared": str(root / "prepared")},
              "tracking": {"uri": "none", "dir": str(root / "mlruns")},
              "tune": {"results": str(root / "tune")}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def write_trials(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def test_front_knee_and_files(project, tmp_path):
    params = load_params(project / "params.yaml")
    trials = write_trials(tmp_path / "trials.json", trials_document())
    outputs = run_pareto(params, trials=trials, out=tmp_path / "m", plots=tmp_path / "p",
                         uri=None, metrics=tmp_path / "metrics" / "pareto.json")
    assert sorted(p.id for p in outputs.summary.front) == ["s-t000", "s-t001", "s-t003"]
    assert "s-t005" not in {p.id for p in outputs.points}, "failed trials are left out"
    assert [p.id for p in outputs.summary.fronts.invalid] == ["s-t004"]
    document = json.loads((tmp_path / "m" / "pareto.json").read_text())
    assert document["knee"] == "s-t001"  # the corner of (0.6, 0.2) – (1.2, 0.35) – (2.0, 0.4)
    front = {r["id"]: r for r in document["front"]}
    assert front["s-t001"]["meta"]["model_uri"] == "runs:/run1/model"
    assert front["s-t001"]["meta"]["lambda2"] == pytest.approx(0.2)
    manifest = read_manifest(params.data.prepared)
    assert front["s-t001"]["meta"]["data_hash"] == manifest.content_hash
    assert front["s-t001"]["meta"]["dataset"] == "cityscapes"
    assert front["s-t001"]["meta"]["cost_resolution"] == [256, 512]
    rows = list(csv.DictReader((tmp_path / "m" / "pareto.csv").open()))
    assert [r["id"] for r in rows if r["on_front"] == "true"] == ["s-t003", "s-t001", "s-t000"]
    assert (tmp_path / "p" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "s-t002" in (tmp_path / "p" / "pareto.html").read_text()
    table = format_table(outputs)
    assert table.index("s-t000") < table.index("s-t001") < table.index("s-t003")
    assert "3 on the front of 5 trials (1 without both objectives)" in table
    assert math.isclose(outputs.summary.hypervolume, document["hypervolume"])
    # the DVC metrics file: the headline only, one column each in `dvc exp show`
    headline = json.loads((tmp_path / "metrics" / "pareto.json").read_text())
    assert headline == {"hypervolume": document["hypervolume"], "front_size": 3, "trials": 5,
                        "knee": {"trial": "s-t001", "miou": front["s-t001"]["miou"],
                                 "gflops_mean": front["s-t001"]["gflops"],
                                 "lambda2": front["s-t001"]["meta"]["lambda2"],
                                 "mu": front["s-t001"]["meta"]["mu"]}}


@pytest.mark.parametrize("text, message", [
    (None, "run `dynroute tune`"),
    ("{not json", "not valid JSON"),
    ('{"trials": {}}', "'trials' list"),
    ('{"trials": [{"id": "a", "state": "COMPLETE", "miou": 0.1}]}', "lacks gflops_mean"),
])
def test_bad_trials_files_are_refused_clearly(tmp_path, text, message):
    path = tmp_path / "trials.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TrialsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_trials(path)


def test_cli_logs_the_front_to_the_study_parent_run(project, tmp_path):
    with MlflowServer(root=tmp_path / "mlflow") as server:
        client = MlflowClient(server.uri)
        experiment = client.create_experiment("dynroute")
        parent = client.create_run(experiment, run_name="s").info.run_id
        client.set_terminated(parent)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["tracking"] = {"uri": server.uri, "experiment": "dynroute"}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        trials = write_trials(tmp_path / "tune" / "trials.json", trials_document(parent))
        res = subprocess.run([DYNROUTE, "pareto", "--params", str(tmp_path / "params.yaml"),
                              "--trials", str(trials), "--out", str(tmp_path / "m"),
                              "--plots", str(tmp_path / "p")],
                             capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "knee" in res.stdout and "s-t001" in res.stdout
        run = client.get_run(parent)
        assert run.data.metrics["pareto_front_size"] == 3
        assert run.info.status == "FINISHED"
        logged = {a.path for a in client.list_artifacts(parent, "pareto")}
        assert logged == {f"pareto/pareto.{ext}" for ext in ("json", "csv", "png", "html")}

        missing = subprocess.run([DYNROUTE, "pareto", "--params", str(tmp_path / "params.yaml"),
                                  "--trials", str(tmp_path / "nope.json")],
                                 capture_output=True, text=True, cwd=tmp_path)
        assert missing.returncode == 1 and "dynroute tune" in missing.stderr
