"""Logging and loading networks with MLflow as data only: the model half of the facade.

A logged network is an MLflow LoggedModel (`models:/<model_id>`, its `source_run_id` the run that
trained it) whose artifacts are two files, neither of which can run code when read:

* `network.json`: the format (`dynroute-network/1`) and the `NetworkConfig` that rebuilds the
  modules with `build_network`;
* `weights.pt`: the state dict, tensors only, read back with torch's `weights_only` loader.

The SHA-256 of `weights.pt` is recorded in the tracking server's database, apart from the artifact
store: as the logged model's tag `weights_sha256` and, once registered, as the version's tag of the
same name (`registry/register.py`). Loading recomputes it and refuses a file that differs, naming
the version and the file (docs/platform.md, "Models are data").

Models logged by earlier releases in MLflow's pytorch flavour are pickles: unpickling one runs
whatever code it carries, so they are refused with the command that converts a trusted one
(`registry/convert.py`). Importing this room turns MLflow's own pickle loading off for the process
and the processes it starts (`MLFLOW_ALLOW_PICKLE_DESERIALIZATION`, in `tracking/__init__.py`).

MLflow 3.17 facts this module relies on (checked in the installed source):

* `MlflowClient.create_logged_model` / `log_model_artifacts` / `finalize_logged_model` make a
  LoggedModel from files, with no flavour and no pickle; `runs:/<run>/<name>` resolves to the
  newest logged model of that name whose source run is `<run>`.
* `mlflow.artifacts.download_artifacts` resolves a `models:/` URI through the process-wide
  registry URI, whatever `tracking_uri` it is given; so models are downloaded from their logged
  model's `artifact_location` (`mlflow-artifacts:/…` through the server, or the store's URI).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.tracking.client import mlflow_client

__all__ = [
    "FORMAT",
    "NETWORK_FILE",
    "TAG_FORMAT",
    "TAG_WEIGHTS_SHA256",
    "WEIGHTS_FILE",
    "LegacyModelError",
    "ModelLoadError",
    "RecordedModel",
    "file_sha256",
    "load_network",
    "log_network",
    "network_config_from_params",
    "recorded_model",
]

FORMAT = "dynroute-network/1"
NETWORK_FILE = "network.json"
WEIGHTS_FILE = "weights.pt"
TAG_FORMAT = "dynroute.format"
TAG_WEIGHTS_SHA256 = "weights_sha256"
MODEL_TYPE = "dynroute-network"


class ModelLoadError(ValueError):
    """A model that cannot be loaded or is refused; the message names it and what to do."""


class LegacyModelError(ModelLoadError):
    """A model in MLflow's pickle format, which dynroute no longer loads."""


