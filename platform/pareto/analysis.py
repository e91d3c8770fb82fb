"""The accuracy-vs-cost Pareto front of a budget search: ranks, hypervolume, knee, budget queries.

A trial is a `Point` with two objectives, `metrics.SEARCH_OBJECTIVES`: mIoU (maximised) and the
mean real GFLOPs per image (minimised). A dominates B when A is no worse in both and strictly
better in one; points with identical objectives therefore never dominate each other and share a
rank. A point with a NaN or infinite objective (a diverged trial) is never ranked: it comes back
in `Fronts.invalid`, so callers can report it instead of losing it.

Pure functions of the points (no Ray, MLflow or Optuna), so the `pareto` stage and the
Pareto-aware registry (aliases `knee`, `le-60g`, "best model under N GFLOPs") share one tested
definition. The pictures are in `pareto_plots`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from dynroute.platform.metrics import GFLOPS_MEAN, MIOU, SEARCH_OBJECTIVES

# Headroom of the default reference point beyond the most expensive point (see default_reference).
REFERENCE_GFLOPS_HEADROOM = 1.1
# A point closer than this to the knee chord (in normalised units) counts as lying on it.
CHORD_TOLERANCE = 1e-9
CSV_COLUMNS = ("id", "miou", "gflops", "rank", "on_front", "is_knee")


@dataclass(frozen=True)
class Point:
    """One trial: its id (unique within a study), mIoU, mean real GFLOPs and free metadata.

    `meta` is copied into a read-only mapping; it takes part in equality but not in the hash, so
    points stay hashable whatever the metadata holds.
    """

    id: str
    miou: float
    gflops: float
    meta: Mapping[str, object] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise TypeError(f"Point id must be a str, got {self.id!r}; use str(trial.number)")
        object.__setattr__(self, "miou", float(self.miou))
        object.__setattr__(self, "gflops", float(self.gflops))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def is_valid(self) -> bool:
        """Both objectives are finite numbers."""
        return math.isfinite(self.miou) and math.isfinite(self.gflops)


@dataclass(frozen=True)
class Fronts:
    """Non-dominated sorting of a set of points.

    Attributes:
        fronts: fronts[k] holds the points of rank k (rank 0 = the Pareto front), each sorted by
            GFLOPs ascending, then mIoU descending, then id.
        invalid: points with a NaN or infinite objective, sorted by id; they have no rank.
    """

    fronts: tuple[tuple[Point, ...], ...]
    invalid: tuple[Point, ...]

    @property
    def ranks(self) -> dict[str, int]:
        """Point id → rank, for the valid points."""
        return {p.id: k for k, front in enumerate(self.fronts) for p in front}


def dominates(a: Point, b: Point) -> bool:
    """A is no worse than B in both objectives and strictly better in one."""
    no_worse = a.miou >= b.miou and a.gflops <= b.gflops
    return no_worse and (a.miou > b.miou or a.gflops < b.gflops)


def _front_order(p: Point) -> tuple[float, float, str]:
    return p.gflops, -p.miou, p.id


def non_dominated_sort(points: Iterable[Point]) -> Fronts:
    """Sort points (ids unique) into fronts of equal Pareto rank; invalid ones set apart.

    O(n log n + n·F) for F fronts: ample for the hundreds of trials a study has.
    """
    points = list(points)
    duplicated = sorted(i for i, n in Counter(p.id for p in points).items() if n > 1)
    if duplicated:
        raise ValueError(f"point ids must be unique (one per trial); repeated: {duplicated[:5]}")
    valid = sorted((p for p in points if p.is_valid), key=_front_order)
    # Sweep in GFLOPs order, so every dominator of a point is placed before it. The members of a
    # front have strictly rising mIoU (up to exact duplicates), so its last member dominates the
    # new point iff anyone in it does; and since each front's members are dominated from the
    # front before, the first front without a dominator is the point's rank.
    fronts: list[list[Point]] = []
    for p in valid:
        for front in fronts:
            if not dominates(front[-1], p):
                front.append(p)
                break
        else:
            fronts.append([p])
    invalid = sorted((p for p in points if not p.is_valid), key=lambda p: p.id)
    return Fronts(fronts=tuple(tuple(f) for f in fronts), invalid=tuple(invalid))


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The rank-0 points (valid ones only), in front order; empty when no point is valid."""
    fronts = non_dominated_sort(points).fronts
    return list(fronts[0]) if fronts else []


def pareto_ranks(points: Iterable[Point]) -> dict[str, int]:
    """Point id → Pareto rank (0 = on the front); invalid points are left out."""
    return non_dominated_sort(points).ranks


