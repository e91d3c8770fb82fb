"""`dynroute register / select / predict` end to end: a real MLflow server on 127.0.0.1, real
logged models of a tiny network, a params.yaml pointing at the server.

Commands run in-process through Typer's CliRunner (fast); `select --json` also runs as the
installed console script, so its stdout is proven to be clean JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cityscapesscripts.helpers.labels import trainId2label
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from dynroute.models import NetworkConfig, build_network
from dynroute.pipelines.cli import app
from dynroute.platform.pareto.analysis import Point, write_front
from dynroute.platform.tracking.server import MlflowServer
from dynroute.platform.tracking.tracker import Tracker

DYNROUTE = shutil.which("dynroute", path=str(Path(sys.executable).parent)) or "dynroute"
# Trial → (mIoU, mean GFLOPs); c is dominated by b.
FIGURES = {"a": (0.50, 2.0), "b": (0.62, 6.0), "c": (0.58, 9.0)}
MODEL = "cli-cityscapes"
pytestmark = pytest.mark.slow  # one MLflow server for the module (~15 s to start)


@dataclass(frozen=True)
class Workspace:
    root: Path
    params: Path
    pareto: Path
    server: MlflowServer
    run_ids: dict[str, str]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("project")
    with MlflowServer(root=root / "mlruns") as server:
        tracker = Tracker(uri=server.uri, experiment="cli")
        config = NetworkConfig(layers=4, base_channels=4, num_classes=19)
        run_ids = {}
        for i, trial in enumerate(FIGURES):
            torch.manual_seed(i)
            with tracker.run(run_name=f"trial-{trial}") as run_id:
                tracker.log_network(build_network(config).eval(), config)
            run_ids[trial] = run_id
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump({
            "data": {"dataset": "cityscapes"},
            "tracking": {"uri": server.uri, "experiment": "cli"},
            "registry": {"name": "cli-{dataset}", "budget_edges": [3.0, 7.5]}}))
        points = [Point(t, miou, gflops, {
            "number": i, "study": "cli-study", "state": "COMPLETE",
            "params": {"train.lambda2": 0.2, "train.mu": 0.1 * i}, "lambda2": 0.2, "mu": 0.1 * i,
            "iterations": 10, "gflops_max": gflops + 1, "gflops_min": gflops - 1,
            "gflops_p50": gflops, "gflops_p90": gflops + 0.5, "cost_resolution": [64, 128],
            "checkpoint": None, "mlflow_run_id": run_ids[t],
            "model_uri": f"runs:/{run_ids[t]}/model", "data_hash": "h" * 64,
            "git_commit": "g" * 40, "dataset": "cityscapes"})
            for i, (t, (miou, gflops)) in enumerate(FIGURES.items())]
        pareto = root / "artifacts" / "pareto" / "pareto.json"  # the command's default
        write_front(pareto, pareto.with_suffix(".csv"), points)
        yield Workspace(root=root, params=params, pareto=pareto, server=server,
                        run_ids=run_ids)


@pytest.fixture(scope="module")
def registered(workspace: Workspace) -> dict:
    """`dynroute register` once, from the project folder with the default paths."""
    import os

    cwd = Path.cwd()
    os.chdir(workspace.root)
    try:
        result = invoke("register", "--params", workspace.params)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return {"stdout": result.stdout,
            "summary": json.loads((workspace.root / "artifacts" / "registry.json").read_text())}


def test_register_prints_the_table_and_writes_registry_json(workspace, registered):
    summary = registered["summary"]
    assert summary["name"] == MODEL
    rows = {row["trial"]: row for row in summary["versions"]}
    assert set(rows) == {"a", "b"}  # c is dominated
    assert rows["a"]["miou"] == 0.50 and rows["b"]["gflops_mean"] == 6.0
    assert rows["a"]["run_id"] == workspace.run_ids["a"]
    assert summary["aliases"] == {
        "best-miou": rows["b"]["version"], "min-gflops": rows["a"]["version"],
        "knee": summary["aliases"]["knee"], "le-3g": rows["a"]["version"],
        "le-7p5g": rows["b"]["version"]}
    assert summary["aliases"]["knee"] in {rows["a"]["version"], rows["b"]["version"]}
    assert summary["budget_edges"] == [3.0, 7.5] and summary["automatic_edges"] is False

    out = registered["stdout"]
    assert f"registered model {MODEL}: 2 versions on the front (2 new" in out
    for trial, row in rows.items():
        line = next(ln for ln in out.splitlines() if ln.split()[:2] == [row["version"], trial])
        assert all(alias in line for alias in row["aliases"]) and "true" in line

    again = invoke("register", "--params", workspace.params, "--pareto", workspace.pareto,
                   "--out", workspace.root / "again.json",
                   "--metrics", workspace.root / "headline.json")
    assert again.exit_code == 0, again.output
    assert "(0 new" in again.stdout
    second = json.loads((workspace.root / "again.json").read_text())
    assert second["versions"] == summary["versions"] and second["aliases"] == summary["aliases"]
    # the DVC metrics file: the headline only
    assert json.loads((workspace.root / "headline.json").read_text()) == {
        "versions_on_front": 2, "knee_version": summary["aliases"]["knee"]}


def test_register_with_a_bad_pareto_file_fails_clearly(workspace, tmp_path):
    document = json.loads(workspace.pareto.read_text())
    del document["front"][0]["meta"]["dataset"]
    bad = tmp_path / "pareto.json"
    bad.write_text(json.dumps(document))
    result = invoke("register", "--params", workspace.params, "--pareto", bad,
                    "--out", tmp_path / "registry.json")
    assert result.exit_code == 1
    assert f"{bad}: front[0] (trial 'a') has no key 'meta.dataset'" in result.stderr
    assert not (tmp_path / "registry.json").exists()
    result = invoke("register", "--params", workspace.params, "--pareto", tmp_path / "none.json")
    assert result.exit_code == 1 and "none.json does not exist" in result.stderr


def test_select_prints_the_choice_as_text_and_as_json(workspace, registered):
    versions = {row["trial"]: row["version"] for row in registered["summary"]["versions"]}
    text = invoke("select", "--params", workspace.params, "--max-gflops", "6.5")
    assert text.exit_code == 0, text.output
    assert f"{MODEL} version {versions['b']}: models:/{MODEL}/{versions['b']}" in text.stdout
    assert "mIoU 0.6200" in text.stdout and "64x128" in text.stdout

    done = subprocess.run([DYNROUTE, "select", "--params", str(workspace.params),
                           "--max-gflops", "5", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    chosen = json.loads(done.stdout)
    assert chosen["version"] == versions["a"]
    assert chosen["uri"] == f"models:/{MODEL}/{versions['a']}"
    assert (chosen["miou"], chosen["gflops_mean"], chosen["trial"]) == (0.5, 2.0, "a")
    assert "min-gflops" in chosen["aliases"]

    high_bar = invoke("select", "--params", workspace.params, "--max-gflops", "5",
                      "--min-miou", "0.6", "--json")
    assert high_bar.exit_code == 1 and high_bar.stdout == ""
    assert "no model on the registered front has mean GFLOPs <= 5 and mIoU >= 0.6" in \
        high_bar.stderr
    other = invoke("select", "--params", workspace.params, "--max-gflops", "5",
                   "--dataset", "voc")
    assert other.exit_code == 1 and "dynroute register" in other.stderr


def test_predict_writes_a_colour_mask_and_a_route_drawing_per_image(workspace, registered,
                                                                   tmp_path):
    rng = np.random.default_rng(1)
    street, field = tmp_path / "street.png", tmp_path / "field.jpg"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(street)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert("L").save(field)
    out = tmp_path / "predictions"
    result = invoke("predict", "--params", workspace.params, "--model",
                    f"models:/{MODEL}@knee", street, field, "--out", out)
    assert result.exit_code == 0, result.output
    colours = {tuple(trainId2label[k].color) for k in range(19)}
    for image, size in ((street, (64, 48)), (field, (40, 30))):
        with Image.open(out / f"{image.stem}_mask.png") as mask:
            assert mask.size == size and mask.mode == "RGB"
            assert {tuple(c) for c in np.asarray(mask).reshape(-1, 3)} <= colours
        with Image.open(out / f"{image.stem}_route.png") as drawing:
            assert drawing.format == "PNG" and drawing.size[0] > 300
        assert str(out / f"{image.stem}_mask.png") in result.stdout
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"] == f"models:/{MODEL}@knee" and summary["dataset"] == "cityscapes"
    assert [(r["height"], r["width"]) for r in summary["images"]] == [(48, 64), (30, 40)]
    assert all(r["gflops"] > 0 and r["open_paths"] for r in summary["images"])

    missing = invoke("predict", "--params", workspace.params, "--model",
                     f"models:/{MODEL}@knee", tmp_path / "absent.png", "--out", out)
    assert missing.exit_code == 1 and "absent.png does not exist" in missing.stderr
    no_alias = invoke("predict", "--params", workspace.params, "--model",
                      f"models:/{MODEL}@nope", street, "--out", out)
    assert no_alias.exit_code == 1 and f"models:/{MODEL}@nope" in no_alias.stderr
    for device, message in (("tpu", "use auto, cpu, cuda or cuda:N"),
                            (f"cuda:{torch.cuda.device_count()}", "CUDA device(s)")):
        refused = invoke("predict", "--params", workspace.params, "--model",
                         f"models:/{MODEL}@knee", street, "--out", out, "--device", device)
        assert refused.exit_code == 1, refused.output
        assert f"evaluate.device = '{device}'" in refused.stderr and message in refused.stderr


# ---------------------------------------------------------------------------------------------
# Latency per device: `dynroute profile` and `select --max-latency-ms`


@pytest.fixture(scope="module")
def profile_params(workspace: Workspace) -> Path:
    """The workspace's params with a tiny prepared dataset to time (4 val images, 64x128)."""
    from dynroute.pipelines.prepare import prepare
    from dynroute.pipelines.synth import synthesize

    raw, prepared = workspace.root / "raw", workspace.root / "prepared"
    synthesize("cityscapes", raw, train=2, val=4, height=64, width=128, seed=0)
    prepare("cityscapes", raw, prepared)
    params = yaml.safe_load(workspace.params.read_text())
    params["data"]["prepared"] = str(prepared)
    params["evaluate"] = {"cost_resolution": [64, 128], "device": "cpu"}
    params["profile"] = {"warmup": 1, "repeats": 3}
    path = workspace.root / "profile-params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def noisy_params(profile_params: Path) -> Path:
    """As `profile_params`, recording disturbed figures marked so: the test box may be busy."""
    params = yaml.safe_load(profile_params.read_text())
    params["profile"]["accept_disturbed"] = True
    path = profile_params.with_name("noisy-params.yaml")
    path.write_text(yaml.safe_dump(params))
    return path


