"""The Pareto-aware model registry: the search's front as MLflow registered model versions.

`register_front` turns the `pareto` stage's `pareto.json` (read and checked by
`registry.front.load_front`) into versions of ONE registered model per dataset
(`dynroute-{dataset}`), each carrying its figures and search coordinates as tags
(docs/conventions.md, lesson 10), and points the managed aliases at the models people ask for:
`best-miou`, `min-gflops`, `knee` and the budget buckets `le-<N>g` (which model each names is
`registry.front.desired_aliases`).

Registration is idempotent. A front model's version is found again by the MLflow run that logged
it (the `runs:/<run id>/model` of its trial); a version without a run is found by its `study` and
`trial` tags. Re-running registers nothing new and writes only what changed. When the front moves,
versions that left it keep their number and artifacts but lose the registry's aliases and are
tagged `pareto=false`; one that comes back is tagged `pareto=true` again. Only the managed aliases
are moved or deleted: others (e.g. a hand-set `production`) are left alone, only reported.

`registry.selection.select_version` answers "the best model under N GFLOPs" from the versions
`registered_versions.read_versions` reads back; `predict.py` runs a chosen model on image files.

With `registered_versions.py`, `tracker.py` and its helpers (`metric_sender.py`,
`model_logging.py`), this is one of the few modules that talk to MLflow (the registry half of its
API; docs/conventions.md, lesson 8).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dynroute.platform import metrics
from dynroute.platform.files import write_json_atomic
from dynroute.platform.pareto.analysis import Point
from dynroute.platform.registry.front import (
    Front,
    RegistryError,
    automatic_budget_edges,
    desired_aliases,
    is_managed_alias,
    load_front,
    model_name,
)
from dynroute.platform.registry.registered_versions import (
    TAG_PARETO,
    TAG_RANK,
    TAG_RESOLUTION,
    TAG_STUDY,
    TAG_TRIAL,
    RegisteredVersion,
    all_versions,
    describe_versions,
    registry_client,
)
from dynroute.platform.tracking.client import MAX_TAG_VALUE_CHARS, truncate
from dynroute.platform.tracking.model_logging import (
    TAG_WEIGHTS_SHA256,
    ModelLoadError,
    recorded_model,
)

__all__ = [
    "SERVICE_ERRORS",
    "RegistryState",
    "register_front",
]

TAG_PARAMS, TAG_DATASET = "params", "dataset"  # the other tags: registered_versions.py
# On a pickled version that `dynroute model convert` replaced: the version that replaced it.
TAG_CONVERTED_TO = "converted_to"

# What a registry call raises when MLflow itself fails (server down, refused request); callers
# outside this module catch these without importing mlflow.
SERVICE_ERRORS: tuple[type[Exception], ...] = (MlflowException,)


# ---------------------------------------------------------------------------------------------
# Version tags


def _tag(value: object) -> str:
    """A tag value: floats in full precision, lists and dicts as JSON, None as 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping | list | tuple):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return truncate(text, MAX_TAG_VALUE_CHARS)


def _run_id(point: Point) -> str | None:
    uri = str(point.meta["model_uri"])
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0] or None
    run = point.meta.get("mlflow_run_id")
    return str(run) if run else None


def _resolution(value: Sequence[int] | None) -> str:
    return "unknown" if value is None else f"{value[0]}x{value[1]}"


def _version_tags(point: Point, front: Front) -> dict[str, str]:
    meta = point.meta
    tags = {
        metrics.MIOU: point.miou, metrics.GFLOPS_MEAN: point.gflops,
        metrics.GFLOPS_MAX: meta["gflops_max"], metrics.GFLOPS_MIN: meta["gflops_min"],
        TAG_RESOLUTION: _resolution(meta["cost_resolution"]), "lambda2": meta["lambda2"],
        "mu": meta["mu"], TAG_PARAMS: meta["params"], "data_hash": meta["data_hash"],
        "git_commit": meta["git_commit"], TAG_STUDY: meta["study"], TAG_TRIAL: point.id,
        TAG_RANK: 0, TAG_PARETO: True, TAG_DATASET: meta["dataset"],
        "model_uri": meta["model_uri"],
    }
    for key in ("iterations", metrics.GFLOPS_P50, metrics.GFLOPS_P90):
        if key in meta:
            tags[key] = meta[key]
    return {k: _tag(v) for k, v in tags.items()}


