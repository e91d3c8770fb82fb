"""`dynroute model convert`: re-save a trusted model of MLflow's pickle format as data.

Earlier releases logged networks with MLflow's pytorch flavour, a pickle; dynroute now refuses to
load those (`tracking/model_logging.py`). A user who trusts where such a model came from converts
it once: the pickle is loaded (the only place dynroute unpickles anything, and only when asked
with `--trust-pickle`), the network is rebuilt from the `model.*` params of the run that trained
it, the old weights must fit it exactly, and the weights are logged to that run as a data-only
model. A registered version is replaced by a new version of the same registered model, with the
old version's tags, the weights' SHA-256, and the old version's aliases; the old version keeps its
number, loses its aliases and is tagged `converted_to=<new version>` and `pareto=false`, so the
`register` stage never picks it again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlflow
import mlflow.pytorch
from mlflow.exceptions import MlflowException

from dynroute.models import build_network
from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.register import TAG_CONVERTED_TO
from dynroute.platform.registry.registered_versions import TAG_PARETO, registry_client
from dynroute.platform.tracking.model_logging import (
    TAG_WEIGHTS_SHA256,
    ModelLoadError,
    log_network,
    network_config_from_params,
    recorded_model,
)

__all__ = ["Converted", "convert_model"]

PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


@dataclass
class Converted:
    """What `convert_model` did: the data-only model it logged and, for a registered version,
    the version that replaces it and the aliases that moved."""

    source: str
    model_uri: str
    registered: str | None = None
    old_version: str | None = None
    new_version: str | None = None
    aliases: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _pickles_allowed() -> Iterator[None]:
    """MLflow's pickle loading, on for one trusted load only."""
    before = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PICKLE_SWITCH]
        else:
            os.environ[PICKLE_SWITCH] = before


def convert_model(source: str, *, tracking_uri: str, trust_pickle: bool) -> Converted:
    """Convert the pickled model `source` (`models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `models:/<id>` or `runs:/<run>/model`) to the data-only format.

    Raises:
        RegistryError: not trusted, already data-only, no training run to rebuild it from, or
            weights that do not fit the network the run describes.
    """
    if not trust_pickle:
        raise RegistryError(f"converting {source} unpickles it, which runs any code it carries: "
                            f"pass --trust-pickle if you trust where it came from")
    try:
        record = recorded_model(source, tracking_uri=tracking_uri)
    except ModelLoadError as err:
        raise RegistryError(str(err)) from None
    if record.sha256 is not None:
        raise RegistryError(f"{source} ({record.described}) is already logged as data; "
                            f"nothing to convert")
    if record.run_id is None:
        raise RegistryError(f"{source} ({record.described}) names no training run, whose "
                            f"model.* params would say which network to rebuild")
    client = registry_client(tracking_uri)
    try:
        run = client.get_run(record.run_id)
        # MLflow's loader resolves URIs through the process-wide tracking URI.
        mlflow.set_tracking_uri(tracking_uri)
        with _pickles_allowed():
            pickled = mlflow.pytorch.load_model(record.artifact_location, map_location="cpu")
    except MlflowException as err:
        raise RegistryError(f"cannot read {source} from {tracking_uri}: {err.message}") from None
    try:
        config = network_config_from_params(run.data.params, source=f"run {record.run_id}")
        network = build_network(config)
        network.load_state_dict(pickled.state_dict())
    except (ValueError, RuntimeError) as err:
        raise RegistryError(f"{source}: its weights do not fit the network run {record.run_id} "
                            f"logged: {err}".splitlines()[0]) from None
    model_uri = log_network(network, config, tracking_uri=tracking_uri,
                            experiment_id=run.info.experiment_id, run_id=record.run_id,
                            name="model")
    done = Converted(source=source, model_uri=model_uri)
    old = record.version
    if old is None:
        return done
    sha = recorded_model(model_uri, tracking_uri=tracking_uri).sha256
    tags = dict(old.tags) | {TAG_WEIGHTS_SHA256: sha}
    new = client.create_model_version(old.name, source=model_uri, run_id=record.run_id,
                                      tags=tags, description=old.description,
                                      model_id=model_uri.removeprefix("models:/"))
    done.registered, done.old_version, done.new_version = old.name, str(old.version), \
        str(new.version)
    for alias in old.aliases:
        client.set_registered_model_alias(old.name, alias, new.version)
        done.aliases.append(alias)
    client.set_model_version_tag(old.name, old.version, TAG_CONVERTED_TO, str(new.version))
    client.set_model_version_tag(old.name, old.version, TAG_PARETO, "false")
    return done
