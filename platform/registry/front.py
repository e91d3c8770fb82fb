"""The Pareto front as the registry sees it: `pareto.json` read, checked and turned into aliases.

The `pareto` stage writes `pareto.json` (`pareto.analysis.write_front`); the registry registers
its front (`registry.register.register_front`). Everything between the two that needs no server
lives here, as pure functions tested without MLflow (docs/conventions.md, lesson 9):

* `load_front` reads and validates the file into a `Front`, with errors that name the file, the
  record and the key (`RegistryError`);
* `model_name` fills the registered model's name template (`dynroute-{dataset}`);
* `desired_aliases` says which front model each managed alias should name:
  `best-miou` (the most accurate; ties: fewer GFLOPs), `min-gflops` (the cheapest; ties: higher
  mIoU), `knee` (`pareto.json`'s, else `pareto.knee_point`) and `le-<N>g` (the best model within
  N GFLOPs, `pareto.budget_buckets`), with `automatic_budget_edges` when none are configured;
* `is_managed_alias` tells those aliases from hand-set ones (e.g. `production`), which the
  registry never moves.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynroute.platform.pareto.analysis import Point, budget_buckets, knee_point

__all__ = [
    "ALIAS_BEST_MIOU",
    "ALIAS_KNEE",
    "ALIAS_MIN_GFLOPS",
    "REQUIRED_META",
    "Front",
    "RegistryError",
    "automatic_budget_edges",
    "desired_aliases",
    "is_managed_alias",
    "load_front",
    "model_name",
]

ALIAS_BEST_MIOU = "best-miou"
ALIAS_MIN_GFLOPS = "min-gflops"
ALIAS_KNEE = "knee"
_FIXED_ALIASES = (ALIAS_BEST_MIOU, ALIAS_MIN_GFLOPS, ALIAS_KNEE)
# What pareto.bucket_name writes: le-60g, le-2p5g, le-5e-05g (repr of tiny budgets).
_BUCKET_ALIAS = re.compile(r"^le-[0-9]+(p[0-9]+)?(e-?[0-9]+)?g$")

# What every front record's `meta` must hold (the trial record the pareto stage writes).
REQUIRED_META = ("study", "params", "lambda2", "mu", "gflops_max", "gflops_min",
                 "cost_resolution", "model_uri", "data_hash", "git_commit", "dataset")

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
    regenerate = "regenerate it with the pareto stage (pareto.analysis.write_front)"
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
# Aliases and budget buckets


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


def desired_aliases(front: Front, edges: Sequence[float]) -> dict[str, Point]:
    """Managed alias → the front point it should name: the fixed aliases, then `le-<N>g` per edge
    that some point fits (`pareto.budget_buckets`)."""
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


def is_managed_alias(alias: str) -> bool:
    """Whether the registry moves and deletes `alias` (a fixed alias or an `le-<N>g` bucket)."""
    return alias in _FIXED_ALIASES or bool(_BUCKET_ALIAS.match(alias))
