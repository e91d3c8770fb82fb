"""`dvc repro` of the whole pipeline (synth → prepare → train → evaluate → tune → pareto →
register → profile), as a user runs it from a fresh clone (real DVC, real git, a real local
MLflow server per stage, a real Ray Tune + Optuna study)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def sh(*args: str, cwd: Path) -> str:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def checkout(dest: Path) -> Path:
    """The repository's tracked files (as a fresh clone has them) in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["synth"] |= {"train": 8, "val": 3, "height": 64, "width": 128}
    params["model"] = {"layers": 4, "base_channels": 4}
    params["train"] = {"iterations": 6, "batch_size": 4, "crop": [64, 64],
                       "warmup_iterations": 2}
    params["run"] = params.get("run", {}) | {"checkpoint_every": 3, "log_every": 3}
    params["evaluate"] |= {"cost_resolution": [64, 128]}
    params["tracking"] = {"uri": "local", "dir": "mlruns"}
    params["tune"] |= {"num_samples": 3, "iterations": 4, "max_concurrent": 1}
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=dest)
    return dest


def manifest(repo: Path) -> dict:
    return json.loads((repo / "data" / "prepared" / "manifest.json").read_text())


def test_repro_is_reproducible_incremental_and_pushes_to_the_default_remote(tmp_path):
    a = checkout(tmp_path / "a")
    sh("dvc", "repro", cwd=a)
    first = manifest(a)
    assert first["splits"]["train"]["count"] == 8 and first["splits"]["val"]["count"] == 3
    # The metrics files hold the headline only (a readable `dvc exp show`); the detail is in the
    # stages' outs.
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=a))[""]["data"]
    assert shown["metrics/data.json"]["data"] == {
        "dataset": "cityscapes", "classes": 19, "train": {"images": 8}, "val": {"images": 3}}
    evaluation = shown["metrics/eval.json"]["data"]
    assert set(evaluation) == {"miou", "pixel_accuracy", "gflops_mean", "gflops_p90"}
    assert 0 <= evaluation["miou"] <= 1 and evaluation["gflops_mean"] > 0
    detail = json.loads((a / "artifacts" / "eval" / "metrics.json").read_text())
    assert detail["miou"] == evaluation["miou"] and len(detail["per_class_iou"]) == 19
    assert set(shown["metrics/pareto.json"]["data"]) == {"hypervolume", "front_size", "trials",
                                                        "knee"}
    assert set(shown["metrics/registry.json"]["data"]) == {"versions_on_front", "knee_version"}
    # the last stage timed the front on this machine and recorded it per device
    profiled = shown["metrics/profile.json"]["data"]
    assert set(profiled) == {"versions_profiled", "latency_front_size",
                             "kendall_tau_gflops_latency", "disturbed"}
    assert profiled["versions_profiled"] >= 1 and profiled["disturbed"] == 0
    profile = json.loads((a / "artifacts" / "profile" / "profile.json").read_text())
    assert profile["device"].startswith("cpu-") and len(profile["image_ids"]) == 3
    assert (a / "artifacts" / "runs" / "train" / "checkpoint_00000006" / "state.pt").is_file()
    plots = sh("dvc", "plots", "show", "--json", cwd=a)
    assert "per_class_iou.json" in plots and "gflops_per_image.json" in plots
    assert "pareto.csv" in plots

    # the search ran its three seeded trials, the front was registered with its aliases
    trials = json.loads((a / "artifacts" / "tune" / "trials.json").read_text())["trials"]
    assert [t["seeded_from"] for t in trials] == ["dynamic-a", "dynamic-b", "dynamic-c"]
    assert all(t["state"] == "COMPLETE" and 0 <= t["miou"] <= 1 for t in trials)
    pareto = json.loads((a / "artifacts" / "pareto" / "pareto.json").read_text())
    front = {p["id"] for p in pareto["front"]}
    assert front and front <= {t["id"] for t in trials}
    assert shown["metrics/pareto.json"]["data"]["knee"]["trial"] == pareto["knee"]
    registry = json.loads((a / "artifacts" / "registry.json").read_text())
    assert registry["name"] == "dynroute-cityscapes"
    on_front = [v for v in registry["versions"] if v["pareto"]]
    assert {v["trial"] for v in on_front} == front
    assert {"best-miou", "min-gflops", "knee"} <= set(registry["aliases"])
    report = sh("dynroute", "report", cwd=a)
    assert "Pareto front" in report and "best-miou" in report
    assert f"mIoU {evaluation['miou']:.4f}" in report
    # where each budget ended, and how the synthetic scene kinds' routes differ
    assert "Budget search: where each trial's budget ended" in report
    assert all(f"  {t['id']}" in report for t in trials)
    assert re.search(r"knee \S+: per image GFLOPs min [\d.]+ / p50 [\d.]+ / max", report)
    assert re.search(r"small  scenes: +\d+ images", report), report
    assert f"Latency on {profile['device']} (dynroute profile: 3 val images at 64x128" in report

    # a second run is incremental: nothing is redone
    stamp = (a / "data" / "prepared" / "manifest.json").stat().st_mtime_ns
    again = sh("dvc", "repro", cwd=a)
    assert "didn't change, skipping" in again
    assert (a / "data" / "prepared" / "manifest.json").stat().st_mtime_ns == stamp

    # a fresh clone regenerates identical data
    b = tmp_path / "b"
    sh("git", "clone", "-q", str(a), str(b), cwd=tmp_path)
    sh("dvc", "repro", "prepare", cwd=b)
    assert manifest(b)["content_hash"] == first["content_hash"]

    # the default (local) remote: push from one clone, pull into another
    sh("git", "add", "dvc.lock", cwd=a)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", cwd=a)
    sh("dvc", "push", cwd=a)
    assert any((a / ".dvc-remote").rglob("*")), "the default remote lives in .dvc-remote/"
    c = tmp_path / "c"
    sh("git", "clone", "-q", str(a), str(c), cwd=tmp_path)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(a / ".dvc-remote"), cwd=c)
    sh("dvc", "pull", cwd=c)
    assert manifest(c) == first

    # An experiment is compared with the committed results, as the README says: its metrics are
    # read from the DVC cache through its dvc.lock (the metrics files are not in git).
    sh("dvc", "exp", "run", "evaluate", "-n", "budgeted", "-S", "+train.lambda2=0.8",
       "-S", "+train.mu=0.1", cwd=a)
    table = json.loads(sh("dvc", "exp", "show", "--json", cwd=a))
    rows = {row.get("name") or row["rev"]: row for row in table}
    head = rows["workspace"]  # the experiment was applied to the workspace
    baseline = next(row for name, row in rows.items() if name not in ("workspace",))
    experiment = baseline["experiments"][0]["revs"][0]
    assert experiment["name"] == "budgeted"
    for row in (baseline, experiment):
        figures = row["data"]["metrics"]["metrics/eval.json"]["data"]
        assert set(figures) == set(evaluation) and figures["gflops_mean"] > 0
    assert experiment["data"]["params"]["params.yaml"]["data"]["train"]["lambda2"] == 0.8
    assert head["data"]["metrics"] == experiment["data"]["metrics"]
    changed = sh("dvc", "exp", "show", "--only-changed", "--drop", ".*/.*", "--csv", cwd=a)
    columns = changed.splitlines()[0].split(",")
    assert {"train.lambda2", "train.mu"} <= set(columns) and "dataset" not in columns, columns
    diff = sh("dvc", "metrics", "diff", "--all", "HEAD", "budgeted", cwd=a)
    assert "metrics/eval.json" in diff and "miou" in diff
