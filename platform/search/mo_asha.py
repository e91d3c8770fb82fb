"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

ASHA (Li et al., MLSys 2020) stops a trial at a rung unless it is among the best 1/η of the
trials that reached that rung so far; MO-ASHA (Schmucker et al., 2021; syne-tune) replaces "best"
by non-dominated sorting, so early stopping works with both objectives of the budget search
(mIoU max; the cost min: mean GFLOPs, or the p90 latency in ms with `tune.cost: latency`). Ray's
own ASHA takes one metric, and OptunaSearch ignores intermediate results of a multi-objective
study (docs/platform.md, pitfall 3).

Rungs sit at grace_period·η^k iterations below `max_t` (the end of training, not a rung). A trial
reporting `time_attr` ≥ a rung it has not been judged at is recorded there and judged against
every trial recorded at that rung so far (itself included), asynchronously as in ASHA: trials
that arrive later never stop one judged earlier. The n recorded points are ordered by

1. Pareto rank (`pareto.non_dominated_sort`; a NaN or infinite objective ranks after all),
2. within a rank, crowding distance, largest first (NSGA-II: the two cheapest/most accurate
   ends of a front are infinitely crowded-apart, so the front keeps its extent),
3. then arrival order at the rung (earlier first), so decisions are deterministic;

and the trial continues iff it is among the first ceil(n/η) (the first trial at a rung always
continues, as in ASHA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from dynroute.platform.metrics import GFLOPS_MEAN, MIOU
from dynroute.platform.pareto.analysis import Point, non_dominated_sort

STEP = "step"


def rung_levels(*, grace_period: int, reduction_factor: int, max_t: int) -> tuple[int, ...]:
    """The rungs grace_period·η^k that lie below max_t, ascending (empty if grace ≥ max_t)."""
    if grace_period < 1:
        raise ValueError(f"tune.grace_period = {grace_period}: the first rung must be at least "
                         f"1 iteration")
    if reduction_factor < 2:
        raise ValueError(f"tune.reduction_factor = {reduction_factor}: must be at least 2 "
                         f"(keep 1/η of the trials at each rung)")
    if max_t < 1:
        raise ValueError(f"max_t = {max_t}: trials must train at least 1 iteration")
    levels, level = [], grace_period
    while level < max_t:
        levels.append(level)
        level *= reduction_factor
    return tuple(levels)


def crowding_distances(front: Sequence[Point]) -> dict[str, float]:
    """NSGA-II crowding distance of each point of one front over (mIoU, GFLOPs).

    Per objective, the points are sorted; the two ends get infinity and an inner point the gap
    between its neighbours divided by the objective's range on the front (0 when the range is).
    """
    distance = {p.id: 0.0 for p in front}
    if len(front) <= 2:
        return {p.id: math.inf for p in front}
    for value in (lambda p: p.miou, lambda p: p.gflops):
        ordered = sorted(front, key=lambda p: (value(p), p.id))
        span = value(ordered[-1]) - value(ordered[0])
        distance[ordered[0].id] = distance[ordered[-1].id] = math.inf
        for before, point, after in zip(ordered, ordered[1:], ordered[2:], strict=False):
            if span > 0 and math.isfinite(distance[point.id]):
                distance[point.id] += (value(after) - value(before)) / span
    return distance


def rung_order(points: Sequence[Point]) -> list[Point]:
    """The points of one rung, best first (rank, then crowding, then the given order)."""
    arrival = {p.id: i for i, p in enumerate(points)}
    sorted_points = non_dominated_sort(points)
    ordered: list[Point] = []
    for front in sorted_points.fronts:
        crowding = crowding_distances(front)
        ordered += sorted(front, key=lambda p: (-crowding[p.id], arrival[p.id]))
    return ordered + sorted(sorted_points.invalid, key=lambda p: arrival[p.id])


def survivors(n: int, reduction_factor: int) -> int:
    """How many of n trials at a rung continue: ceil(n/η)."""
    return -(-n // reduction_factor)


@dataclass(frozen=True)
class Decision:
    trial_id: str
    rung: int
    position: int  # 0-based place in `rung_order` among the `recorded` points
    recorded: int
    keep: bool


class MOASHA(FIFOScheduler):
    """MO-ASHA over mIoU and the search's cost (see the module docstring for the rule).

    Args:
        max_t: the iterations a trial trains in all (no rung there).
        grace_period: the first rung, in `time_attr` units.
        reduction_factor: η; about 1/η of the trials at a rung go on to the next.
        time_attr: the result key that counts training progress (the trainable's step).
        cost: the result key of the cost objective, minimised: the study's second objective
            (`SearchSpec.cost_metric`), so that a rung ranks trials as the study does.

    Every result must carry both objectives and `time_attr`; one that does not is an error
    (a silently skipped decision would let a trial run to the end unjudged).
    """

    _supports_buffered_results = False  # decide at every rung, not on a batch of results

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: int,
                 time_attr: str = STEP, cost: str = GFLOPS_MEAN) -> None:
        super().__init__()
        self.levels = rung_levels(grace_period=grace_period, reduction_factor=reduction_factor,
                                  max_t=max_t)
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.time_attr = time_attr
        self.cost = cost
        self._rungs: dict[int, list[Point]] = {level: [] for level in self.levels}
        self.decisions: list[Decision] = []

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are fixed: mIoU and `cost`

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        missing = [k for k in (self.time_attr, MIOU, self.cost) if k not in result]
        if missing:
            raise KeyError(f"MO-ASHA: trial {trial.trial_id} reported {sorted(result)} without "
                           f"{', '.join(missing)}; every report must carry both objectives and "
                           f"{self.time_attr!r}")
        t = result[self.time_attr]
        for level in reversed(self.levels):
            recorded = self._rungs[level]
            if t >= level and all(p.id != trial.trial_id for p in recorded):
                # Point's `gflops` is the minimised cost of the sort, whichever cost it is.
                recorded.append(Point(id=trial.trial_id, miou=result[MIOU],
                                      gflops=result[self.cost]))
                decision = self._judge(trial.trial_id, level)
                return TrialScheduler.CONTINUE if decision.keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _judge(self, trial_id: str, level: int) -> Decision:
        recorded = self._rungs[level]
        order = [p.id for p in rung_order(recorded)]
        position = order.index(trial_id)
        keep = position < survivors(len(recorded), self.reduction_factor)
        decision = Decision(trial_id=trial_id, rung=level, position=position,
                            recorded=len(recorded), keep=keep)
        self.decisions.append(decision)
        return decision

    def debug_string(self) -> str:
        counts = ", ".join(f"{level}: {len(self._rungs[level])}" for level in self.levels)
        return (f"MO-ASHA (η={self.reduction_factor}, max_t={self.max_t}); trials per rung: "
                f"{counts or 'no rungs'}")