def _latency_tags(workspace: Workspace) -> dict[str, dict[str, dict]]:
    client = MlflowClient(tracking_uri=workspace.server.uri, registry_uri=workspace.server.uri)
    return {v.tags["trial"]: {k: json.loads(t) for k, t in v.tags.items()
                              if k.startswith("latency/")}
            for v in client.search_model_versions(f"name='{MODEL}'")}


def _hogs() -> list[subprocess.Popen]:
    """One busy loop per core this process may use: another job sharing the CPU throughout."""
    import os

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]


def test_profile_refuses_to_record_latency_while_another_job_shares_the_cpu(
        workspace, registered, profile_params, tmp_path):
    before = _latency_tags(workspace)
    hogs = _hogs()
    try:
        result = invoke("profile", "--params", profile_params, "--out", tmp_path / "profile")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert result.exit_code == 1, result.output
    assert "disturbed in all 3 attempt(s)" in result.stderr
    assert "CPU cores busy" in result.stderr and "stop it and profile again" in result.stderr
    assert "Traceback" not in result.output
    assert _latency_tags(workspace) == before  # nothing recorded
    assert not (tmp_path / "profile" / "profile.json").exists()


def test_profile_records_latency_per_device_and_select_chooses_by_it(
        workspace, registered, noisy_params, tmp_path):
    from dynroute.platform.evaluate.latency import device_key
    from dynroute.platform.registry.latency import record_latency

    out = tmp_path / "profile"
    result = invoke("profile", "--params", noisy_params, "--out", out,
                    "--metrics", tmp_path / "profile-metrics.json")
    assert result.exit_code == 0, result.output
    key = device_key("cpu")
    versions = {row["trial"]: row["version"] for row in registered["summary"]["versions"]}
    tags = _latency_tags(workspace)
    for trial in ("a", "b"):  # the front's versions; c was never registered
        record = tags[trial][f"latency/{key}"]
        assert 0 < record["p50_ms"] <= record["p90_ms"]
        assert record["images"] == 4 and record["repeats"] == 3 and record["warmup"] == 1
        assert record["resolution"] == [64, 128] and record["torch"] == torch.__version__
        assert record["busy_elsewhere"] is not None and record["attempts"] in (1, 2, 3)
        line = next(ln for ln in result.stderr.splitlines()
                    if ln.startswith(f"  version {versions[trial]}: p50"))
        assert record["disturbed"] is ("(DISTURBED)" in line)
        assert not record["disturbed"] or record["attempts"] == 3  # measured again first
    summary = json.loads((out / "profile.json").read_text())
    assert summary["device"] == key and len(summary["image_ids"]) == 4
    assert {v["version"] for v in summary["versions"]} == set(versions.values())
    assert all(len(v["per_image_ms"]) == 4 for v in summary["versions"])
    assert (out / "latency_front.png").read_bytes()[:4] == b"\x89PNG"
    headline = json.loads((tmp_path / "profile-metrics.json").read_text())
    assert headline["versions_profiled"] == 2
    assert headline["disturbed"] == sum(tags[t][f"latency/{key}"]["disturbed"] for t in "ab")
    assert f"{MODEL} on {key}" in result.stdout

    # Figures set by hand on a second device: b is the more accurate, a the faster.
    other = "cuda-test-gpu-torch-0"
    for trial, (p50, p90) in {"a": (1.0, 2.0), "b": (3.0, 9.0)}.items():
        record_latency(tracking_uri=workspace.server.uri, name=MODEL, version=versions[trial],
                       device=other, record={"p50_ms": p50, "p90_ms": p90, "mean_ms": p50})

    def select(*args: str):
        return invoke("select", "--params", workspace.params, "--device", other, *args)

    chosen = json.loads(select("--max-latency-ms", "10", "--json").stdout)
    assert (chosen["version"], chosen["device"], chosen["percentile"], chosen["latency_ms"]) == (
        versions["b"], other, "p90", 9.0)
    assert json.loads(select("--max-latency-ms", "5", "--json").stdout)["version"] == \
        versions["a"]  # b's p90 of 9 ms does not fit
    assert json.loads(select("--max-latency-ms", "5", "--percentile", "p50",
                             "--json").stdout)["version"] == versions["b"]  # its p50 does
    both = select("--max-latency-ms", "10", "--max-gflops", "5", "--json")
    assert json.loads(both.stdout)["version"] == versions["a"]  # b costs 6 GFLOPs
    text = select("--max-latency-ms", "10")
    assert f"p90 latency 9 ms on {other}" in text.stdout

    none = select("--max-latency-ms", "1.5")
    assert none.exit_code == 1 and none.stdout == ""
    assert "no model on the registered front has p90 latency <= 1.5 ms" in none.stderr
    assert f"fastest front version on {other} is version {versions['a']} at 2 ms p90" in \
        none.stderr
    never = invoke("select", "--params", workspace.params, "--max-latency-ms", "5",
                   "--device", "cpu-never-profiled")
    assert never.exit_code == 1 and "dynroute profile" in never.stderr
    assert key in never.stderr and other in never.stderr  # the devices that were profiled
    # This machine's device is the default. A second record for a device replaces the first
    # (set by hand: the profile above may have been disturbed, and a disturbed figure is skipped).
    for trial, p90 in {"a": 4.0, "b": 8.0}.items():
        record_latency(tracking_uri=workspace.server.uri, name=MODEL, version=versions[trial],
                       device=key, record={"p50_ms": 1.0, "p90_ms": p90, "mean_ms": 2.0})
    here = json.loads(invoke("select", "--params", workspace.params, "--max-latency-ms", "6",
                             "--json").stdout)
    assert (here["device"], here["version"], here["latency_ms"]) == (key, versions["a"], 4.0)
    record_latency(tracking_uri=workspace.server.uri, name=MODEL, version=versions["a"],
                   device=key, record={"p50_ms": 1.0, "p90_ms": 4.0, "mean_ms": 2.0,
                                       "disturbed": True})
    skipped = invoke("select", "--params", workspace.params, "--max-latency-ms", "6")
    assert skipped.exit_code == 1  # a's figure is disturbed, b's 8 ms does not fit
    no_budget = invoke("select", "--params", workspace.params)
    assert no_budget.exit_code == 1 and "--max-latency-ms" in no_budget.stderr


def test_profile_one_version_by_alias_and_refuse_what_names_none(workspace, registered,
                                                                  noisy_params, tmp_path):
    versions = {row["trial"]: row["version"] for row in registered["summary"]["versions"]}
    out = tmp_path / "one"
    one = invoke("profile", "--params", noisy_params, "--out", out, "--model",
                 f"models:/{MODEL}@best-miou")
    assert one.exit_code == 0, one.output
    summary = json.loads((out / "profile.json").read_text())
    assert [v["version"] for v in summary["versions"]] == [versions["b"]]
    for model, message in ((f"models:/{MODEL}@nope", "no such version or alias; versions: "),
                           (f"models:/{MODEL}/99", "no such version or alias"),
                           ("models:/other/1", f"give models:/{MODEL}/VERSION or "
                                                f"models:/{MODEL}@ALIAS")):
        refused = invoke("profile", "--params", noisy_params, "--out", tmp_path / "bad",
                         "--model", model)
        assert refused.exit_code == 1 and message in refused.stderr, refused.output
    assert not (tmp_path / "bad").exists()
