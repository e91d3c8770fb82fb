"""`dynroute` as a user runs it: the installed console script, in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynroute.models import NetworkConfig, Route, build_network
from dynroute.models.static_routes import STATIC_ROUTES
from dynroute.models.summary import summarize

DYNROUTE = shutil.which("dynroute", path=str(Path(sys.executable).parent)) or "dynroute"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # Wide enough that the error panel does not break a long path (a temporary folder under
    # pytest-xdist) across its lines.
    env = os.environ | {"COLUMNS": "400"}
    return subprocess.run([DYNROUTE, *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_model_summary_json_reports_params_and_gflops():
    res = run("model", "summary", "--layers", "4", "--base-channels", "8", "--size", "256x512",
              "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert isinstance(report["params"], int) and isinstance(report["gflops"], float)
    want = summarize(build_network(NetworkConfig(layers=4, base_channels=8)), 256, 512)
    assert report["params"] == want["params"]
    assert report["gflops"] == pytest.approx(want["gflops"])
    parts = report["breakdown"]
    assert set(parts) == {"stem", "init_cell", "cells", "gates", "transforms", "decoder", "head"}
    counted = sum(p["gflops"] for p in parts.values() if p["counted"])
    assert counted == pytest.approx(report["gflops"])
    assert sum(p["params"] for p in parts.values()) == report["params"]


def test_model_summary_options_change_the_cost():
    def gflops(*extra):
        res = run("model", "summary", "--layers", "4", "--base-channels", "8", "--json", *extra)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["gflops"]

    base = gflops()
    assert gflops("--small-gate") < base
    assert gflops("--gate", "fixed") < gflops("--small-gate")
    assert gflops("--psp") > base
    assert gflops("--cell", "sep3") > base > gflops("--cell", "sep1")
    assert gflops("--size", "512x1024") == pytest.approx(base / 4, rel=1e-3)  # but 1×1 gate convs
    assert gflops("--route", "fcn-32s") < gflops("--gate", "fixed")


def test_model_summary_text_names_every_part():
    res = run("model", "summary", "--layers", "4", "--route", "unet")
    assert res.returncode == 0, res.stderr
    for word in ("stem", "cells", "gates", "decoder", "total", "C_all", "route unet"):
        assert word in res.stdout


def test_route_files_work_like_named_routes(tmp_path):
    out = tmp_path / "unet.yaml"
    assert run("model", "route", "unet", "--layers", "6", "--out", str(out)).returncode == 0
    assert Route.load(out).paths == STATIC_ROUTES["unet"](6).paths
    by_file = json.loads(run("model", "summary", "--route", str(out), "--json").stdout)
    by_name = json.loads(run("model", "summary", "--route", "unet", "--layers", "6",
                             "--json").stdout)
    assert by_file["gflops"] == by_name["gflops"] and by_file["params"] == by_name["params"]


@pytest.mark.parametrize("args, message", [
    (["--size", "1024"], "HxW"),
    (["--size", "0x10"], "HxW"),
    (["--route", "no-such-route"], "neither a named route"),
    (["--cell", "conv5"], "sep2"),
    (["--layers", "3"], "at least 4"),
])
def test_model_summary_bad_input_gets_a_clear_error(args, message):
    res = run("model", "summary", *args)
    assert res.returncode != 0
    assert message in " ".join(res.stderr.split())


def test_broken_route_file_is_named_in_the_error(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"layers": 4, "paths": ["0:0:keep"]}')
    res = run("model", "summary", "--route", str(bad))
    assert res.returncode != 0
    assert "broken.json" in " ".join(res.stderr.split())


def test_settings_show_every_endpoint_with_the_environment_winning_and_secrets_masked(tmp_path):
    import os

    (tmp_path / "params.yaml").write_text(
        "tune:\n  storage: postgresql://optuna:${DB_PASSWORD}@127.0.0.1:5432/optuna\n")
    env = os.environ | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999",
                        "DB_PASSWORD": "hunter2-secret", "AWS_SECRET_ACCESS_KEY": "s3-secret"}
    res = subprocess.run([DYNROUTE, "settings"], capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert "http://127.0.0.1:5999" in res.stdout and "MLFLOW_TRACKING_URI" in res.stdout
    assert "postgresql://optuna:***@127.0.0.1:5432/optuna" in res.stdout
    assert "hunter2" not in res.stdout + res.stderr and "s3-secret" not in res.stdout

    (tmp_path / "params.yaml").write_text(
        "tune:\n  storage: postgresql://optuna:plaintext@127.0.0.1:5432/optuna\n")
    refused = subprocess.run([DYNROUTE, "settings"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert refused.returncode == 1 and "tune.storage" in refused.stderr
    assert "plaintext" not in refused.stderr
