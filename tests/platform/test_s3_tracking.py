"""Tracking and checkpoints on S3: a real `mlflow server --artifacts-destination s3://…` over a real
S3-protocol server (`moto_server`) on 127.0.0.1, and a real tiny training tracked in it.

What landed in the bucket is listed with boto3 against the S3 endpoint, never through MLflow.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.tracking.client import ArtifactStoreError
from dynroute.platform.tracking.model_logging import load_network
from dynroute.platform.tracking.server import MlflowServer, MlflowServerError
from dynroute.platform.tracking.tracker import Tracker

BIN = Path(sys.executable).parent
BUCKET = "tracking"
DESTINATION = f"s3://{BUCKET}/mlflow"
# Tiny and quick: the point is where things land, not what the network learns.
MODEL = {"layers": 4, "base_channels": 4}  # 4: the least a routing space allows
TRAIN = {"iterations": 4, "batch_size": 4, "crop": [64, 64], "warmup_iterations": 1}


def write_params(path: Path, *, storage: str, uri: str, name: str, workers: int = 0) -> Path:
    path.write_text(yaml.safe_dump({
        "model": MODEL, "train": TRAIN,
        "run": {"name": name, "storage": storage, "workers": workers, "checkpoint_every": 2,
                "log_every": 2},
        "tracking": {"uri": uri, "experiment": "s3"},
    }))
    return path


def dynroute(*args: object, cwd: Path, env: dict[str, str],
             timeout: int = 400) -> subprocess.CompletedProcess:
    env = os.environ | env | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "dynroute"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# A tracked training whose artifacts go to S3


@pytest.fixture(scope="module")
def s3_mlflow(s3_server, tmp_path_factory) -> Iterator[MlflowServer]:
    s3_server.client().create_bucket(Bucket=BUCKET)
    # Only the server gets the S3 endpoint and credentials: clients upload through its proxy.
    with MlflowServer(root=tmp_path_factory.mktemp("mlflow-s3"), artifacts_destination=DESTINATION,
                      env=s3_server.env()) as server:
        yield server


@dataclass(frozen=True)
class TrackedTraining:
    run_id: str
    model_id: str
    checkpoint: Path  # the last checkpoint's state.pt (local storage)


@pytest.fixture(scope="module")
def tracked(s3_mlflow: MlflowServer, prepared: Path, tmp_path_factory) -> TrackedTraining:
    work = tmp_path_factory.mktemp("s3-train")
    params = write_params(work / "params.yaml", storage=str(work / "runs"), uri=s3_mlflow.uri,
                          name="s3-tracked")
    started = time.monotonic()
    res = dynroute("train", "--data", prepared, "--params", params, cwd=work, env={})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    print(f"tracked training took {time.monotonic() - started:.1f} s")
    client = MlflowClient(s3_mlflow.uri)
    experiment = client.get_experiment_by_name("s3")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    (model,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model.source_run_id == run.info.run_id
    return TrackedTraining(run_id=run.info.run_id, model_id=model.model_id,
                           checkpoint=work / "runs" / "s3-tracked" / "checkpoint_00000004"
                           / "state.pt")


def _key_prefix(server: MlflowServer, artifact_uri: str) -> str:
    """The bucket key prefix that a proxied artifact URI of `server` is stored under."""
    resolved = server.resolve_artifact_uri(artifact_uri)
    assert resolved.startswith(f"s3://{BUCKET}/mlflow/"), (artifact_uri, resolved)
    return resolved.removeprefix(f"s3://{BUCKET}/") + "/"


@pytest.mark.slow
def test_a_trained_model_lands_in_the_bucket(s3_mlflow, s3_server, tracked, tmp_path) -> None:
    client = MlflowClient(s3_mlflow.uri)
    model = client.get_logged_model(tracked.model_id)
    prefix = _key_prefix(s3_mlflow, model.artifact_location)
    keys = s3_server.keys(BUCKET, prefix)
    assert {f"{prefix}network.json", f"{prefix}weights.pt"} <= set(keys), keys
    assert not (s3_mlflow.root / "artifacts").exists(), "nothing may go to the local default"

    # The weights in the bucket are the trained ones: those of the last checkpoint.
    trained = torch.load(tracked.checkpoint, map_location="cpu", weights_only=True)["model"]
    body = s3_server.client().get_object(Bucket=BUCKET, Key=f"{prefix}weights.pt")["Body"]
    stored = torch.load(io.BytesIO(body.read()), map_location="cpu", weights_only=True)
    assert weights_equal(stored, trained)

    # A run artifact logged through the server also lands under the run's prefix, byte-exact.
    run = client.get_run(tracked.run_id)
    client.log_artifact(tracked.run_id, str(tracked.checkpoint), "checkpoint")
    run_prefix = _key_prefix(s3_mlflow, run.info.artifact_uri)
    key = f"{run_prefix}checkpoint/state.pt"
    assert key in s3_server.keys(BUCKET, run_prefix)
    body = s3_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == tracked.checkpoint.read_bytes()


@pytest.mark.slow
def test_the_registered_version_resolves_to_the_bucket(s3_mlflow, s3_server, tracked) -> None:
    mlflow.set_tracking_uri(s3_mlflow.uri)
    mlflow.set_registry_uri(s3_mlflow.uri)
    # how registry.register_front registers a logged model
    version = str(mlflow.register_model(f"models:/{tracked.model_id}", "dynroute-s3").version)
    client = MlflowClient(s3_mlflow.uri, registry_uri=s3_mlflow.uri)
    registered = client.get_model_version("dynroute-s3", version)
    assert registered.source == f"models:/{tracked.model_id}"
    assert registered.run_id == tracked.run_id
    prefix = _key_prefix(s3_mlflow,
                         client.get_model_version_download_uri("dynroute-s3", version))
    assert f"{prefix}weights.pt" in s3_server.keys(BUCKET, prefix)

    # Loading the registered version reads the bucket through the server: the trained weights.
    loaded, _ = load_network(f"models:/dynroute-s3/{version}", tracking_uri=s3_mlflow.uri)
    trained = torch.load(tracked.checkpoint, map_location="cpu", weights_only=True)["model"]
    assert weights_equal(loaded.state_dict(), trained)


# ---------------------------------------------------------------------------------------------
# A broken S3 destination fails fast, naming the endpoint and what to do


def test_an_unreachable_s3_endpoint_fails_fast_and_says_what_to_do(s3_server, tmp_path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    server = MlflowServer(root=tmp_path, artifacts_destination=DESTINATION,
                          env=s3_server.env() | {"MLFLOW_S3_ENDPOINT_URL": endpoint})
    started = time.monotonic()
    with pytest.raises(MlflowServerError) as caught:
        server.start()
    took = time.monotonic() - started
    message = str(caught.value)
    print(f"after {took:.1f} s: {message}")
    assert took < 20, f"took {took:.1f} s"
    assert f"S3 endpoint {endpoint} of artifacts destination {DESTINATION} is unreachable" in (
        message)
    assert "Start the S3 server, or set MLFLOW_S3_ENDPOINT_URL" in message
    assert "was not started" in message
    assert not server.running and not (tmp_path / "server.log").exists()


def test_a_missing_bucket_is_named_before_the_server_starts(s3_server, tmp_path) -> None:
    server = MlflowServer(root=tmp_path, artifacts_destination="s3://no-such-bucket/mlflow",
                          env=s3_server.env())
    with pytest.raises(MlflowServerError,
                       match=r"bucket 'no-such-bucket' .* does not exist at S3 endpoint "
                             rf"{s3_server.endpoint}; create it first"):
        server.start()
    assert not server.running


@pytest.mark.slow
def test_an_s3_outage_after_start_fails_an_upload_in_bounded_time(own_s3_server,
                                                                   tmp_path) -> None:
    own_s3_server.client().create_bucket(Bucket=BUCKET)
    artifact = tmp_path / "report.txt"
    artifact.write_text("lost")
    with MlflowServer(root=tmp_path / "server", artifacts_destination=DESTINATION,
                      env=own_s3_server.env()) as server:
        tracker = Tracker(uri=server.uri, experiment="outage")
        with tracker.run(run_name="outage"):
            tracker.log_artifact(artifact, "before")  # the destination works...
            own_s3_server.stop()  # ...until the S3 server goes away
            started = time.monotonic()
            with pytest.raises(ArtifactStoreError, match="could not store artifact") as caught:
                tracker.log_artifact(artifact, "after")
            took = time.monotonic() - started
            message = str(caught.value)
            assert "HTTP 500" in message and server.uri in message and "server.log" in message
            assert isinstance(caught.value, MlflowException)  # callers that catch MLflow's
            assert "too many 500 error responses" in str(caught.value.__cause__)
            with pytest.raises(ArtifactStoreError, match="could not store model 'model'"):
                config = NetworkConfig(layers=4, base_channels=4, num_classes=2)
                tracker.log_network(build_network(config), config)
        print(f"upload to a dead S3 endpoint failed after {took:.1f} s")
        # botocore's standard mode (3.1 s connect timeout, 3 tries) bounds it; legacy: minutes.
        assert took < 30, f"took {took:.1f} s"
        port = own_s3_server.endpoint.rsplit(":", 1)[1]
        assert f"port={port}" in server.log_tail(400), "the server's log names the endpoint"


# ---------------------------------------------------------------------------------------------
# Checkpoints of a Ray Train run on S3


@pytest.mark.slow
def test_ray_training_checkpoints_to_s3(s3_server, prepared, tmp_path) -> None:
    s3_server.client().create_bucket(Bucket="checkpoints")
    params = write_params(tmp_path / "params.yaml", storage="s3://checkpoints/runs",
                          uri="none", name="on-s3", workers=1)
    # The driver and the Ray workers it starts find the endpoint in AWS_ENDPOINT_URL_S3.
    res = dynroute("train", "--data", prepared, "--params", params, cwd=tmp_path,
                   env=s3_server.env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    keys = s3_server.keys("checkpoints", "runs/on-s3/")
    for step in (2, 4):
        assert f"runs/on-s3/checkpoint_{step:08d}/state.pt" in keys, keys
        assert f"runs/on-s3/checkpoint_{step:08d}/spec.json" in keys, keys
    body = s3_server.client().get_object(Bucket="checkpoints",
                                         Key="runs/on-s3/checkpoint_00000004/state.pt")["Body"]
    state = torch.load(io.BytesIO(body.read()), map_location="cpu", weights_only=False)
    assert state["step"] == 4
    assert not (tmp_path / "runs").exists(), "nothing may go to a local storage folder"
