"""Where a trial's budget ended, as trials.json records it (`trials_file.budget_end`)."""

import pytest

from dynroute.platform.search.trials_file import BUDGET_TOLERANCE, budget_end

FLOOR, ALL_OPEN = 0.064, 0.310


def end(cost_ratio, mu=0.1, lambda2=0.8, gflops=0.2):
    return budget_end(lambda2=lambda2, mu=mu, cost_ratio=cost_ratio, gflops=gflops,
                      floor=FLOOR, all_open=ALL_OPEN)


@pytest.mark.parametrize(("cost_ratio", "status"), [
    (0.1, "reached"), (0.1 + 0.9 * BUDGET_TOLERANCE, "reached"),
    (0.1 - 0.9 * BUDGET_TOLERANCE, "reached"), (0.1 + 1.1 * BUDGET_TOLERANCE, "above"),
    (0.34, "above"), (0.02, "below")])
def test_the_budget_ends_reached_above_or_below_its_target(cost_ratio, status):
    record = end(cost_ratio)
    assert record["status"] == status
    assert record["gap"] == pytest.approx(cost_ratio - 0.1)
    assert (record["cost_ratio"], record["mu"], record["tolerance"]) == (cost_ratio, 0.1,
                                                                          BUDGET_TOLERANCE)


def test_the_real_cost_is_put_against_the_floor_no_budget_removes():
    record = end(0.3, gflops=0.155)
    assert record["floor_fraction"] == pytest.approx(FLOOR / ALL_OPEN)
    assert record["real_fraction"] == pytest.approx(0.5)


def test_no_budget_or_no_figures_no_record():
    assert end(0.9, lambda2=0.0) is None, "Dynamic-Raw has no target"
    assert end(None) is None, "a study recorded before the figures existed"
    without_floor = budget_end(lambda2=0.8, mu=0.1, cost_ratio=0.3, gflops=0.2, floor=None,
                               all_open=None)
    assert without_floor["status"] == "above" and without_floor["floor_fraction"] is None
