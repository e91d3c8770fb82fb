"""Tests of `dynroute.platform.tracking.tracker` against a real `mlflow server` on 127.0.0.1.

Most tests share one module-scoped server; the lifecycle and start-failure tests start their own.
What the facade wrote is read back with MLflow's own client, never through the facade.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils import validation

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.metrics import LEARNING_RATE, LOSS_SEGMENTATION, MIOU
from dynroute.platform.tracking.client import MAX_PARAM_VALUE_CHARS
from dynroute.platform.tracking.metric_sender import MetricsNotDelivered
from dynroute.platform.tracking.model_logging import file_sha256, load_network
from dynroute.platform.tracking.server import MlflowServer, MlflowServerError
from dynroute.platform.tracking.tracker import Tracker, experiment_page

server_test = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(root=tmp_path_factory.mktemp("mlflow")) as running:
        print(f"mlflow server healthy after {running.start_seconds:.1f} s")
        yield running


@pytest.fixture
def client(server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


@pytest.fixture
def tracker(server: MlflowServer, request: pytest.FixtureRequest) -> Tracker:
    return Tracker(uri=server.uri, experiment=f"test-{request.node.name}", enabled=True)


def _health(uri: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri}/health", timeout=2) as answer:
            return answer.status
    except (urllib.error.URLError, OSError):
        return None


def _alive(pid: int) -> bool:
    """The pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# ---------------------------------------------------------------------------------------------
# The server


@server_test
def test_server_lifecycle(tmp_path: Path) -> None:
    server = MlflowServer(root=tmp_path)
    server.start()
    try:
        print(f"mlflow server healthy after {server.start_seconds:.1f} s")
        assert server.uri == f"http://127.0.0.1:{server.port}"
        assert _health(server.uri) == 200
        # The URI works for a client, and the default stores are under root.
        experiment_id = MlflowClient(server.uri).create_experiment("lifecycle")
        assert MlflowClient(server.uri).get_experiment(experiment_id).name == "lifecycle"
        assert (tmp_path / "mlflow.db").is_file()
        assert (tmp_path / "server.log").stat().st_size > 0
        leader = server.pid
        group = server.pids()
        assert leader in group and len(group) >= 2, group  # the CLI and its uvicorn worker
        assert os.getpgid(leader) == leader  # a process group of its own, not pytest's
    finally:
        server.stop()
    assert not server.running and server.pid is None
    assert [pid for pid in group if _alive(pid)] == []
    with pytest.raises(ProcessLookupError):
        os.kill(leader, 0)
    assert _health(server.uri) is None
    server.stop()  # a second stop is harmless


@server_test
def test_server_start_failure_quotes_the_log(tmp_path: Path) -> None:
    server = MlflowServer(root=tmp_path, backend_store_uri="bogus://nowhere")
    with pytest.raises(MlflowServerError, match=r"(?s)exited with code.*bogus://nowhere"):
        server.start()
    assert not server.running


def test_server_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MlflowServerError, match=f"port {port} .* in use"):
            MlflowServer(root=tmp_path, port=port).start()


# ---------------------------------------------------------------------------------------------
# Runs, params, metrics, artifacts, tags