def _weights_sha256(point: Point, front: Front, tracking_uri: str) -> str:
    """The SHA-256 the server recorded for the weights of `point`'s logged model."""
    uri = str(point.meta["model_uri"])
    try:
        record = recorded_model(uri, tracking_uri=tracking_uri)
    except ModelLoadError as err:
        raise RegistryError(f"{front.source}: trial {point.id!r}: {err}") from None
    if record.sha256 is None:
        raise RegistryError(
            f"{front.source}: trial {point.id!r}: {uri} was logged in MLflow's pickle format by "
            f"an earlier dynroute and is not registered (loading it would run code). If you "
            f"trust it, convert it first: `dynroute model convert {uri} --trust-pickle`")
    return record.sha256


# ---------------------------------------------------------------------------------------------
# Registration


@dataclass
class RegistryState:
    """What `register_front` left in the registry (read back from the server).

    Attributes:
        name: the registered model.
        versions: every version, front first (by GFLOPs), then the others by number.
        aliases: alias → version, all of the model's aliases.
        created: versions registered by this call.
        left_front: versions this call tagged pareto=false.
        returned: versions that were off the front and are on it again.
        budget_edges: the GFLOPs edges of the `le-<N>g` aliases; automatic says whether derived.
        warnings: e.g. a hand-set alias still on a version that left the front.
    """

    name: str
    versions: list[RegisteredVersion]
    aliases: dict[str, str]
    created: list[str] = field(default_factory=list)
    left_front: list[str] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    budget_edges: tuple[float, ...] = ()
    automatic_edges: bool = False
    description: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-safe (non-finite figures as None)."""
        def clean(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "name": self.name,
            "versions": [{k: clean(v) if not isinstance(v, tuple) else list(v)
                          for k, v in asdict(version).items()} for version in self.versions],
            "aliases": dict(sorted(self.aliases.items())),
            "created": self.created, "left_front": self.left_front, "returned": self.returned,
            "budget_edges": list(self.budget_edges), "automatic_edges": self.automatic_edges,
            "description": self.description, "warnings": self.warnings,
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as JSON atomically (temporary file, then rename)."""
        return write_json_atomic(path, self.to_dict())