def default_reference(points: Iterable[Point]) -> tuple[float, float]:
    """The hypervolume reference point (mIoU, GFLOPs) used when none is configured.

    mIoU 0, because every useful model beats it (in fractions or in percent alike); GFLOPs 1.1 ×
    the largest finite GFLOPs among the points, because with the reference exactly at the most
    expensive point that point's box would have zero width and it would add nothing; 10% headroom
    keeps every front point's contribution non-zero. Fix the reference in the params when
    hypervolumes of different studies must be compared: this default moves with the points.
    """
    gflops = [p.gflops for p in points if math.isfinite(p.gflops)]
    if not gflops:
        raise ValueError("no point has a finite GFLOPs value; pass an explicit reference")
    return 0.0, REFERENCE_GFLOPS_HEADROOM * max(gflops)


def hypervolume(front: Iterable[Point], *, reference: tuple[float, float]) -> float:
    """Area of the (mIoU, GFLOPs) plane dominated by the points and bounded by the reference.

    Args:
        front: points (dominated and invalid ones are allowed and add nothing).
        reference: (mIoU, GFLOPs); only points with a higher mIoU and fewer GFLOPs contribute.

    Returns:
        The area in mIoU × GFLOPs units; 0.0 when no point beats the reference.
    """
    ref_miou, ref_gflops = (float(v) for v in reference)
    if not (math.isfinite(ref_miou) and math.isfinite(ref_gflops)):
        raise ValueError(f"the hypervolume reference must be finite, got {reference}")
    inside = [p for p in front if p.is_valid and p.miou > ref_miou and p.gflops < ref_gflops]
    area, best = 0.0, ref_miou
    # Cheapest first: each point that raises the best mIoU so far adds a slab between the previous
    # best and its own mIoU, reaching from its GFLOPs to the reference.
    for p in sorted(inside, key=_front_order):
        if p.miou > best:
            area += (p.miou - best) * (ref_gflops - p.gflops)
            best = p.miou
    return area


def knee_point(front: Iterable[Point]) -> Point | None:
    """The front's knee: the point that buys the most mIoU for its cost relative to the others.

    Rule: take the Pareto front of the given points (invalid and dominated ones are dropped),
    normalise mIoU and GFLOPs to [0, 1] over it, and draw the chord between its two extremes
    (cheapest → (0, 0), most accurate → (1, 1)). The knee is the point farthest from the chord on
    the side of the ideal point (high mIoU, low GFLOPs), i.e. with the largest normalised
    mIoU − normalised GFLOPs; ties go to the cheaper point, then the smaller id.

    When no point lies above the chord (two distinct points, a straight front, or one bulging
    away from the ideal), min-max normalisation says nothing, so both objectives are normalised by
    their largest value instead (a ratio scale) and the extreme with the larger normalised
    mIoU − normalised GFLOPs wins: the most accurate point only if it has the higher mIoU per
    GFLOP, ties to the cheaper one. One point is its own knee; no valid point gives None.
    """
    points = pareto_front(front)
    distinct: dict[tuple[float, float], Point] = {}
    for p in points:  # exact duplicates: keep the first in front order (the smaller id)
        distinct.setdefault((p.miou, p.gflops), p)
    candidates = list(distinct.values())
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    cheap, accurate = candidates[0], candidates[-1]
    # Distinct front points rise strictly in both objectives, so both spans are positive.
    miou_span, gflops_span = accurate.miou - cheap.miou, accurate.gflops - cheap.gflops
    scores = [((p.miou - cheap.miou) / miou_span - (p.gflops - cheap.gflops) / gflops_span, p)
              for p in candidates[1:-1]]
    best = max((s for s, _ in scores), default=0.0)
    if best > CHORD_TOLERANCE:
        return next(p for s, p in scores if s == best)  # front order: the cheaper one on a tie
    # Ratio scale: accurate → (1, 1) scores 0; cheap scores cheap.miou/accurate.miou −
    # cheap.gflops/accurate.gflops (both objectives are positive). Cross-multiplied, so a
    # zero-cost point needs no division.
    return accurate if accurate.miou * cheap.gflops > cheap.miou * accurate.gflops else cheap


def best_under_budget(points: Iterable[Point], *, max_gflops: float,
                      min_miou: float | None = None) -> Point | None:
    """The most accurate valid point with GFLOPs ≤ max_gflops (and mIoU ≥ min_miou).

    Ties in mIoU go to fewer GFLOPs, then the smaller id. None when no point fits.
    """
    if math.isnan(max_gflops) or (min_miou is not None and math.isnan(min_miou)):
        raise ValueError(f"budget bounds must be numbers, got max_gflops={max_gflops}, "
                         f"min_miou={min_miou}")
    fits = [p for p in points if p.is_valid and p.gflops <= max_gflops
            and (min_miou is None or p.miou >= min_miou)]
    return min(fits, key=lambda p: (-p.miou, p.gflops, p.id), default=None)


def bucket_name(edge: float) -> str:
    """Compact name of a GFLOPs budget: 60 → "le-60g", 2.5 → "le-2p5g", 0.25 → "le-0p25g".

    The decimal point is written `p` because MLflow aliases allow only [A-Za-z0-9_-].
    """
    edge = float(edge)
    if not math.isfinite(edge) or edge < 0:
        raise ValueError(f"a GFLOPs budget must be finite and non-negative, got {edge}")
    # repr is the shortest text that reads back as the same float, so names never collide.
    text = str(int(edge)) if edge.is_integer() and abs(edge) < 1e15 else repr(edge)
    return f"le-{text.replace('.', 'p').replace('+', '')}g"


