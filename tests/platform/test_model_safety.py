"""A registered model is data, never code: what `dynroute predict --model models:/…` loads from the
registry is a JSON config and a tensors-only weights file whose SHA-256 the registry recorded.

Probes, as an attacker who can write to the artifact store (or a user with an old registry) would
try them, each against a real MLflow server on 127.0.0.1 and the installed `dynroute` command:
- the weights file of a registered version replaced by a pickle that runs a command: refused by
  the SHA-256 check, naming the version and the file, and the command never runs;
- the same with the version's recorded SHA-256 changed to match: still refused (torch's weights-only
  reader), and the command never runs;
- a model an earlier release logged in MLflow's pickle format: refused with the command that
  converts it, even when its pickle carries a payload; MLflow's own pickle loading is off in our
  processes; `dynroute model convert --trust-pickle` re-saves a trusted one as a new version that
  takes over its aliases and predicts the same;
- registering a trial whose model is in the pickle format: refused with the same way out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.pareto.analysis import Point, write_front
from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.register import register_front
from dynroute.platform.tracking.model_logging import file_sha256, load_network
from dynroute.platform.tracking.provenance import flatten
from dynroute.platform.tracking.server import MlflowServer
from dynroute.platform.tracking.tracker import Tracker

BIN = Path(sys.executable).parent
CONFIG = NetworkConfig(layers=4, base_channels=4, num_classes=19)
pytestmark = pytest.mark.slow  # one MLflow server for the module


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@dataclass(frozen=True)
class Registry:
    root: Path
    server: MlflowServer
    params: Path
    image: Path


def dynroute(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dynroute"), *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def client_of(server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("models")
    image = root / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)).save(image)
    with MlflowServer(root=root / "mlruns") as server:
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump({"data": {"dataset": "cityscapes"},
                                          "tracking": {"uri": server.uri,
                                                       "experiment": "safety"}}))
        yield Registry(root=root, server=server, params=params, image=image)


def log_trained_run(server: MlflowServer, *, seed: int, pickled: bool) -> tuple[str, str]:
    """(run id, model id) of a run that trained a tiny network and logged it, as data or, like
    earlier releases did, in MLflow's pickle format; its params say the network, as training's."""
    torch.manual_seed(seed)
    network = build_network(CONFIG).eval()
    tracker = Tracker(uri=server.uri, experiment="safety")
    with tracker.run(run_name=f"trial-{seed}") as run_id:
        tracker.log_params(flatten({"model": asdict(CONFIG) | {"route": None}}))
        if not pickled:
            uri = tracker.log_network(network, CONFIG)
        else:
            mlflow.set_tracking_uri(server.uri)
            experiment = client_of(server).get_run(run_id).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment)
            uri = mlflow.pytorch.log_model(network, name="model", run_id=run_id,
                                           serialization_format="pickle",
                                           pip_requirements=["torch"]).model_uri
    return run_id, uri.removeprefix("models:/")


def register(server: MlflowServer, name: str, run_id: str, model_id: str, alias: str) -> str:
    """A version made as MLflow registers one by hand (no dynroute tags), with `alias`."""
    client = client_of(server)
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                          model_id=model_id).version
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def register_with_dynroute(server: MlflowServer, tmp: Path, name: str, run_id: str) -> str:
    """Register a one-model front with `register_front`, as the register stage does."""
    point = Point("t0", 0.5, 1.0, {
        "number": 0, "study": "s", "state": "COMPLETE", "params": {}, "lambda2": 0.1,
        "mu": 0.1, "iterations": 4, "gflops_max": 1.0, "gflops_min": 1.0,
        "cost_resolution": [32, 64], "checkpoint": None, "mlflow_run_id": run_id,
        "model_uri": f"runs:/{run_id}/model", "data_hash": "h" * 64, "git_commit": "g" * 40,
        "dataset": "cityscapes"})
    pareto = tmp / "pareto.json"
    write_front(pareto, pareto.with_suffix(".csv"), [point])
    state = register_front(pareto, tracking_uri=server.uri, name=name)
    return state.versions[0].version


def artifact_file(server: MlflowServer, model_id: str, name: str) -> Path:
    (found,) = [p for p in server.root.rglob(name) if model_id in p.parts]
    return found


def predict(registry: Registry, model: str, out: Path) -> subprocess.CompletedProcess:
    return dynroute("predict", "--model", model, registry.image, "--out", out, "--params",
                    registry.params, cwd=registry.root)


def test_a_registered_version_records_its_weights_and_predicts(registry, tmp_path):
    run_id, model_id = log_trained_run(registry.server, seed=0, pickled=False)
    version = register_with_dynroute(registry.server, tmp_path, "genuine", run_id)
    recorded = client_of(registry.server).get_model_version("genuine", version)
    weights = artifact_file(registry.server, model_id, "weights.pt")
    assert recorded.tags["weights_sha256"] == file_sha256(weights)
    result = predict(registry, "models:/genuine@knee", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "predictions.json").is_file()


def test_a_replaced_weights_file_is_refused_and_its_code_never_runs(registry, tmp_path):
    run_id, model_id = log_trained_run(registry.server, seed=1, pickled=False)
    version = register_with_dynroute(registry.server, tmp_path, "tampered", run_id)
    marker = tmp_path / "ran"
    weights = artifact_file(registry.server, model_id, "weights.pt")
    torch.save({"extra": Payload(marker)}, weights)

    result = predict(registry, "models:/tampered@knee", tmp_path / "out")
    assert result.returncode == 1
    assert f"version {version} of tampered" in result.stderr and "weights.pt" in result.stderr
    assert "SHA-256" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()

    # An attacker who can also rewrite the recorded SHA-256: the weights-only reader refuses.
    client_of(registry.server).set_model_version_tag("tampered", version, "weights_sha256",
                                                     file_sha256(weights))
    result = predict(registry, "models:/tampered@knee", tmp_path / "out")
    assert result.returncode == 1 and "cannot load models:/tampered@knee" in result.stderr
    assert not marker.exists()


def test_a_pickled_model_is_refused_and_converted_only_when_trusted(registry, tmp_path):
    run_id, model_id = log_trained_run(registry.server, seed=2, pickled=True)
    version = register(registry.server, "legacy", run_id, model_id, alias="knee")

    refused = predict(registry, "models:/legacy@knee", tmp_path / "out")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "pickle format" in refused.stderr
    assert "dynroute model convert models:/legacy@knee --trust-pickle" in refused.stderr

    # MLflow's own loader is off in a process that imported dynroute's tracking.
    probe = subprocess.run(
        [sys.executable, "-c", "import dynroute.platform.tracking, mlflow.pytorch; "
         f"mlflow.set_tracking_uri({registry.server.uri!r}); "
         "mlflow.pytorch.load_model('models:/legacy@knee')"],
        capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "pickle is disallowed" in probe.stderr

    not_trusted = dynroute("model", "convert", "models:/legacy@knee", "--params",
                           registry.params, cwd=registry.root)
    assert not_trusted.returncode == 1 and "--trust-pickle" in not_trusted.stderr

    converted = dynroute("model", "convert", "models:/legacy@knee", "--trust-pickle",
                         "--params", registry.params, cwd=registry.root)
    assert converted.returncode == 0, converted.stderr[-2000:]
    client = client_of(registry.server)
    new = client.get_model_version_by_alias("legacy", "knee")
    assert int(new.version) == int(version) + 1 and new.tags["weights_sha256"]
    assert client.get_model_version("legacy", version).tags["converted_to"] == new.version

    torch.manual_seed(2)
    original = build_network(CONFIG).eval()
    loaded, _ = load_network("models:/legacy@knee", tracking_uri=registry.server.uri)
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image).logits, original(image).logits)
    assert predict(registry, "models:/legacy@knee", tmp_path / "out").returncode == 0

    again = dynroute("model", "convert", f"models:/legacy/{new.version}", "--trust-pickle",
                     "--params", registry.params, cwd=registry.root)
    assert again.returncode == 1 and "already logged as data" in again.stderr


def test_a_payload_in_a_pickled_model_never_runs(registry, tmp_path):
    run_id, model_id = log_trained_run(registry.server, seed=3, pickled=True)
    register(registry.server, "planted", run_id, model_id, alias="knee")
    marker = tmp_path / "ran"
    torch.save(Payload(marker), artifact_file(registry.server, model_id, "model.pth"))
    result = predict(registry, "models:/planted@knee", tmp_path / "out")
    assert result.returncode == 1 and "pickle format" in result.stderr
    assert not marker.exists()


def test_registering_a_pickled_trial_model_says_how_to_convert_it(registry, tmp_path):
    run_id, _ = log_trained_run(registry.server, seed=4, pickled=True)
    with pytest.raises(RegistryError, match=r"dynroute model convert runs:/\w+/model "
                                            r"--trust-pickle"):
        register_with_dynroute(registry.server, tmp_path, "old-study", run_id)