def file_sha256(path: Path, *, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _config_dict(config: NetworkConfig) -> dict:
    if config.route is not None:
        raise ValueError(f"a network restricted to route {config.route.name!r} cannot be logged: "
                         f"a logged network is the whole routing space of its NetworkConfig")
    data = asdict(config)
    del data["route"]
    return data


def log_network(network: torch.nn.Module, config: NetworkConfig, *, tracking_uri: str,
                experiment_id: str, run_id: str, name: str) -> str:
    """Log `network` (built from `config`) to run `run_id` as a data-only LoggedModel.

    Args:
        network: the trained modules; their state dict is saved, on the CPU.
        config: what `build_network` rebuilds them from (the whole routing space).
        tracking_uri: the server holding the run.
        experiment_id: the run's experiment, where the logged model is put beside its run.
        run_id: the run that trained it (`runs:/<run_id>/<name>` finds the model).
        name: the model's name within the run.

    Returns:
        The model URI, `models:/<model_id>`.
    """
    described = {"format": FORMAT, "network": _config_dict(config)}
    state = {key: value.detach().cpu() for key, value in network.state_dict().items()}
    client = mlflow_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dynroute-model-") as tmp:
        folder = Path(tmp)
        torch.save(state, folder / WEIGHTS_FILE)
        (folder / NETWORK_FILE).write_text(json.dumps(described, indent=2))
        sha = file_sha256(folder / WEIGHTS_FILE)
        model = client.create_logged_model(
            experiment_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
            tags={TAG_FORMAT: FORMAT, TAG_WEIGHTS_SHA256: sha})
        try:
            client.log_model_artifacts(model.model_id, str(folder))
        except BaseException:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return f"models:/{model.model_id}"


@dataclass(frozen=True)
class RecordedModel:
    """What the tracking server's database says about a model URI: the logged model it names
    (its id, training run and artifact location), the weights' SHA-256 recorded for it (None for
    a model logged before the data-only format) and, for a registered version, which one."""

    uri: str
    model_id: str
    run_id: str | None
    artifact_location: str
    sha256: str | None
    described: str  # e.g. "version 3 of dynroute-synthetic"
    version: object | None = None


def _logged_model_of_run(client: MlflowClient, run_id: str, name: str):
    experiment = client.get_run(run_id).info.experiment_id
    token = None
    while True:
        page = client.search_logged_models(experiment_ids=[experiment],
                                           filter_string=f"name = '{name}'", page_token=token)
        for model in page:  # newest first, as MLflow resolves runs:/ URIs
            if model.source_run_id == run_id:
                return model
        if not page.token:
            return None
        token = page.token


def _logged_model_of_version(client: MlflowClient, version, described: str):
    """The logged model a registered version serves: its `model_id`, else its source's."""
    source = version.source or ""
    if version.model_id or source.startswith("models:/"):
        return client.get_logged_model(version.model_id or source.removeprefix("models:/"))
    if source.startswith("runs:/"):
        run_id, _, name = source.removeprefix("runs:/").partition("/")
        logged = _logged_model_of_run(client, run_id, name or "model")
        if logged is not None:
            return logged
    raise ModelLoadError(f"{described} serves {source or 'nothing'}, not a logged model; "
                         f"register the model again from the run that trained it")


def recorded_model(model_uri: str, *, tracking_uri: str) -> RecordedModel:
    """The database's record of `model_uri` (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
    `models:/<model_id>` or `runs:/<run>/<name>`).

    Raises:
        ModelLoadError: the URI names nothing on the server, or the server cannot be reached.
    """
    client = mlflow_client(tracking_uri)
    version, sha = None, None
    try:
        if model_uri.startswith("runs:/"):
            run_id, _, name = model_uri.removeprefix("runs:/").partition("/")
            logged = _logged_model_of_run(client, run_id, name or "model")
            if logged is None:
                raise ModelLoadError(f"run {run_id} has no logged model {name!r}")
            described = f"model {name!r} of run {run_id}"
        else:
            rest = model_uri.removeprefix("models:/")
            if "@" in rest:
                version = client.get_model_version_by_alias(*rest.split("@", 1))
            elif "/" in rest:
                version = client.get_model_version(*rest.split("/", 1))
            if version is None:
                logged, described = client.get_logged_model(rest), f"logged model {rest}"
            else:
                described = f"version {version.version} of {version.name}"
                logged = _logged_model_of_version(client, version, described)
                sha = version.tags.get(TAG_WEIGHTS_SHA256)
    except MlflowException as err:
        raise ModelLoadError(f"cannot find model {model_uri} on {tracking_uri}: "
                             f"{err.message}") from None
    return RecordedModel(model_uri, logged.model_id, logged.source_run_id,
                         logged.artifact_location, sha or logged.tags.get(TAG_WEIGHTS_SHA256),
                         described, version)


def _legacy(record: RecordedModel) -> LegacyModelError:
    return LegacyModelError(
        f"{record.uri} ({record.described}) was logged in MLflow's pickle format by an earlier "
        f"dynroute; unpickling runs whatever code the file carries, so it is not loaded. If you "
        f"trust where it came from, convert it once: `dynroute model convert {record.uri} "
        f"--trust-pickle` (it logs the weights as data and registers them as a new version)")


def load_network(model_uri: str, *, tracking_uri: str) -> tuple[torch.nn.Module, RecordedModel]:
    """(network in eval mode on the CPU, its record) for a logged or registered network.

    The weights file must match the SHA-256 the server recorded for it; nothing is unpickled.

    Raises:
        LegacyModelError: a model logged in MLflow's pickle format (says how to convert it).
        ModelLoadError: unknown URI, unreachable server, a changed or unreadable weights file.
    """
    record = recorded_model(model_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dynroute-model-") as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=record.artifact_location, dst_path=tmp,
                tracking_uri=tracking_uri))
        except MlflowException as err:
            raise ModelLoadError(f"cannot download model {model_uri} from {tracking_uri}: "
                                 f"{err.message}") from None
        if not (folder / NETWORK_FILE).is_file():
            if (folder / "MLmodel").is_file():
                raise _legacy(record)
            raise ModelLoadError(f"{model_uri} ({record.described}) has no {NETWORK_FILE}: it "
                                 f"is not a network logged by dynroute")
        weights = folder / WEIGHTS_FILE
        if record.sha256 is None:
            raise ModelLoadError(f"{model_uri} ({record.described}): the server records no "
                                 f"SHA-256 for its {WEIGHTS_FILE}, so it cannot be checked; "
                                 f"log it again with dynroute")
        actual = file_sha256(weights) if weights.is_file() else "missing"
        if actual != record.sha256:
            raise ModelLoadError(
                f"refused {model_uri}: {WEIGHTS_FILE} of {record.described} has SHA-256 "
                f"{actual[:16]}…, but the server recorded {record.sha256[:16]}… when it was "
                f"logged: the file in the artifact store was changed. Register the model again "
                f"from the run that trained it")
        try:
            described = json.loads((folder / NETWORK_FILE).read_text())
            if described.get("format") != FORMAT:
                raise ValueError(f"format {described.get('format')!r}, expected {FORMAT!r}")
            config = NetworkConfig.from_dict(described["network"], source=NETWORK_FILE)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            network = build_network(config)
            network.load_state_dict(state)
        except Exception as err:
            raise ModelLoadError(f"cannot load {model_uri} ({record.described}): "
                                 f"{type(err).__name__}: {err}".splitlines()[0]) from None
    network.config = config
    return network.eval(), record


def network_config_from_params(params: dict[str, str], *, source: str) -> NetworkConfig:
    """The `NetworkConfig` a training run logged as its `model.*` params (strings, as MLflow keeps
    them), for a model whose files do not say it (one logged in the pickle format)."""
    values = {}
    for field in fields(NetworkConfig):
        key = f"model.{field.name}"
        if field.name == "route" or key not in params:
            continue
        text, default = params[key], field.default
        if isinstance(default, bool):
            values[field.name] = text == "True"
        else:
            values[field.name] = type(default)(text)
    if "layers" not in values:
        raise ModelLoadError(f"{source} logged no model.* params, so the network it trained "
                             f"cannot be rebuilt")
    return NetworkConfig.from_dict(values, source=source)
