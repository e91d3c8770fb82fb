"""MO-ASHA: the rung rule as pure functions, then a real Ray Tune run on a synthetic objective
whose right answer is known (which trials stop, and at which rung)."""

import math

import pytest

from dynroute.platform.pareto.analysis import Point
from dynroute.platform.search.mo_asha import (
    MOASHA,
    crowding_distances,
    rung_levels,
    rung_order,
    survivors,
)


def test_rungs_are_grace_times_powers_of_eta_below_the_end():
    assert rung_levels(grace_period=2, reduction_factor=2, max_t=8) == (2, 4)
    assert rung_levels(grace_period=100, reduction_factor=3, max_t=1000) == (100, 300, 900)
    assert rung_levels(grace_period=10, reduction_factor=2, max_t=10) == ()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"grace_period": 0, "reduction_factor": 2, "max_t": 8}, "tune.grace_period"),
    ({"grace_period": 2, "reduction_factor": 1, "max_t": 8}, "tune.reduction_factor"),
    ({"grace_period": 2, "reduction_factor": 2, "max_t": 0}, "max_t"),
])
def test_bad_rung_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rung_levels(**kwargs)


def test_survivors_keep_the_top_ceil_n_over_eta():
    assert [survivors(n, 2) for n in range(1, 6)] == [1, 1, 2, 2, 3]
    assert [survivors(n, 3) for n in (1, 3, 4, 7)] == [1, 1, 2, 3]


def test_crowding_gives_the_front_ends_infinity_and_inner_points_their_gaps():
    front = [Point("cheap", 0.3, 1.0), Point("mid", 0.5, 2.5), Point("near", 0.6, 3.5),
             Point("best", 0.7, 4.0)]
    d = crowding_distances(front)
    assert d["cheap"] == d["best"] == math.inf
    # mid: (0.6-0.3)/0.4 + (3.5-1)/3 ; near: (0.7-0.5)/0.4 + (4-2.5)/3
    assert d["mid"] == pytest.approx(0.75 + 2.5 / 3)
    assert d["near"] == pytest.approx(0.5 + 0.5)


def test_rung_order_is_rank_then_crowding_then_arrival_and_invalid_last():
    points = [Point("dominated", 0.5, 5.0), Point("nan", math.nan, 1.0),
              Point("best", 0.7, 4.0), Point("cheap", 0.3, 1.0), Point("mid", 0.5, 2.5),
              Point("twin", 0.5, 5.0)]
    order = [p.id for p in rung_order(points)]
    # front {best, cheap, mid}: ends first (by arrival), then mid; then the tied dominated pair
    # by arrival; the NaN point has no rank
    assert order == ["best", "cheap", "mid", "dominated", "twin", "nan"]


# -- a real Ray Tune run -----------------------------------------------------------------------
# Seven trials, run one at a time in this order, report constant (mIoU, GFLOPs) at steps 1..8.
# Rungs at 2 and 4 (grace 2, η 2, max_t 8). Worked out by hand:
#   rung 2: a alone → on; b dominated by a, 1 of 2 kept → stop; c dominates a → on;
#           d dominated by a and c, 3rd of 4, keep 2 → stop; f joins c on the front → on;
#           e (cheapest) and g join the front, which the 3 (then 4) kept places hold → on.
#   rung 4: a alone → on; c beats a → on; f and c are a two-point front → on;
#           e arrives 4th on the front {c, f, e}: an end of it (infinite crowding) it ranks
#             before f and is kept (2 of 4) — by arrival alone it would stop;
#           g arrives 5th on the front {e, f, g, c}: the least crowded, 4th, keep 3 → stop.
SYNTHETIC = {"a": (0.5, 5.0), "b": (0.4, 6.0), "c": (0.7, 4.0), "d": (0.45, 5.5),
             "f": (0.5, 2.5), "e": (0.3, 1.0), "g": (0.6, 3.5)}
EXPECTED_LAST_STEP = {"a": 8, "b": 2, "c": 8, "d": 2, "f": 8, "e": 8, "g": 4}


def synthetic_objective(config):
    from ray import tune

    miou, gflops = SYNTHETIC[config["name"]]
    for step in range(1, 9):
        tune.report({"step": step, "miou": miou, "gflops_mean": gflops})


def objective_without_gflops(config):
    from ray import tune

    for step in range(1, 9):
        tune.report({"step": step, "miou": 0.5})


@pytest.mark.slow
def test_mo_asha_stops_exactly_the_trials_the_rule_says(ray_cluster, tmp_path):
    from ray import tune

    tuner = tune.Tuner(
        synthetic_objective,
        param_space={"name": tune.grid_search(list(SYNTHETIC))},
        tune_config=tune.TuneConfig(
            scheduler=MOASHA(max_t=8, grace_period=2, reduction_factor=2),
            max_concurrent_trials=1),  # arrival order = trial order
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="mo-asha", verbose=0))
    results = tuner.fit()
    assert not results.errors
    last = {r.config["name"]: r.metrics["step"] for r in results}
    assert last == EXPECTED_LAST_STEP


@pytest.mark.slow
def test_a_report_without_an_objective_fails_loudly(ray_cluster, tmp_path):
    from ray import tune

    tuner = tune.Tuner(
        objective_without_gflops,
        tune_config=tune.TuneConfig(
            scheduler=MOASHA(max_t=8, grace_period=2, reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="missing", verbose=0))
    with pytest.raises(Exception, match="gflops_mean"):
        tuner.fit()
