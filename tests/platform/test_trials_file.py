"""trials.json: where a trial's budget ended (`trials_file.budget_end`), and the cost a study
minimised with each trial's latency figures (`tune.cost: latency`)."""

import json
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

from dynroute.models import NetworkConfig
from dynroute.platform import metrics as M
from dynroute.platform.search import study as S
from dynroute.platform.search.latency_cost import LATENCY_DEVICE, LATENCY_NOISE
from dynroute.platform.search.trials_file import BUDGET_TOLERANCE, budget_end, write_trials
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrainSpec

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


def _study_with_a_complete_and_a_pruned_trial(spec):
    """An in-memory study as _StudySearch leaves it: figures as user attributes."""
    figures = {k: 1.0 for k in spec.report_keys} | {M.LATENCY_P90_MS: 7.5, "step": 4}
    study = optuna.create_study(directions=["maximize", "minimize"])
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        trial = study.ask()
        S.DefineTrial(spec.ranges.values(), spec.study)(trial)
        for key, value in figures.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr(LATENCY_DEVICE, "cpu-x-1t-torch-2")
        trial.set_user_attr(LATENCY_NOISE, {"spread": 0.1, "disturbed": False})
        study.tell(trial, [1.0, 7.5] if state == TrialState.COMPLETE else None, state=state)
    return study


def test_trials_json_records_the_cost_and_each_trials_latency(tmp_path):
    base = TrainSpec(data="data", model=NetworkConfig(), train=TrainConfig())
    spec = S.SearchSpec(study="s", storage=str(tmp_path / "j"), results=str(tmp_path / "tune"),
                        seed_budgets=(), num_samples=2, iterations=4, cost="latency")
    study = _study_with_a_complete_and_a_pruned_trial(spec)
    document = json.loads(write_trials(spec, base, study, parent_run_id=None).read_text())
    assert document["cost"] == "latency"
    assert document["objectives"] == [["miou", "max"], ["latency_p90_ms", "min"]]
    complete, pruned = document["trials"]
    assert complete[M.LATENCY_P90_MS] == 7.5 and complete[LATENCY_DEVICE] == "cpu-x-1t-torch-2"
    assert complete[LATENCY_NOISE] == {"spread": 0.1, "disturbed": False}
    assert pruned[M.LATENCY_P90_MS] is None and pruned["last_rung"][M.LATENCY_P90_MS] == 7.5

    gflops = replace(spec, cost="gflops")  # the same trials, read as a GFLOPs study's
    document = json.loads(write_trials(gflops, base, study, parent_run_id=None).read_text())
    assert document["cost"] == "gflops"
    assert document["objectives"] == [["miou", "max"], ["gflops_mean", "min"]]
    assert not any("latency" in key for t in document["trials"] for key in t)
    assert not any("latency" in key for key in document["trials"][1]["last_rung"])
