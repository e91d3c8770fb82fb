"""`tune.cost: latency`: the settings it refuses, concurrent trials on a CPU refused, a timing
another process disturbs failing the trial, MO-ASHA ranking on latency, a study kept to its
cost, and a real search (Ray on 127.0.0.1) whose Optuna values are the measured p90 latency."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import optuna
import pytest
import torch

from dynroute.models import build_network
from dynroute.platform import metrics as M
from dynroute.platform.evaluate.latency import LatencyDisturbed, LatencySettings
from dynroute.platform.search import latency_cost as LC
from dynroute.platform.search import study as S
from dynroute.platform.search import tune as T
from dynroute.platform.search.mo_asha import MOASHA

from .test_tune import TINY_MODEL, base_spec, search

QUICK = LatencySettings(images=2, warmup=1, repeats=3, attempts=1)
NOISE = {"spread", "busy_elsewhere", "calibration_drift", "repeat_drift", "attempts",
         "disturbed", "threads", "images", "repeats", "warmup"}


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    ({"cost": "ms"}, r"tune.cost = 'ms': choose gflops .* or latency"),
    ({"cost": "latency", "max_gflops": 2.0}, r"tune.max_gflops = 2.0 bounds GFLOPs"),
])
def test_bad_cost_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(S.SearchError, match=message):
        search(tmp_path, **overrides)
    search(tmp_path, cost="latency")  # and a good one passes


def test_a_timing_the_median_cannot_trust_is_refused():
    with pytest.raises(ValueError, match="at least 3"):
        LatencySettings(repeats=2)


def test_the_cost_picks_the_second_objective_and_the_report_keys(tmp_path):
    gflops, latency = search(tmp_path), search(tmp_path, cost="latency")
    assert gflops.objectives == M.SEARCH_OBJECTIVES and gflops.report_keys == S.REPORT_KEYS
    assert latency.objectives == ((M.MIOU, "max"), (M.LATENCY_P90_MS, "min"))
    report = {k: 1.0 for k in S.REPORT_KEYS} | {"step": 4}
    assert S.check_report(report, where="t") == report
    with pytest.raises(ValueError, match=r"lacks finite latency_p90_ms, latency_p50_ms"):
        S.check_report(report, where="t", keys=latency.report_keys)


@pytest.mark.parametrize("max_concurrent", [0, 2])
def test_concurrent_trials_timed_on_one_cpu_are_refused(tmp_path, max_concurrent):
    spec = search(tmp_path, cost="latency", max_concurrent=max_concurrent)
    base = base_spec(tmp_path / "no-data")  # refused before the data is even read
    with pytest.raises(ValueError, match=r"Set tune.max_concurrent: 1.*tune.cost: gflops"):
        T.run_study(spec, base)
    LC.check_concurrency(cost="latency", max_concurrent=1, on_gpu=False)
    LC.check_concurrency(cost="latency", max_concurrent=max_concurrent, on_gpu=True)
    LC.check_concurrency(cost="gflops", max_concurrent=max_concurrent, on_gpu=False)


def test_a_study_keeps_the_cost_it_was_created_with(tmp_path):
    S.load_study(search(tmp_path))
    with pytest.raises(S.SearchError, match=r"minimised gflops; tune.cost now asks for "
                                            r"latency.*use another tune.study"):
        S.load_study(search(tmp_path, cost="latency"))
    latency = search(tmp_path, study="lat", cost="latency")
    assert S.load_study(latency).user_attrs[S.COST_ATTR] == "latency"
    with pytest.raises(S.SearchError, match="minimised latency"):
        S.load_study(search(tmp_path, study="lat"))
    # a study from before tune.cost (mode recorded, cost not) minimised GFLOPs
    old = optuna.create_study(study_name="old", storage=S.open_storage(latency.storage),
                              directions=["maximize", "minimize"])
    old.set_user_attr(S.MODE_ATTR, "pareto")
    with pytest.raises(S.SearchError, match="minimised gflops"):
        S.load_study(search(tmp_path, study="old", cost="latency"))


# -- MO-ASHA on latency ----------------------------------------------------------------------
@pytest.mark.parametrize(("cost", "second_kept"), [(M.GFLOPS_MEAN, False),
                                                   (M.LATENCY_P90_MS, True)])
def test_mo_asha_ranks_a_rung_on_the_studys_cost(cost, second_kept):
    """Equal mIoU; the second trial is dearer in GFLOPs but faster: a rung keeps 1 of 2."""
    scheduler = MOASHA(max_t=8, grace_period=2, reduction_factor=2, cost=cost)
    first = {"step": 2, M.MIOU: 0.5, M.GFLOPS_MEAN: 1.0, M.LATENCY_P90_MS: 30.0}
    second = {"step": 2, M.MIOU: 0.5, M.GFLOPS_MEAN: 2.0, M.LATENCY_P90_MS: 20.0}
    assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="a"), first) == "CONTINUE"
    decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id="b"), second)
    assert decision == ("CONTINUE" if second_kept else "STOP")
    with pytest.raises(KeyError, match=cost):
        scheduler.on_trial_result(None, SimpleNamespace(trial_id="c"),
                                  {"step": 2, M.MIOU: 0.5})


# -- the measurement -------------------------------------------------------------------------
def test_a_trial_is_timed_with_its_cpus_as_threads(prepared):
    before = torch.get_num_threads()
    timing = replace(QUICK, accept_disturbed=True)  # the test machine may be busy: no verdict
    figures = LC.measure_latency(build_network(TINY_MODEL), data=str(prepared), split="val",
                                 resolution=(64, 128), device="cpu", threads=1, timing=timing)
    assert torch.get_num_threads() == before, "the process's threads are restored"
    assert 0 < figures[M.LATENCY_P50_MS] <= figures[M.LATENCY_P90_MS]
    assert figures[M.LATENCY_MEAN_MS] > 0
    assert figures[LC.LATENCY_DEVICE].startswith("cpu-") and "-1t-" in figures[LC.LATENCY_DEVICE]
    noise = figures[LC.LATENCY_NOISE]
    assert set(noise) == NOISE and noise["threads"] == 1
    assert (noise["images"], noise["repeats"]) == (2, 3)
    json.dumps(figures, allow_nan=False)  # trials.json is strict JSON


def test_a_timing_another_process_disturbs_fails_the_trial(prepared):
    """Timed with every core as a thread, a spinning process is busy where no core was free."""
    cores = len(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with pytest.raises(LatencyDisturbed, match=r"other processes kept .* Tune runs it again"):
            LC.measure_latency(build_network(TINY_MODEL), data=str(prepared), split="val",
                               resolution=(64, 128), device="cpu", threads=cores, timing=QUICK)
    finally:
        spinner.kill()
        spinner.wait()


# -- a real search ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_latency_search_minimises_the_measured_p90(ray_cluster, prepared, tmp_path):
    # accept_disturbed: the test machine runs other jobs; the figures are then marked so
    spec = search(tmp_path, num_samples=2, max_concurrent=1, cost="latency", warm_start=False,
                  latency=replace(QUICK, accept_disturbed=True))
    document = json.loads(T.run_study(spec, base_spec(prepared)).read_text())
    assert document["cost"] == "latency"
    assert document["objectives"] == [["miou", "max"], ["latency_p90_ms", "min"]]
    study = optuna.load_study(study_name="s", storage=S.open_storage(spec.storage))
    assert study.user_attrs[S.COST_ATTR] == "latency"
    assert len(document["trials"]) == 2
    for record, trial in zip(document["trials"], study.trials, strict=True):
        assert record["state"] == "COMPLETE"
        assert trial.values == [record["miou"], record["latency_p90_ms"]], "latency, not GFLOPs"
        assert 0 < record["latency_p50_ms"] <= record["latency_p90_ms"]
        assert record["gflops_mean"] > 0, "GFLOPs are still recorded (pareto / register)"
        assert record["latency_device"].startswith("cpu-") and "-1t-" in record["latency_device"]
        assert set(record["latency_noise"]) == NOISE
        assert record["latency_noise"]["threads"] == 1 and record["latency_noise"]["images"] == 2
    with pytest.raises(S.SearchError, match=r"use another tune\.study"):
        T.run_study(replace(spec, cost="gflops"), base_spec(prepared), resume=True)
