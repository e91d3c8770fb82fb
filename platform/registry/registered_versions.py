"""The registered model's versions read back as their tags describe them (the read half of the
registry; `register.py` writes them).

`read_versions` is what `registry.selection` picks a model from; `register.register_front` uses the
same client, listing and description to report what it left. With `register.py` and `tracker.py`,
one of the few modules that import `mlflow` (docs/conventions.md, lesson 8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dynroute.platform import metrics
from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.latency import DeviceLatency, parse_latency_tags
from dynroute.platform.tracking.client import mlflow_client

__all__ = ["RegisteredVersion", "all_versions", "describe_versions", "read_versions",
           "registry_client"]

# Version tags read back here (metric names from `metrics`; the rest are written by register.py).
TAG_PARETO, TAG_RANK, TAG_TRIAL, TAG_STUDY = "pareto", "pareto_rank", "trial", "study"
TAG_RESOLUTION = "cost_resolution"


# ---------------------------------------------------------------------------------------------
# MLflow access


def registry_client(tracking_uri: str) -> MlflowClient:
    """A client of the tracking server's registry, with the fail-fast HTTP settings."""
    return mlflow_client(tracking_uri)


def all_versions(client: MlflowClient, name: str) -> list:
    """Every version of `name`, oldest first (all pages)."""
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def _registered_model(client: MlflowClient, name: str, tracking_uri: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model {name!r} on {tracking_uri}; register the "
                                f"Pareto front first (`dynroute register`)") from None
        raise


def _float_tag(tags: Mapping[str, str], key: str) -> float:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------------------------
# Versions as their tags describe them


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of the registered model, as its tags describe it."""

    version: str
    trial: str | None
    study: str | None
    run_id: str | None
    miou: float
    gflops_mean: float
    gflops_max: float
    gflops_min: float
    cost_resolution: str | None
    pareto: bool
    pareto_rank: str | None
    aliases: tuple[str, ...]
    latency: Mapping[str, DeviceLatency] = field(default_factory=dict)  # by device key


def _describe(version, aliases_of: Mapping[str, list[str]]) -> RegisteredVersion:
    tags = version.tags
    return RegisteredVersion(
        version=str(version.version), trial=tags.get(TAG_TRIAL), study=tags.get(TAG_STUDY),
        run_id=version.run_id or None, miou=_float_tag(tags, metrics.MIOU),
        gflops_mean=_float_tag(tags, metrics.GFLOPS_MEAN),
        gflops_max=_float_tag(tags, metrics.GFLOPS_MAX),
        gflops_min=_float_tag(tags, metrics.GFLOPS_MIN),
        cost_resolution=tags.get(TAG_RESOLUTION), pareto=tags.get(TAG_PARETO) == "true",
        pareto_rank=tags.get(TAG_RANK), aliases=tuple(sorted(aliases_of.get(
            str(version.version), []))), latency=parse_latency_tags(tags))


def describe_versions(client: MlflowClient, name: str, aliases: Mapping[str, object],
                       ) -> list[RegisteredVersion]:
    """Every version of `name`, oldest first, with `aliases` (alias → version) spread over them."""
    aliases_of: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        aliases_of.setdefault(str(number), []).append(alias)
    return [_describe(v, aliases_of) for v in all_versions(client, name)]


def read_versions(*, tracking_uri: str, name: str) -> tuple[str, list[RegisteredVersion]]:
    """The registered model `name` as the server names it, and every version of it, oldest first.

    Raises:
        RegistryError: no model of that name is registered (says to run `dynroute register`).
    """
    client = registry_client(tracking_uri)
    model = _registered_model(client, name, tracking_uri)
    return model.name, describe_versions(client, model.name, model.aliases)
