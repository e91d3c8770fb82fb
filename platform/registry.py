"""The Pareto-aware model registry: the search's front as MLflow registered model versions.

`register_front` turns the `pareto` stage's `pareto.json` into versions of ONE registered model per
dataset (`dynroute-{dataset}`), each carrying its figures and search coordinates as tags (style.md,
lesson 10), and points aliases at the models people ask for:

* `best-miou`: the most accurate model (ties: fewer GFLOPs);
* `min-gflops`: the cheapest model (ties: higher mIoU);
* `knee`: the front's knee (`pareto.json`'s, else `pareto.knee_point`);
* `le-<N>g`: the best model within N GFLOPs (`pareto.budget_buckets`). Without configured edges
  the edges are automatic, see `automatic_budget_edges`.

Registration is idempotent. A front model's version is found again by the MLflow run that logged
it (the `runs:/<run id>/model` of its trial); a version without a run is found by its `study` and
`trial` tags. Re-running registers nothing new and writes only what changed. When the front moves,
versions that left it keep their number and artifacts but lose the registry's aliases and are
tagged `pareto=false`; one that comes back is tagged `pareto=true` again. Only the aliases above
are managed: others (e.g. a hand-set `production`) are never moved or deleted, only reported.

`select_version` answers "the best model under N GFLOPs" from the registry itself; `predict.py`
runs a chosen model on image files.

Besides `tracking.py`, this is the one module that talks to MLflow (the registry half of its API;
style.md, lesson 8).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dynroute.platform import metrics
from dynroute.platform.files import write_json_atomic
from dynroute.platform.pareto import Point, budget_buckets, knee_point

__all__ = [
    "ALIAS_BEST_MIOU",
    "ALIAS_KNEE",
    "ALIAS_MIN_GFLOPS",
    "SERVICE_ERRORS",
    "Front",
    "RegisteredVersion",
    "RegistryError",
    "RegistryState",
    "Selection",
    "automatic_budget_edges",
    "load_front",
    "model_name",
    "register_front",
    "select_version",
]

ALIAS_BEST_MIOU = "best-miou"
ALIAS_MIN_GFLOPS = "min-gflops"
ALIAS_KNEE = "knee"
_FIXED_ALIASES = (ALIAS_BEST_MIOU, ALIAS_MIN_GFLOPS, ALIAS_KNEE)
# What pareto.bucket_name writes: le-60g, le-2p5g, le-5e-05g (repr of tiny budgets).
_BUCKET_ALIAS = re.compile(r"^le-[0-9]+(p[0-9]+)?(e-?[0-9]+)?g$")

# Version tags (metric names from `metrics`, the rest the search coordinates and lineage).
TAG_PARETO, TAG_RANK, TAG_TRIAL, TAG_STUDY = "pareto", "pareto_rank", "trial", "study"
TAG_RESOLUTION, TAG_PARAMS, TAG_DATASET = "cost_resolution", "params", "dataset"
_FIGURE_TAGS = (metrics.MIOU, metrics.GFLOPS_MEAN, metrics.GFLOPS_MAX, metrics.GFLOPS_MIN)
MAX_TAG_VALUE_CHARS = 8000  # MLflow 3.17's limit (tracking.MAX_TAG_VALUE_CHARS)

# What every front record's `meta` must hold (the trial record the pareto stage writes).
REQUIRED_META = ("study", "params", "lambda2", "mu", "gflops_max", "gflops_min",
                 "cost_resolution", "model_uri", "data_hash", "git_commit", "dataset")
_NUMBER_META = ("lambda2", "mu", "gflops_max", "gflops_min")

# What a registry call raises when MLflow itself fails (server down, refused request); callers
# outside this module catch these without importing mlflow.
SERVICE_ERRORS: tuple[type[Exception], ...] = (MlflowException,)

# Automatic budget edges: the 1-2-5 series (1, 2, 5, 10, 20, 50, ... GFLOPs and below 1).
_SERIES = (1, 2, 5)


class RegistryError(ValueError):
    """A pareto.json, registry state or request the registry cannot work with (says what to do)."""


# ---------------------------------------------------------------------------------------------
# pareto.json


@dataclass(frozen=True)
class Front:
    """The validated content of a pareto.json.

    Attributes:
        source: where it came from (a path, or "<pareto dict>"), for messages.
        points: the front (rank 0): id = trial id, mIoU, mean GFLOPs, meta = the trial record.
        knee: id of the knee the pareto stage chose (None: recompute).
        ranks: trial id → Pareto rank (None for invalid trials), over every point of the file.
        dataset, study: shared by all front points.
    """

    source: str
    points: tuple[Point, ...]
    knee: str | None
    ranks: Mapping[str, int | None]
    dataset: str
    study: str


def _finite_number(value: object) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def load_front(pareto: Mapping | str | os.PathLike) -> Front:
    """Read and validate a pareto.json (or its parsed content).

    Raises:
        RegistryError: naming the file, the record and the missing or bad key.
    """
    if isinstance(pareto, Mapping):
        source, document = "<pareto dict>", pareto
    else:
        source = str(pareto)
        try:
            document = json.loads(Path(pareto).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RegistryError(f"{source} does not exist; run the pareto stage first "
                                f"(`dvc repro pareto`) or pass --pareto") from None
        except (OSError, UnicodeDecodeError) as err:
            raise RegistryError(f"cannot read {source}: {err}") from None
        except json.JSONDecodeError as err:
            raise RegistryError(f"{source} is not valid JSON ({err}); regenerate it with the "
                                f"pareto stage") from None
    regenerate = "regenerate it with the pareto stage (platform.pareto.write_front)"
    if not isinstance(document, Mapping) or not isinstance(document.get("front"), list):
        raise RegistryError(f"{source}: missing key 'front' (a list of the rank-0 trials); "
                            f"{regenerate}")
    points = []
    for i, record in enumerate(document["front"]):
        where = f"{source}: front[{i}]"
        if not isinstance(record, Mapping):
            raise RegistryError(f"{where} is not an object; {regenerate}")
        for key in ("id", "miou", "gflops", "meta"):
            if key not in record:
                raise RegistryError(f"{where} has no key '{key}'; {regenerate}")
        where = f"{where} (trial {record['id']!r})"
        if not _finite_number(record["miou"]) or not _finite_number(record["gflops"]):
            raise RegistryError(f"{where}: miou and gflops must be finite numbers, got "
                                f"{record['miou']!r} and {record['gflops']!r}")
        if record.get("rank", 0) != 0:
            raise RegistryError(f"{where} has rank {record['rank']!r} but sits in 'front'; "
                                f"{regenerate}")
        meta = record["meta"]
        if not isinstance(meta, Mapping):
            raise RegistryError(f"{where}: 'meta' must be the trial record (an object)")
        for key in REQUIRED_META:
            if key not in meta:
                raise RegistryError(f"{where} has no key 'meta.{key}' (the trial record); "
                                    f"{regenerate}")
        uri = meta["model_uri"]
        if not isinstance(uri, str) or not uri.startswith(("runs:/", "models:/")):
            raise RegistryError(f"{where}: meta.model_uri = {uri!r} is not an MLflow model URI "
                                f"(runs:/<run id>/model); was the trial tracked in MLflow?")
        resolution = meta["cost_resolution"]
        if resolution is not None and (
                not isinstance(resolution, list | tuple) or len(resolution) != 2
                or not all(isinstance(v, int) and v > 0 for v in resolution)):
            raise RegistryError(f"{where}: meta.cost_resolution = {resolution!r}; expected "
                                f"[height, width]")
        points.append(Point(str(record["id"]), record["miou"], record["gflops"], meta))
    if not points:
        raise RegistryError(f"{source}: the front is empty, nothing to register; did any trial "
                            f"finish with both objectives?")
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise RegistryError(f"{source}: trial ids repeat on the front: {ids}; {regenerate}")
    datasets = sorted({str(p.meta["dataset"]) for p in points})
    studies = sorted({str(p.meta["study"]) for p in points})
    if len(datasets) != 1:
        raise RegistryError(f"{source}: the front mixes datasets {datasets}; one registered "
                            f"model holds one dataset, so run the pareto stage per dataset")
    ranks = {str(r["id"]): r.get("rank") for r in document.get("points") or []
             if isinstance(r, Mapping) and "id" in r}
    ranks |= {p.id: 0 for p in points}
    knee = document.get("knee")
    return Front(source=source, points=tuple(points), knee=None if knee is None else str(knee),
                 ranks=ranks, dataset=datasets[0], study=",".join(studies))


def model_name(template: str, dataset: str) -> str:
    """`dynroute-{dataset}` → `dynroute-cityscapes`; a name without a placeholder stays as is."""
    try:
        name = template.format(dataset=dataset)
    except (KeyError, IndexError, ValueError):
        raise RegistryError(f"registry.name = {template!r}: the only placeholder allowed is "
                            f"{{dataset}}, e.g. 'dynroute-{{dataset}}'") from None
    if not name or "'" in name or '"' in name:
        raise RegistryError(f"registered model name {name!r} must be non-empty and free of "
                            f"quotes; fix registry.name")
    return name


# ---------------------------------------------------------------------------------------------
# Budget buckets


def automatic_budget_edges(gflops: Iterable[float]) -> tuple[float, ...]:
    """Budget edges for the `le-<N>g` aliases when none are configured.

    Rule: every value of the 1-2-5 series (…, 0.5, 1, 2, 5, 10, 20, 50, …) from the cheapest front
    model's GFLOPs (inclusive) up to the most expensive one's (exclusive). Each such budget holds
    at least the cheapest model and excludes the most accurate one (which `best-miou` names
    already), so every bucket says something the fixed aliases do not; the names stay short and
    stable while a front shifts a little. A front whose GFLOPs span no series value gets no
    buckets (best-miou and min-gflops cover it).
    """
    values = sorted(float(g) for g in gflops if math.isfinite(g) and g > 0)
    if not values:
        return ()
    low, high = values[0], values[-1]
    edges = []
    for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for mantissa in _SERIES:
            edge = float(f"{mantissa}e{exponent}")  # exact decimal, e.g. 0.2 not 0.20000000004
            if low <= edge < high:
                edges.append(edge)
    return tuple(edges)


# ---------------------------------------------------------------------------------------------
# MLflow access


def _client(tracking_uri: str) -> MlflowClient:
    from dynroute.platform.tracking import _configure_http_client

    _configure_http_client()  # fail fast against a dead server (tracking.py's HTTP defaults)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _versions(client: MlflowClient, name: str) -> list:
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
    if len(text) > MAX_TAG_VALUE_CHARS:
        marker = f"...[truncated {len(text)} chars]"
        text = text[: MAX_TAG_VALUE_CHARS - len(marker)] + marker
    return text


def _float_tag(tags: Mapping[str, str], key: str) -> float:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return math.nan


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


def _managed(alias: str) -> bool:
    return alias in _FIXED_ALIASES or bool(_BUCKET_ALIAS.match(alias))


# ---------------------------------------------------------------------------------------------
# Registration


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
            str(version.version), []))))


def _desired_aliases(front: Front, edges: Sequence[float]) -> dict[str, Point]:
    points = list(front.points)
    wanted = {
        ALIAS_BEST_MIOU: min(points, key=lambda p: (-p.miou, p.gflops, p.id)),
        ALIAS_MIN_GFLOPS: min(points, key=lambda p: (p.gflops, -p.miou, p.id)),
    }
    by_id = {p.id: p for p in points}
    knee = by_id.get(front.knee) if front.knee is not None else None
    knee = knee or knee_point(points)
    if knee is not None:
        wanted[ALIAS_KNEE] = knee
    return wanted | budget_buckets(points, edges=edges)


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
    for version in _versions(client, name):  # oldest first
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
        pareto: a pareto.json path or its parsed content (`platform.pareto.write_front`'s format,
            each point's meta the trial record with `model_uri` = runs:/<run id>/model).
        tracking_uri: the MLflow server.
        name: the registered model's name, or a template with `{dataset}`.
        budget_edges: GFLOPs budgets of the `le-<N>g` aliases; empty: `automatic_budget_edges`.

    Returns:
        The registry's state afterwards, read back from the server.

    Raises:
        RegistryError: a bad pareto.json or name (says which key and what to do).
    """
    import mlflow

    front = load_front(pareto)
    name = model_name(name, front.dataset)
    edges = tuple(sorted({float(e) for e in budget_edges}))
    bad = [e for e in edges if not math.isfinite(e) or e <= 0]
    if bad:
        raise RegistryError(f"registry.budget_edges {bad}: budgets must be positive GFLOPs")
    automatic = not edges
    if automatic:
        edges = automatic_budget_edges(p.gflops for p in front.points)
    client = _client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = _versions(client, name)
    by_run = {}
    by_trial = {}
    for version in existing:  # oldest first: a duplicate registration never wins
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
            # Tags go with the creation, so a version never exists without its figures.
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
    wanted = _desired_aliases(front, edges)
    current = dict(client.get_registered_model(name).aliases)
    for alias, point in wanted.items():
        if current.get(alias) != version_of[point.id]:
            _set_alias(client, name, alias, version_of[point.id])
    for alias in sorted(current):
        if _managed(alias) and alias not in wanted:
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
        kept = sorted(a for a, v in current.items() if v == number and not _managed(a))
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
    aliases_of: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        aliases_of.setdefault(str(number), []).append(alias)
    described = [_describe(v, aliases_of) for v in _versions(client, name)]
    state.versions = (sorted((v for v in described if v.version in on_front),
                             key=lambda v: (v.gflops_mean, -v.miou, int(v.version)))
                      + [v for v in described if v.version not in on_front])
    state.aliases = {a: str(v) for a, v in aliases.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Selection


@dataclass(frozen=True)
class Selection:
    """The version `select_version` chose."""

    name: str
    version: str
    uri: str  # models:/NAME/VERSION
    miou: float
    gflops_mean: float
    gflops_max: float
    gflops_min: float
    cost_resolution: str | None
    trial: str | None
    aliases: tuple[str, ...]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else
                (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def select_version(*, tracking_uri: str, name: str, max_gflops: float,
                   min_miou: float | None = None) -> Selection | None:
    """The most accurate front version (tag pareto=true) with mean GFLOPs ≤ max_gflops.

    Args:
        tracking_uri: the MLflow server.
        name: the registered model (e.g. `dynroute-cityscapes`).
        max_gflops: the budget, in the GFLOPs of the versions' `gflops_mean` tags.
        min_miou: also require mIoU ≥ this.

    Returns:
        The selection (ties in mIoU: fewer GFLOPs, then the older version), or None when no
        front version fits.

    Raises:
        RegistryError: the model is not registered, or a bound is not a number.
    """
    if math.isnan(max_gflops) or (min_miou is not None and math.isnan(min_miou)):
        raise RegistryError(f"bounds must be numbers, got max_gflops={max_gflops}, "
                            f"min_miou={min_miou}")
    client = _client(tracking_uri)
    if "{" in name or "'" in name:
        raise RegistryError(f"registered model name {name!r}: give the concrete name (fill "
                            f"{{dataset}} with model_name) without quotes")
    model = _registered_model(client, name, tracking_uri)
    aliases_of: dict[str, list[str]] = {}
    for alias, number in model.aliases.items():
        aliases_of.setdefault(str(number), []).append(alias)
    candidates = [_describe(v, aliases_of) for v in _versions(client, model.name)]
    fits = [v for v in candidates if v.pareto and math.isfinite(v.miou)
            and v.gflops_mean <= max_gflops and (min_miou is None or v.miou >= min_miou)]
    if not fits:
        return None
    best = min(fits, key=lambda v: (-v.miou, v.gflops_mean, int(v.version)))
    return Selection(name=model.name, version=best.version,
                     uri=f"models:/{model.name}/{best.version}", miou=best.miou,
                     gflops_mean=best.gflops_mean, gflops_max=best.gflops_max,
                     gflops_min=best.gflops_min, cost_resolution=best.cost_resolution,
                     trial=best.trial, aliases=best.aliases)
