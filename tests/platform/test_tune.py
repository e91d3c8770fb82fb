"""The budget search: space and seeds, the Optuna study's resume rules, and real studies (Ray on
127.0.0.1, a real MLflow server, a real Optuna journal) — tracked, hard-budget, and resumed after
the driver was killed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from dynroute.models import BUDGETS, NetworkConfig
from dynroute.platform.data.shards import read_scene_kinds
from dynroute.platform.search import study as S
from dynroute.platform.search import trial as TR
from dynroute.platform.search import tune as T
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrackingSpec, TrainSpec

BIN = Path(sys.executable).parent
SPACE = {"train.lambda2": {"low": 0.05, "high": 1.5, "log": True},
         "train.mu": {"low": 0.0, "high": 0.6}}
TINY_MODEL = NetworkConfig(layers=4, base_channels=4, num_classes=19)
TINY_TRAIN = TrainConfig(iterations=4, batch_size=2, crop=(64, 64), warmup_iterations=1)


def search(tmp_path: Path, **overrides) -> S.SearchSpec:
    settings = {"study": "s", "storage": str(tmp_path / "optuna.journal"),
                "results": str(tmp_path / "tune"), "num_samples": 3, "space": SPACE,
                "iterations": 4, "seed_budgets": ("dynamic-a", "dynamic-b"),
                "max_concurrent": 2, "cost_resolution": (64, 128)}
    return S.SearchSpec(**(settings | overrides))


def base_spec(data: Path, uri: str | None = None) -> TrainSpec:
    return TrainSpec(data=str(data), model=TINY_MODEL, train=TINY_TRAIN, checkpoint_every=2,
                     log_every=2, tracking=TrackingSpec(uri=uri, experiment="tune-test"))


# -- space, seeds, settings ------------------------------------------------------------------
def test_space_parses_dotted_keys_into_ranges():
    ranges = S.parse_space(SPACE | {"model.layers": {"low": 4, "high": 8}})
    assert ranges["train.lambda2"] == S.Range("train.lambda2", 0.05, 1.5, log=True)
    assert ranges["train.mu"] == S.Range("train.mu", 0.0, 0.6, log=False)
    assert ranges["model.layers"].integer and not ranges["train.mu"].integer


@pytest.mark.parametrize(("space", "message"), [
    ({}, "tune.space is empty"),
    ({"lambda2": {"low": 0.1, "high": 1}}, r"tune.space.lambda2: keys are train.<field>"),
    ({"optim.lr": {"low": 0.1, "high": 1}}, r"tune.space.optim.lr: keys are"),
    ({"train.lambda": {"low": 0.1, "high": 1}}, r"train.lambda is not a numeric train field"),
    ({"train.budget": {"low": 0.1, "high": 1}}, r"train.budget is not a numeric"),
    ({"train.mu": {"low": 0.5, "high": 0.5}}, r"tune.space.train.mu: low \(0.5\) must be below"),
    ({"train.mu": {"low": 0.0, "high": 0.5, "log": True}}, r"log range needs low > 0"),
    ({"train.mu": {"low": 0.0}}, r"tune.space.train.mu: give exactly low, high"),
    ({"train.mu": {"low": 0.0, "high": 1, "step": 0.1}}, r"give exactly low, high"),
    ({"train.mu": {"low": "a", "high": 1}}, r"low and high must be finite numbers"),
    ({"train.mu": [0, 1]}, r"expected \{low, high, log\}"),
    ({"train.mu": {"low": 0, "high": 1, "log": "yes"}}, r"tune.space.train.mu.log"),
    ({"model.layers": {"low": 4, "high": 8.5}}, r"model.layers is an integer"),
])
def test_bad_space_gets_an_error_naming_the_key(space, message):
    with pytest.raises(S.SearchError, match=message):
        S.parse_space(space)


def test_seed_points_are_the_papers_budgets():
    points = S.seed_points(["dynamic-a", "dynamic-c"], S.parse_space(SPACE))
    a, c = BUDGETS["dynamic-a"], BUDGETS["dynamic-c"]
    assert points == [("dynamic-a", {"train.lambda2": a.lambda2, "train.mu": a.mu}),
                      ("dynamic-c", {"train.lambda2": c.lambda2, "train.mu": c.mu})]
    only_mu = S.parse_space({"train.mu": {"low": 0.0, "high": 0.6}})
    assert S.seed_points(["dynamic-b"], only_mu) == [("dynamic-b", {"train.mu": 0.1})]


@pytest.mark.parametrize(("budgets", "space", "message"), [
    (["dynamic-q"], SPACE, "unknown budget 'dynamic-q'"),
    (["dynamic-a"], {"train.lambda2": {"low": 0.05, "high": 0.5}, "train.mu": SPACE["train.mu"]},
     r"dynamic-a has train.lambda2 = 0.8, outside tune.space.train.lambda2 \[0.05, 0.5\]"),
    (["dynamic-a"], {"train.lr": {"low": 0.01, "high": 0.1}}, "searches neither"),
])
def test_bad_seeds_are_rejected_clearly(budgets, space, message):
    with pytest.raises(S.SearchError, match=message):
        S.seed_points(budgets, S.parse_space(space))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_samples": 1}, r"tune.num_samples = 1 is smaller than the 2 tune.seed_budgets"),
    ({"scheduler": "asha"}, "tune.scheduler = 'asha'"),
    ({"max_gflops": -1.0}, "tune.max_gflops"),
    ({"iterations": 0}, "tune.iterations"),
    ({"results": "s3://bucket/tune"}, "tune.results"),
    ({"scheduler": "mo-asha", "reduction_factor": 1}, "tune.reduction_factor"),
])
def test_bad_search_settings_fail_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        search(tmp_path, **overrides)


def test_stops_are_the_rungs_then_the_end(tmp_path):
    assert search(tmp_path).stops == (4,)
    spec = search(tmp_path, iterations=20, scheduler="mo-asha", grace_period=5)
    assert spec.stops == (5, 10, 20)


def test_concurrency_comes_from_resources_and_per_trial_needs(tmp_path, prepared):
    base = base_spec(prepared)
    spec = search(tmp_path, max_concurrent=0, trial_cpus=1.0)
    assert T.max_concurrent_trials(spec, base, {"CPU": 8.0}) == 8
    assert T.max_concurrent_trials(spec, replace(base, workers=2), {"CPU": 8.0}) == 2
    gpu = replace(base, use_gpu=True, workers=2)
    assert T.max_concurrent_trials(spec, gpu, {"CPU": 16.0, "GPU": 4.0}) == 2
    assert T.max_concurrent_trials(search(tmp_path, max_concurrent=3), base, {"CPU": 1}) == 3
    with pytest.raises(S.SearchError, match=r"a trial needs 3\.0 CPU but Ray reports 2\.0"):
        T.max_concurrent_trials(spec, replace(base, workers=2), {"CPU": 2.0})


def test_trial_spec_applies_params_and_names_the_run(tmp_path, prepared):
    spec = TR.trial_spec(search(tmp_path, iterations=7), base_spec(prepared),
                        {"train.lambda2": 0.3, "model.base_channels": 8}, run_name="s-t004",
                        parent_run_id="parent", tags={"study": "s"})
    assert spec.train.lambda2 == 0.3 and spec.train.iterations == 7
    assert spec.model.base_channels == 8
    assert spec.name == spec.tracking.run_name == "s-t004"
    assert spec.storage == str(tmp_path / "tune" / "trials")
    assert spec.tracking.parent_run_id == "parent" and spec.tracking.tags == {"study": "s"}


def test_a_report_without_both_objectives_fails_loudly():
    report = {"miou": 0.5, "gflops_mean": 1.0, "gflops_max": 2.0, "gflops_min": 0.5,
              "gflops_p50": 1.0, "gflops_p90": 1.5, "step": 4, "checkpoint": "/x"}
    assert S.check_report(report, where="t")["gflops_mean"] == 1.0
    with pytest.raises(ValueError, match=r"trial 3: the report lacks finite gflops_mean"):
        S.check_report({k: v for k, v in report.items() if k != "gflops_mean"}, where="trial 3")
    with pytest.raises(ValueError, match="lacks finite miou"):
        S.check_report(report | {"miou": float("nan")}, where="trial 3")


# -- the study's resume rules (Optuna alone) -------------------------------------------------
def test_interrupted_trials_are_requeued_under_their_run_name(tmp_path):
    spec = search(tmp_path, num_samples=4)
    study = S.load_study(spec)
    for name, point in S.seed_points(spec.seed_budgets, spec.ranges):
        study.enqueue_trial(point, user_attrs={S.SEEDED_ATTR: name}, skip_if_exists=True)
    define = S.DefineTrial(spec.ranges.values(), spec.study)
    first = study.ask()
    assert define(first)["run_name"] == "s-t000"
    study.tell(first, [0.5, 1.0])
    running = study.ask()  # the driver dies while this one trains
    config = define(running)
    assert config == {"optuna_trial": 1, "run_name": "s-t001", "seeded_from": "dynamic-b"}

    # a new driver: the same study from the same journal
    study = S.load_study(spec)
    assert S.requeue_interrupted(study) == [1]
    for name, point in S.seed_points(spec.seed_budgets, spec.ranges):  # again: no duplicates
        study.enqueue_trial(point, user_attrs={S.SEEDED_ATTR: name}, skip_if_exists=True)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.WAITING]
    assert S.finished_trials(trials) == 1, "the abandoned trial does not count"
    retry = study.ask()
    again = define(retry)
    assert retry.number == 2 and again["run_name"] == "s-t001", "resumes the old training"
    assert again["seeded_from"] == "dynamic-b"
    assert retry.params == {"train.lambda2": 0.5, "train.mu": 0.1}


def test_a_study_with_other_objectives_is_refused(tmp_path):
    S.load_study(search(tmp_path))
    with pytest.raises(S.SearchError, match="was run in pareto mode"):
        S.load_study(search(tmp_path, max_gflops=1.0))


def test_an_existing_study_needs_resume_and_a_full_one_is_not_rerun(tmp_path, prepared):
    spec = search(tmp_path, num_samples=2)
    study = S.load_study(spec)
    for value in (0.1, 0.2):
        trial = study.ask()
        S.DefineTrial(spec.ranges.values(), spec.study)(trial)
        for key, figure in {"miou": value, "gflops_mean": 1.0, "gflops_max": 1.0,
                            "gflops_min": 1.0, "gflops_p50": 1.0, "gflops_p90": 1.0,
                            "step": 4}.items():
            trial.set_user_attr(key, figure)
        study.tell(trial, [value, 1.0])
    with pytest.raises(S.SearchError, match="continue it with --resume"):
        T.run_study(spec, base_spec(prepared))
    started = time.monotonic()
    path = T.run_study(spec, base_spec(prepared), resume=True)  # nothing left: no Ray, no trial
    assert time.monotonic() - started < 5
    document = json.loads(path.read_text())
    assert [t["miou"] for t in document["trials"]] == [0.1, 0.2]
    assert len(S.load_study(spec).trials) == 2


# -- resume after the driver was killed ------------------------------------------------------
def write_params(path: Path, data: Path, **tune) -> Path:
    params = {
        "data": {"prepared": str(data)},
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 24, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"checkpoint_every": 2, "log_every": 2, "max_failures": 1},
        "evaluate": {"cost_resolution": [64, 128]},
        "tracking": {"uri": "none"},
        "tune": {"study": "r", "storage": "tune/optuna.journal", "results": "tune",
                 "num_samples": 3, "seed_budgets": ["dynamic-a"], "max_concurrent": 1} | tune,
    }
    path.write_text(yaml.safe_dump(params))
    return path


def dynroute_env() -> dict:
    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                         "RAY_DEDUP_LOGS": "0"}


def study_trials(tmp_path: Path):
    journal = tmp_path / "tune" / "optuna.journal"
    if not journal.exists():
        return []
    try:
        return optuna.load_study(study_name="r", storage=S.open_storage(str(journal))).trials
    except KeyError:  # the study is not created yet
        return []


SHARED_STEPS = 9  # ⌊0.4 · 24⌋: the trials start from the study's shared prefix (warm start)


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml", prepared)
    command = [str(BIN / "dynroute"), "tune", "--params", str(params)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=dynroute_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # kill once a trial is complete and the next one has a checkpoint mid-training
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "no complete trial\n" + "".join(lines)[-4000:]
            trials = study_trials(tmp_path)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            if done and running and running[0].user_attrs.get("run_name"):
                run_dir = tmp_path / "tune" / "trials" / running[0].user_attrs["run_name"]
                reached = [int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*")]
                reached = [step for step in reached if step > SHARED_STEPS]
                if reached:  # mid-training (24 iterations, a checkpoint every 2)
                    break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
        reader.join(timeout=10)
    before = {t.number: t for t in study_trials(tmp_path)}
    killed = running[0].number
    completed = {n for n, t in before.items() if t.state == TrialState.COMPLETE}
    assert before[killed].state == TrialState.RUNNING

    # The killed driver's Ray workers are reaped by Ray, not by the kill: wait until the trial's
    # task is gone, so that what happens next is the resumed session's work alone.
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", "ray::train_and_evaluate"],
                         capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the killed study's Ray task is still running"
        time.sleep(0.2)
    resume_started = time.time()
    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=dynroute_env(),
                             capture_output=True, text=True, timeout=400)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    after = study_trials(tmp_path)
    for n in completed:  # finished trials are not run again
        assert after[n].state == TrialState.COMPLETE
        assert after[n].datetime_complete == before[n].datetime_complete
        assert f"r-t{n:03d}:" not in resumed.stderr
    assert after[killed].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == before[killed].params
    assert retries[0].user_attrs["run_name"] == f"r-t{killed:03d}"
    # The retry never trains from zero. Either it resumed the old training from a checkpoint at
    # least as far as the kill (its final checkpoint records where it restarted: log lines can
    # be lost when Ray forwards them to a driver that is shutting down), or the killed driver's
    # Ray worker finished those few steps before Ray reaped it, and the retry evaluated that
    # final checkpoint instead of training again.
    final = max(run_dir.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
    state = torch.load(final / "state.pt", weights_only=False)
    assert state["step"] == 24
    finished_before = (final / "state.pt").stat().st_mtime < resume_started
    assert finished_before or (state["resumes"] and state["resumes"][0] >= max(reached)), (
        f"the retry resumes the old training (checkpoint {max(reached)} at the kill): "
        f"{state['resumes']}\n" + output[-4000:])
    # the study reached num_samples: 3 finished trials, plus the abandoned one
    counted = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(counted) == 3 and len(after) == 4
    document = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert [t["number"] for t in document["trials"]] == [0, 1, 2, 3]
    assert document["trials"][killed]["state"] == "FAILED"
    assert {t["state"] for i, t in enumerate(document["trials"]) if i != killed} == {"COMPLETE"}
    assert document["trials"][0]["seeded_from"] == "dynamic-a"


# -- real studies ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from dynroute.platform.tracking.server import MlflowServer

    with MlflowServer(root=tmp_path_factory.mktemp("mlruns")) as server:
        yield server


FIGURES = ("miou", "gflops_mean", "gflops_max", "gflops_min", "gflops_p50", "gflops_p90")


@pytest.mark.slow
def test_a_tracked_study_with_mo_asha_writes_trials_and_child_runs(ray_cluster, mlflow_server,
                                                                   prepared, tmp_path):
    """Two seeded trials, one at a time, rung at step 2 of 4. The budget loss is off until half
    way (budget_start 0.5), so both have trained the same network by the rung: equal points,
    tie → the earlier arrival is kept (1 of 2), the second is stopped there."""
    from mlflow import MlflowClient

    seen = []
    spec = search(tmp_path, num_samples=2, max_concurrent=1, scheduler="mo-asha",
                  grace_period=2, reduction_factor=2)
    base = base_spec(prepared, mlflow_server.uri)
    base = replace(base, train=replace(base.train, budget_start=0.5))
    path = T.run_study(spec, base, on_trial=lambda entry, done, total: seen.append(
        (entry["id"], entry["state"], done, total)))
    document = json.loads(path.read_text())
    assert path == tmp_path / "tune" / "trials.json"
    assert document["study"] == "s" and document["mode"] == "pareto"
    assert document["objectives"] == [["miou", "max"], ["gflops_mean", "min"]]
    assert document["cost_resolution"] == [64, 128] and document["max_gflops"] is None
    kept, stopped = document["trials"]
    assert seen == [("s-t000", "COMPLETE", 1, 2), ("s-t001", "PRUNED", 2, 2)]
    for t, name in ((kept, "dynamic-a"), (stopped, "dynamic-b")):  # the seeds ran first
        assert t["seeded_from"] == name and t["iterations"] == 4
        assert (t["lambda2"], t["mu"]) == (BUDGETS[name].lambda2, BUDGETS[name].mu)
        assert t["params"] == {"train.lambda2": t["lambda2"], "train.mu": t["mu"]}
    assert kept["id"] == "s-t000" and kept["state"] == "COMPLETE"
    assert 0.0 <= kept["miou"] <= 1.0
    assert kept["gflops_min"] <= kept["gflops_mean"] <= kept["gflops_max"]
    assert kept["gflops_floor"] < kept["gflops_min"] <= kept["gflops_max"] <= \
        kept["gflops_all_open"]
    end = kept["budget_end"]  # where the budget ended: the training's last logged E/C_all
    assert end["mu"] == kept["mu"] and 0 < end["cost_ratio"] <= 1
    assert end["status"] in ("reached", "above", "below")
    assert end["floor_fraction"] == pytest.approx(kept["gflops_floor"] / kept["gflops_all_open"])
    kinds = read_scene_kinds(str(prepared), "val")  # the synthetic set's scene kinds
    assert sum(entry["images"] for entry in kept["by_kind"].values()) == len(kinds)
    assert set(kept["by_kind"]) == set(kinds.values())
    assert kept["checkpoint"] == str(tmp_path / "tune" / "trials" / "s-t000" /
                                     "checkpoint_00000004")
    assert kept["model_uri"] == f"runs:/{kept['mlflow_run_id']}/model"
    assert stopped["id"] == "s-t001" and stopped["state"] == "PRUNED"
    assert stopped["miou"] is None and stopped["model_uri"] is None
    assert stopped["last_rung"]["step"] == 2

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(document["parent_run_id"])
    assert parent.info.run_name == "s" and parent.info.status == "FINISHED"
    assert parent.data.tags["study"] == "s" and parent.data.tags["mode"] == "pareto"
    experiment = client.get_experiment_by_name("tune-test")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == ["s-t000", "s-t001"]
    final = by_name["s-t000"]
    assert final.info.run_id == kept["mlflow_run_id"] and final.info.status == "FINISHED"
    for figure in FIGURES:
        assert final.data.metrics[figure] == pytest.approx(kept[figure])
    ratio = client.get_metric_history(final.info.run_id, "expected_cost_ratio")
    assert ratio[-1].step == 4 and ratio[-1].value == pytest.approx(end["cost_ratio"])
    assert float(final.data.params["lambda2"]) == pytest.approx(kept["lambda2"])
    assert float(final.data.params["mu"]) == pytest.approx(kept["mu"])
    assert final.data.tags["study"] == "s" and final.data.tags["seeded_from"] == "dynamic-a"
    early = by_name["s-t001"]
    assert early.info.run_id == stopped["mlflow_run_id"] and early.info.status == "KILLED"
    rung = client.get_metric_history(early.info.run_id, "miou")
    assert [(m.step, m.value) for m in rung] == [(2, stopped["last_rung"]["miou"])]
    # the study in storage agrees with the file: the stopped trial is PRUNED, without values
    study = optuna.load_study(study_name="s", storage=S.open_storage(spec.storage))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[0].values == [kept["miou"], kept["gflops_mean"]]
    assert study.trials[1].values is None


@pytest.mark.slow
def test_trials_start_from_a_shared_prefix(ray_cluster, mlflow_server, prepared, tmp_path):
    """Before the budget acts (40% of 10 steps) trials that differ only in λ2, μ compute the
    same thing: it is trained once, as the study's prefix run, and each trial continues it
    (its MLflow run gets the prefix's curve, then its own steps 6-10)."""
    from mlflow import MlflowClient

    spec = search(tmp_path, num_samples=2, iterations=10, max_concurrent=1)
    base = base_spec(prepared, mlflow_server.uri)
    base = replace(base, tracking=replace(base.tracking, experiment="tune-warm"))
    document = json.loads(T.run_study(spec, base).read_text())
    assert [t["state"] for t in document["trials"]] == ["COMPLETE", "COMPLETE"]
    assert [t["id"] for t in document["trials"]] == ["s-t000", "s-t001"], "no prefix trial"

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("tune-warm")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{document['parent_run_id']}'")
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == ["s-prefix", "s-t000", "s-t001"]
    prefix = by_name.pop("s-prefix")
    assert prefix.info.status == "FINISHED"
    history = client.get_metric_history(prefix.info.run_id, "loss_seg")
    assert [m.step for m in history] == [2, 4], "the prefix trains the first 4 steps"
    for record in document["trials"]:
        run = by_name[record["id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["warm_start"] == prefix.info.run_id
        assert run.data.metrics["c_all_gflops"] > 0, "a start logs the all-open cost"
        history = client.get_metric_history(run.info.run_id, "loss_seg")
        assert [m.step for m in history] == [2, 4, 6, 8, 10], "the whole curve in each run"
        shared = client.get_metric_history(prefix.info.run_id, "loss_seg")
        assert [m.value for m in history[:2]] == [m.value for m in shared], "copied"
        state = torch.load(Path(record["checkpoint"]) / "state.pt", weights_only=False)
        assert state["step"] == 10 and state["resumes"] == [], "a start, not a restart"
        assert state["warm_start"] == {"step": 4, "run_id": prefix.info.run_id}
        assert float(run.data.params["lambda2"]) == pytest.approx(record["lambda2"])
    trials = tmp_path / "tune" / "trials"
    assert max(p.name for p in (trials / "s-prefix").iterdir()) == "checkpoint_00000004"


@pytest.mark.slow
def test_a_trial_whose_process_dies_ends_its_run_failed(ray_cluster, mlflow_server, prepared,
                                                        tmp_path):
    """SIGKILL of the trial's training task (as the OOM killer would) leaves nobody in the
    trial to end its MLflow run: the driver finds it by name and ends it FAILED."""
    from mlflow import MlflowClient

    spec = search(tmp_path, num_samples=1, seed_budgets=("dynamic-a",), iterations=400,
                  max_failures=0, warm_start=False)
    base = base_spec(prepared, mlflow_server.uri)
    base = replace(base, tracking=replace(base.tracking, experiment="tune-killed"))
    run_dir = tmp_path / "tune" / "trials" / "s-t000"
    killed = threading.Event()

    def kill_when_training() -> None:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        killed.set()
        subprocess.run(["pkill", "-9", "-f", "ray::train_and_evaluate"], check=False)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    document = json.loads(T.run_study(spec, base).read_text())
    killer.join(timeout=10)
    assert killed.is_set() and list(run_dir.glob("checkpoint_*")), "killed mid-training"
    assert [t["state"] for t in document["trials"]] == ["FAILED"]
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("tune-killed")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs["s-t000"].info.status == "FAILED", "not left RUNNING"
    assert runs["s-t000"].data.tags["mlflow.parentRunId"] == document["parent_run_id"]


@pytest.mark.slow
def test_hard_budget_mode_records_constraint_values(ray_cluster, prepared, tmp_path):
    budget = 0.00143
    spec = search(tmp_path, num_samples=2, seed_budgets=("dynamic-c",), max_gflops=budget)
    path = T.run_study(spec, base_spec(prepared))
    document = json.loads(path.read_text())
    assert document["mode"] == "constrained" and document["max_gflops"] == budget
    study = optuna.load_study(study_name="s", storage=S.open_storage(spec.storage))
    assert len(study.directions) == 1 and study.directions[0].name == "MAXIMIZE"
    assert len(document["trials"]) == 2
    for record, trial in zip(document["trials"], study.trials, strict=True):
        assert record["state"] == "COMPLETE"
        assert trial.values == [record["miou"]], "single objective: mIoU"
        expected = record["gflops_mean"] - budget
        assert trial.system_attrs["constraints"] == pytest.approx((expected,))
        assert record["constraint"] == pytest.approx(expected)
        assert record["feasible"] is (expected <= 0)


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_study_goes_on(ray_cluster, prepared, tmp_path):
    # model.layers 3 cannot be built (the routing space needs 4 rows); seed 1 samples 3, then 4
    spec = search(tmp_path, num_samples=2, seed_budgets=(), seed=1, max_failures=0,
                  space={"model.layers": {"low": 3, "high": 4}})
    document = json.loads(T.run_study(spec, base_spec(prepared)).read_text())
    states = {t["params"]["model.layers"]: t["state"] for t in document["trials"]}
    assert states == {3: "FAILED", 4: "COMPLETE"}
    failed = next(t for t in document["trials"] if t["state"] == "FAILED")
    assert failed["miou"] is None and failed["model_uri"] is None