def _description(front: Front, wanted: Mapping[str, Point], version_of: Mapping[str, str],
                 ) -> str:
    points = sorted(front.points, key=lambda p: (p.gflops, -p.miou, p.id))
    lines = [
        f"Pareto front of study {front.study} on {front.dataset}: {len(points)} models, "
        f"mIoU {points[0].miou:.4f}–{points[-1].miou:.4f}, mean GFLOPs "
        f"{points[0].gflops:.4g}–{points[-1].gflops:.4g} at "
        f"{_resolution(points[0].meta['cost_resolution'])}.",
        "Aliases: " + "; ".join(f"{alias} → v{version_of[p.id]} (mIoU {p.miou:.4f}, "
                                f"{p.gflops:.4g} GFLOPs)" for alias, p in wanted.items()) + ".",
        "Maintained by `dynroute register`; versions tagged pareto=false have left the front. "
        "Query: `dynroute select --max-gflops N`.",
    ]
    return "\n".join(lines)


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`. A concurrent `register` may create the same new alias at the
    same moment (the server's insert then fails on its unique key): set it again, now an update."""
    for attempt in range(3):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as err:
            if "UNIQUE" not in str(err).upper() or attempt == 2:
                raise


def _delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    """Remove `alias`; one a concurrent `register` removed already is gone all the same."""
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _settle_duplicates(client: MlflowClient, name: str, created_for: Mapping[str, str],
                       version_of: dict[str, str], state: RegistryState) -> None:
    """Another `register` at the same time may have registered the same runs: nothing locks the
    registry. For every run the oldest version wins; the newer ones this call created are
    deleted and its points map to the winner, so both calls end with one version per run."""
    oldest: dict[str, str] = {}
    for version in all_versions(client, name):  # oldest first
        if version.run_id:
            oldest.setdefault(version.run_id, str(version.version))
    for point_id, version in list(version_of.items()):
        winner = oldest.get(created_for.get(version, ""), version)
        if winner != version:
            client.delete_model_version(name, version)
            state.created.remove(version)
            version_of[point_id] = winner


def register_front(pareto: Mapping | str | os.PathLike, *, tracking_uri: str, name: str,
                   budget_edges: Sequence[float] = ()) -> RegistryState:
    """Register the Pareto front of a search as versions of one registered model, idempotently.

    Args:
        pareto: a pareto.json path or its parsed content (`pareto.analysis.write_front`'s format,
            each point's meta the trial record with `model_uri` = runs:/<run id>/model).
        tracking_uri: the MLflow server.
        name: the registered model's name, or a template with `{dataset}`.
        budget_edges: GFLOPs budgets of the `le-<N>g` aliases; empty: `automatic_budget_edges`.

    Returns:
        The registry's state afterwards, read back from the server.

    Raises:
        RegistryError: a bad pareto.json or name (says which key and what to do).
    """
    front = load_front(pareto)
    name = model_name(name, front.dataset)
    edges = tuple(sorted({float(e) for e in budget_edges}))
    bad = [e for e in edges if not math.isfinite(e) or e <= 0]
    if bad:
        raise RegistryError(f"registry.budget_edges {bad}: budgets must be positive GFLOPs")
    automatic = not edges
    if automatic:
        edges = automatic_budget_edges(p.gflops for p in front.points)
    client = registry_client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = all_versions(client, name)
    by_run = {}
    by_trial = {}
    for version in existing:  # oldest first: a duplicate registration never wins
        if version.tags.get(TAG_CONVERTED_TO):
            continue  # a pickled version `dynroute model convert` replaced
        if version.run_id:
            by_run.setdefault(version.run_id, version)
        else:
            key = (version.tags.get(TAG_STUDY), version.tags.get(TAG_TRIAL))
            by_trial.setdefault(key, version)

    state = RegistryState(name=name, versions=[], aliases={}, budget_edges=edges,
                          automatic_edges=automatic)
    version_of: dict[str, str] = {}
    on_front: set[str] = set()
    created_for: dict[str, str] = {}  # version this call created → its run
    for point in front.points:
        tags = _version_tags(point, front)
        run_id = _run_id(point)
        match = (by_run.get(run_id) if run_id else None) or by_trial.get(
            (tags[TAG_STUDY], point.id))
        if match is None:
            # Tags go with the creation, so a version never exists without its figures (nor
            # the SHA-256 of its weights, which loading checks).
            tags[TAG_WEIGHTS_SHA256] = _weights_sha256(point, front, tracking_uri)
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            try:
                created = mlflow.register_model(str(point.meta["model_uri"]), name, tags=tags)
            except MlflowException as err:
                raise RegistryError(f"{front.source}: trial {point.id!r}: cannot register "
                                    f"{point.meta['model_uri']}: {err.message}") from None
            version = str(created.version)
            state.created.append(version)
            if run_id:
                created_for[version] = run_id
        else:
            version = str(match.version)
            if match.tags.get(TAG_PARETO) == "false":
                state.returned.append(version)
            for key, value in tags.items():
                if match.tags.get(key) != value:
                    client.set_model_version_tag(name, version, key, value)
        version_of[point.id] = version
        on_front.add(version)

    if created_for:
        _settle_duplicates(client, name, created_for, version_of, state)
        on_front = set(version_of.values())

    # Aliases: move the managed ones onto the front, drop those no longer wanted.
    wanted = desired_aliases(front, edges)
    current = dict(client.get_registered_model(name).aliases)
    for alias, point in wanted.items():
        if current.get(alias) != version_of[point.id]:
            _set_alias(client, name, alias, version_of[point.id])
    for alias in sorted(current):
        if is_managed_alias(alias) and alias not in wanted:
            _delete_alias(client, name, alias)

    # Versions that left the front: tagged, never deleted.
    for version in existing:
        number = str(version.version)
        if number in on_front or version.tags.get(TAG_PARETO) != "true":
            continue
        client.set_model_version_tag(name, number, TAG_PARETO, "false")
        rank = front.ranks.get(version.tags.get(TAG_TRIAL, ""))
        client.set_model_version_tag(name, number, TAG_RANK, _tag(rank))
        state.left_front.append(number)
        kept = sorted(a for a, v in current.items() if v == number and not is_managed_alias(a))
        if kept:
            state.warnings.append(f"version {number} left the front but still carries "
                                  f"{kept}, which the registry does not manage; move them "
                                  f"if they should follow the front")

    description = _description(front, wanted, version_of)
    model = client.get_registered_model(name)
    if (model.description or "") != description:
        client.update_registered_model(name, description=description)
    state.description = description

    # Read back what is there, so the summary is the server's truth.
    aliases = dict(client.get_registered_model(name).aliases)
    described = describe_versions(client, name, aliases)
    state.versions = (sorted((v for v in described if v.version in on_front),
                             key=lambda v: (v.gflops_mean, -v.miou, int(v.version)))
                      + [v for v in described if v.version not in on_front])
    state.aliases = {a: str(v) for a, v in aliases.items()}
    return state