def budget_buckets(front: Iterable[Point], *, edges: Sequence[float]) -> dict[str, Point]:
    """For each GFLOPs budget, the best point within it (see `best_under_budget`).

    Args:
        front: points; any set works, since the best point under a budget is on the front.
        edges: GFLOPs budgets.

    Returns:
        `bucket_name(edge)` → point, by ascending edge; budgets no point fits are left out.
    """
    points = list(front)
    buckets: dict[str, Point] = {}
    for edge in sorted(set(map(float, edges))):
        best = best_under_budget(points, max_gflops=edge)
        if best is not None:
            buckets[bucket_name(edge)] = best
    return buckets


@dataclass(frozen=True)
class ParetoSummary:
    """Everything the `pareto` stage reports about a set of trials."""

    fronts: Fronts
    reference: tuple[float, float] | None  # (mIoU, GFLOPs) of the hypervolume
    hypervolume: float
    knee: Point | None

    @property
    def front(self) -> tuple[Point, ...]:
        return self.fronts.fronts[0] if self.fronts.fronts else ()


def summarize(points: Iterable[Point], *,
              reference: tuple[float, float] | None = None) -> ParetoSummary:
    """Fronts, hypervolume and knee of the points.

    The reference defaults to `default_reference` over the valid points (an invalid trial's cost
    must not move it); with no valid point and no reference it is None and the hypervolume 0.
    """
    fronts = non_dominated_sort(points)
    front = fronts.fronts[0] if fronts.fronts else ()
    if reference is None and front:
        reference = default_reference(p for f in fronts.fronts for p in f)
    reference = None if reference is None else (float(reference[0]), float(reference[1]))
    volume = 0.0 if reference is None else hypervolume(front, reference=reference)
    return ParetoSummary(fronts=fronts, reference=reference, hypervolume=volume,
                         knee=knee_point(front))


def _finite_or_none(value: object) -> object:
    """JSON has no NaN or infinity: write them as null (recursively through meta)."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _record(p: Point, summary: ParetoSummary, ranks: Mapping[str, int]) -> dict[str, object]:
    rank = ranks.get(p.id)
    return {"id": p.id, "miou": p.miou, "gflops": p.gflops, "rank": rank, "on_front": rank == 0,
            "is_knee": summary.knee is not None and p.id == summary.knee.id, "meta": dict(p.meta)}


def _write_text_tmp(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    return tmp


def write_front(path_json: os.PathLike | str, path_csv: os.PathLike | str,
                points: Iterable[Point], *,
                reference: tuple[float, float] | None = None) -> ParetoSummary:
    """Write `pareto.json` and `pareto.csv` for a set of trials, atomically.

    JSON: objectives (field → metric name and direction), reference, hypervolume, knee id, the
    front (rank 0) and every point with its rank, flags and meta; invalid points have rank null
    and their non-finite values written as null. CSV (for DVC plots, which want numbers): one row
    per ranked point with `CSV_COLUMNS`, by rank then front order; invalid points are only in the
    JSON. Both files are written to temporary names first and renamed only when both are
    complete, so a failure leaves any previous pair untouched.

    `reference` (mIoU, GFLOPs) defaults as in `summarize`; returns the summary written.
    """
    points = list(points)
    summary = summarize(points, reference=reference)
    ranks, ref = summary.fronts.ranks, summary.reference
    ordered = [p for front in summary.fronts.fronts for p in front]
    fields = {"miou": MIOU, "gflops": GFLOPS_MEAN}
    directions = dict(SEARCH_OBJECTIVES)
    document = {
        "objectives": {f: {"metric": m, "direction": directions[m]} for f, m in fields.items()},
        "reference": dict(zip(fields, ref, strict=True)) if ref else None,
        "hypervolume": summary.hypervolume,
        "knee": summary.knee.id if summary.knee else None,
        "front": [_record(p, summary, ranks) for p in summary.front],
        "points": [_record(p, summary, ranks) for p in ordered + list(summary.fronts.invalid)],
        "invalid": [p.id for p in summary.fronts.invalid],
    }
    text_json = json.dumps(_finite_or_none(document), indent=2, allow_nan=False, default=str)
    table = io.StringIO(newline="")
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in ordered:
        record = _record(p, summary, ranks)
        writer.writerow([str(record[c]).lower() if isinstance(record[c], bool) else record[c]
                         for c in CSV_COLUMNS])
    tmps: list[Path] = []
    try:  # both complete before either is renamed into place
        tmps.append(_write_text_tmp(Path(path_json), text_json + "\n"))
        tmps.append(_write_text_tmp(Path(path_csv), table.getvalue()))
        os.replace(tmps[0], path_json)
        os.replace(tmps[1], path_csv)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return summary
