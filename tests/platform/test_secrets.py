"""A tracking URI with a password never shows the password: not in what a command prints, not in
the checkpoint's spec.json (a DVC output that `dvc push` uploads), not in MLflow's params and
tags. The URI reaches `dynroute train` as a user gives it, through MLFLOW_TRACKING_URI (params.yaml
refuses a literal secret), and the server is a real `mlflow server`, which ignores the basic-auth
header the client sends with it.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
PASSWORD = "s3cr3t-pw-7f2a"  # a made-up secret to look for


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_written_or_printed(prepared, tmp_path):
    import subprocess

    from dynroute.platform.tracking.server import MlflowServer

    with MlflowServer(root=tmp_path / "mlruns") as server:
        uri = server.uri.replace("http://", f"http://alice:{PASSWORD}@")
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({
            "model": {"layers": 4, "base_channels": 4},
            "train": {"iterations": 4, "batch_size": 2, "crop": [64, 64],
                      "warmup_iterations": 1},
            "run": {"name": "pw", "storage": str(tmp_path / "runs"), "checkpoint_every": 4,
                    "log_every": 2},
            "tracking": {"uri": "local", "experiment": "secrets"}}))
        env = os.environ | {"MLFLOW_TRACKING_URI": uri,
                            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        res = subprocess.run([str(BIN / "dynroute"), "train", "--data", str(prepared),
                              "--params", str(params)], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "trained: 4 steps" in res.stdout
        assert PASSWORD not in res.stdout + res.stderr

        written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
        assert any(p.name == "spec.json" for p in written)
        for path in written:
            assert PASSWORD.encode() not in path.read_bytes(), f"{path} holds the password"
        spec = json.loads(next(p for p in written if p.name == "spec.json").read_text())
        assert spec["tracking"]["uri"].startswith("http://alice:")  # masked, not dropped

        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("secrets")
        (run,) = client.search_runs([experiment.experiment_id])
        recorded = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert PASSWORD not in recorded


def test_an_error_about_a_url_with_a_password_masks_it(tmp_path):
    """`--data` with a credential that leads nowhere: the error names the URL, not the secret."""
    import subprocess

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": "none"}}))
    res = subprocess.run([str(BIN / "dynroute"), "train", "--data",
                          f"http://bob:{PASSWORD}@127.0.0.1:9/prepared"], cwd=tmp_path,
                         text=True, capture_output=True, timeout=120)
    assert res.returncode == 1
    assert "bob:***@127.0.0.1:9/prepared" in res.stderr, res.stderr
    assert PASSWORD not in res.stdout + res.stderr


def test_mask_secrets_masks_every_url_in_a_text_and_leaves_the_rest():
    from dynroute.platform.url_secrets import mask_secrets

    text = (f"cannot reach postgresql://u:{PASSWORD}@db:5432/x?password={PASSWORD} nor "
            f"s3://bucket/key; no manifest under /tmp/s3:/k:{PASSWORD}@b/p at 10:20")
    masked = mask_secrets(text)
    assert PASSWORD not in masked
    assert "postgresql://u:***@db:5432/x?password=***" in masked
    assert "s3://bucket/key;" in masked and "at 10:20" in masked
    assert "/tmp/s3:/k:***@b/p" in masked, "a path keeps its form"
    assert mask_secrets("cannot load models:/m@nope") == "cannot load models:/m@nope"