@server_test
def test_run_roundtrip(tracker: Tracker, client: MlflowClient, tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text("hello")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.csv").write_text("1,2")
    with tracker.run(run_name="parent", tags={"purpose": "test"}) as run_id:
        assert tracker.run_id == run_id
        tracker.log_params({"train": {"lr": 0.1, "schedule": {"name": "poly"}}, "seed": 3})
        for step in range(5):
            tracker.log_metrics({LOSS_SEGMENTATION: 1.0 / (step + 1), MIOU: 0.1 * step},
                                step=step)
        tracker.log_artifact(report)
        tracker.log_artifact(tmp_path / "plots", artifact_path="plots")
        tracker.log_dict({"classes": ["a", "b"]}, "meta/classes.json")
        tracker.set_tags({"data_hash": "abc", "epochs": 5})
        with tracker.run(run_name="nested", nested_in_this_process=True) as nested_id:
            tracker.log_metrics({LEARNING_RATE: 0.01}, step=0)
    assert tracker.run_id is None

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "parent"
    assert run.data.params == {"train.lr": "0.1", "train.schedule.name": "poly", "seed": "3"}
    assert _history(client, run_id, LOSS_SEGMENTATION) == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert _history(client, run_id, MIOU) == [(s, 0.1 * s) for s in range(5)]
    assert {"purpose": "test", "data_hash": "abc", "epochs": "5"}.items() <= run.data.tags.items()
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.txt", "plots", "meta"} <= top
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/a.csv"]
    assert client.download_artifacts(run_id, "report.txt", str(tmp_path / "dl")).endswith(
        "report.txt")
    nested = client.get_run(nested_id)
    assert nested.data.tags["mlflow.parentRunId"] == run_id
    assert _history(client, nested_id, LEARNING_RATE) == [(0, 0.01)]
    assert nested.info.status == "FINISHED"


@server_test
def test_child_run_from_another_tracker(server: MlflowServer, tracker: Tracker,
                                        client: MlflowClient) -> None:
    parent_id = tracker.start_run(run_name="study")
    # A trial process has its own tracker and knows only the parent's id.
    trial = Tracker(uri=server.uri, experiment=tracker.experiment)
    with trial.run(run_name="trial-0", parent_run_id=parent_id) as child_id:
        trial.log_metrics({MIOU: 0.5}, step=1)
    tracker.end_run()
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.info.experiment_id == client.get_run(parent_id).info.experiment_id
    assert "mlflow.parentRunId" not in client.get_run(parent_id).data.tags


@server_test
def test_find_child_run_terminate_and_run_exists(server: MlflowServer, tracker: Tracker,
                                                client: MlflowClient) -> None:
    parents = [tracker.start_run(run_name="study")]
    other = Tracker(uri=server.uri, experiment=tracker.experiment)
    other_parent = other.start_run(run_name="other-study")
    trial = Tracker(uri=server.uri, experiment=tracker.experiment)
    mine = trial.start_run(run_name="t-001", parent_run_id=parents[0])
    trial.end_run("FAILED")
    theirs = trial.start_run(run_name="t-001", parent_run_id=other_parent)
    assert tracker.find_child_run(run_name="t-001", parent_run_id=parents[0]) == mine
    assert tracker.find_child_run(run_name="t-001", parent_run_id=other_parent) == theirs
    assert tracker.find_child_run(run_name="t-002", parent_run_id=parents[0]) is None
    assert tracker.find_child_run(run_name="it's", parent_run_id=parents[0]) is None
    # another process ends a run this tracker never started
    Tracker(uri=server.uri, experiment=tracker.experiment).terminate(theirs, "KILLED")
    assert client.get_run(theirs).info.status == "KILLED"
    with pytest.raises(ValueError, match="status"):
        tracker.terminate(theirs, "DONE")  # type: ignore[arg-type]
    assert tracker.run_exists(mine) and not tracker.run_exists("0" * 32)
    client.delete_run(mine)
    assert not tracker.run_exists(mine), "a deleted run does not count"
    trial.end_run()
    other.end_run()
    tracker.end_run()


@server_test
def test_copy_metrics_takes_the_history_up_to_a_step(server: MlflowServer, tracker: Tracker,
                                                     client: MlflowClient) -> None:
    source = Tracker(uri=server.uri, experiment=tracker.experiment)
    with source.run(run_name="prefix") as source_id:
        for step in (2, 4, 6):
            source.log_metrics({LOSS_SEGMENTATION: 1.0 / step, LEARNING_RATE: 0.1 * step},
                               step=step)
    with tracker.run(run_name="trial") as run_id:
        assert tracker.copy_metrics(source_id, up_to_step=4) == 4
        tracker.log_metrics({LOSS_SEGMENTATION: 0.1}, step=6)
    assert _history(client, run_id, LOSS_SEGMENTATION) == [(2, 0.5), (4, 0.25), (6, 0.1)]
    assert _history(client, run_id, LEARNING_RATE) == [(2, 0.2), (4, 0.4)]
    assert _history(client, source_id, LOSS_SEGMENTATION)[-1] == (6, 1.0 / 6), "source intact"


@server_test
def test_a_second_top_level_run_is_refused(tracker: Tracker) -> None:
    tracker.start_run(run_name="first")
    with pytest.raises(RuntimeError, match="still active"):
        tracker.start_run(run_name="second")
    tracker.end_run()


@server_test
def test_the_experiment_declares_itself_a_model_training_one(server: MlflowServer,
                                                             client: MlflowClient) -> None:
    """MLflow 3's experiment type tag (values from MLflow 3.17.2's UI bundle): set on an
    experiment the tracker creates, and on an existing one without a type or with one the UI only
    inferred; a type someone chose is left alone."""
    tag, training = "mlflow.experimentKind", "custom_model_development"
    existing = {"untyped": {}, "inferred": {tag: "genai_development_inferred"},
                "chosen": {tag: "genai_development"}}
    for name, tags in existing.items():
        client.create_experiment(f"kind-{name}", tags=tags)
    for name in ("new", *existing):
        with Tracker(uri=server.uri, experiment=f"kind-{name}").run(run_name="r"):
            pass
    kinds = {name: client.get_experiment_by_name(f"kind-{name}").tags.get(tag)
             for name in ("new", *existing)}
    assert kinds == {"new": training, "untyped": training, "inferred": training,
                     "chosen": "genai_development"}
    # the UI address of the runs in the Model training view (`dynroute ui` prints it)
    new = client.get_experiment_by_name("kind-new").experiment_id
    assert experiment_page(server.uri, "kind-new") == (
        f"{server.uri}/#/experiments/{new}/runs?workflowType=machine_learning")
    assert experiment_page(server.uri, "kind-absent") is None


@server_test
def test_exception_inside_run_marks_it_failed(tracker: Tracker, client: MlflowClient) -> None:
    with pytest.raises(ZeroDivisionError), tracker.run(run_name="doomed") as run_id:
        tracker.log_metrics({LOSS_SEGMENTATION: 2.0}, step=0)
        _ = 1 / 0
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert _history(client, run_id, LOSS_SEGMENTATION) == [(0, 2.0)]  # flushed before ending
    assert tracker.run_id is None


@server_test
def test_disabled_tracker_does_nothing(server: MlflowServer, client: MlflowClient,
                                       tmp_path: Path) -> None:
    for uri in (server.uri, None):
        tracker = Tracker(uri=uri, experiment="never-created", enabled=False)
        with tracker.run(run_name="rank1") as run_id:
            assert run_id is None
            tracker.log_params({"a": {"b": 1}})
            tracker.log_metrics({LOSS_SEGMENTATION: math.nan}, step=0)  # not even validated
            tracker.log_artifact(tmp_path / "missing.txt")
            tracker.log_dict({"a": 1}, "a.json")
            tracker.set_tags({"a": "b"})
            config = NetworkConfig(layers=4, base_channels=2, num_classes=2)
            assert tracker.log_network(build_network(config), config, name="m") is None
            tracker.flush()
        tracker.end_run()
    assert client.get_experiment_by_name("never-created") is None


def test_enabled_tracker_needs_a_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        Tracker(uri=None, experiment="x", enabled=True)


@server_test
def test_nan_and_inf_metrics_are_refused(tracker: Tracker, client: MlflowClient) -> None:
    with tracker.run(run_name="nan") as run_id:
        with pytest.raises(ValueError, match="'val_loss' is nan"):
            tracker.log_metrics({MIOU: 0.5, "val_loss": float("nan")}, step=0)
        with pytest.raises(ValueError, match="'grad_norm' is inf"):
            tracker.log_metrics({"grad_norm": np.float32("inf")}, step=1)
        with pytest.raises(TypeError, match="'miou' at step 3 is 'high'"):
            tracker.log_metrics({MIOU: "high"}, step=3)  # type: ignore[dict-item]
        tracker.log_metrics({MIOU: 0.25}, step=2)
    # The refused call logged nothing, not even its finite metric.
    assert _history(client, run_id, MIOU) == [(2, 0.25)]


@server_test
def test_metrics_survive_server_restarts(server: MlflowServer, tracker: Tracker,
                                         client: MlflowClient) -> None:
    uri = server.uri

    def value(step: int) -> float:
        return 0.5 + step / 1000

    step = 0

    def log(count: int) -> None:
        nonlocal step
        for _ in range(count):
            tracker.log_metrics({MIOU: value(step), LEARNING_RATE: float(step)}, step=step)
            step += 1

    run_id = tracker.start_run(run_name="restarts")
    log(10)
    tracker.flush(timeout=30)
    server.stop()
    log(10)  # the server is down
    with pytest.raises(MetricsNotDelivered, match="not yet delivered"):
        tracker.flush(timeout=0.5)
    down_until_ms = time.time() * 1000
    server.start()
    log(10)
    # restart() while the training keeps logging from this thread.
    restarter = threading.Thread(target=server.restart)
    restarter.start()
    while restarter.is_alive():
        log(1)
        time.sleep(0.05)
    restarter.join()
    log(5)
    tracker.flush(timeout=60)
    tracker.end_run()

    assert server.uri == uri
    assert step > 45  # some were logged during restart()
    history = client.get_metric_history(run_id, MIOU)
    assert [(m.step, m.value) for m in history] == [(s, value(s)) for s in range(step)]
    assert _history(client, run_id, LEARNING_RATE) == [(s, float(s)) for s in range(step)]
    # Replayed metrics keep the time they were logged at, not the time they arrived.
    assert all(m.timestamp < down_until_ms for m in history[10:20])
    assert client.get_run(run_id).info.status == "FINISHED"


@server_test
def test_metrics_the_server_rejects_are_reported(tracker: Tracker, client: MlflowClient) -> None:
    run_id = tracker.start_run(run_name="deleted")
    client.delete_run(run_id)
    tracker.log_metrics({MIOU: 0.5}, step=0)
    with pytest.raises(MetricsNotDelivered, match=f"rejected.*{run_id}"):
        tracker.flush(timeout=30)
    tracker.flush(timeout=5)  # reported once; the buffer is not stuck behind the bad batch


@server_test
def test_artifacts_go_to_an_s3_destination(s3_server, tmp_path: Path) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket="mlflow-artifacts")
    # Only the server talks to S3 (proxied artifacts); the client needs no credentials.
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    report = tmp_path / "report.txt"
    report.write_text("on s3")
    with MlflowServer(root=tmp_path / "server", artifacts_destination="s3://mlflow-artifacts/runs",
                      env=env) as server:
        tracker = Tracker(uri=server.uri, experiment="s3")
        with tracker.run(run_name="s3") as run_id:
            tracker.log_artifact(report, artifact_path="reports")
        client = MlflowClient(server.uri)
        assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]
        assert Path(client.download_artifacts(run_id, "reports/report.txt",
                                              str(tmp_path / "dl"))).read_text() == "on s3"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.startswith("runs/") and k.endswith(f"{run_id}/artifacts/reports/report.txt")
               for k in keys), keys
    assert not (tmp_path / "server" / "artifacts").exists()


# ---------------------------------------------------------------------------------------------
# Params


def test_param_limit_is_mlflows() -> None:
    assert MAX_PARAM_VALUE_CHARS == validation.MAX_PARAM_VAL_LENGTH


@server_test
def test_many_and_long_params(tracker: Tracker, client: MlflowClient) -> None:
    params: dict[str, object] = {f"p{i:03d}": i for i in range(150)}
    params["medium"] = "m" * 600  # over the 500 of older MLflow docs, within 3.17's 6000
    params["long"] = "x" * 5000 + "y" * 2000
    with tracker.run(run_name="params") as run_id:
        tracker.log_params(params)
    logged = client.get_run(run_id).data.params
    assert len(logged) == 152
    assert all(logged[f"p{i:03d}"] == str(i) for i in range(150))
    assert logged["medium"] == "m" * 600
    assert len(logged["long"]) == MAX_PARAM_VALUE_CHARS
    assert logged["long"].startswith("x" * 5000) and logged["long"].endswith(
        "...[truncated 7000 chars]")


# ---------------------------------------------------------------------------------------------
# Models and the registry


@server_test
def test_a_network_is_logged_as_data_and_loads_back_equal(tracker: Tracker, tmp_path) -> None:
    config = NetworkConfig(layers=4, base_channels=4, num_classes=3)
    torch.manual_seed(0)
    network = build_network(config).eval()
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = network(image).logits
    with tracker.run(run_name="model") as run_id:
        started = time.monotonic()
        model_uri = tracker.log_network(network, config, name="tiny")
        print(f"log_network took {time.monotonic() - started:.2f} s")
    assert model_uri is not None and model_uri.startswith("models:/")

    # Two files, neither of which needs unpickling: JSON and a tensors-only state dict.
    recorded = MlflowClient(tracker.uri).get_logged_model(model_uri.removeprefix("models:/"))
    folder = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=recorded.artifact_location, dst_path=str(tmp_path),
        tracking_uri=tracker.uri))
    assert sorted(p.name for p in folder.iterdir()) == ["network.json", "weights.pt"]
    assert json.loads((folder / "network.json").read_text())["network"]["layers"] == 4
    torch.load(folder / "weights.pt", weights_only=True)
    assert recorded.source_run_id == run_id
    assert recorded.tags["weights_sha256"] == file_sha256(folder / "weights.pt")

    loaded, record = load_network(model_uri, tracking_uri=tracker.uri)
    assert record.run_id == run_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(image).logits, expected)
    # runs:/<run>/<name> finds the same model.
    again, _ = load_network(f"runs:/{run_id}/tiny", tracking_uri=tracker.uri)
    with torch.no_grad():
        torch.testing.assert_close(again(image).logits, expected)


# ---------------------------------------------------------------------------------------------
# Helpers
