"""The budget search: Ray Tune trials sampled by Optuna, each a training evaluated on val.

Every trial trains the network with λ2, μ (or any `train.*` / `model.*` key of `tune.space`)
set by Optuna, evaluates it with hard routing on the validation split and reports both
objectives of `metrics.SEARCH_OBJECTIVES` — mIoU (max) and the mean real GFLOPs per image
(min) — with the GFLOPs distribution (max/min/p50/p90) and the step. The Optuna study, in
persistent storage under a fixed name, is the source of truth; `trials.json` is written from it.
With `tune.cost: latency` the second objective is the trial's measured p90 latency per image
instead of its GFLOPs (latency_cost.py, which says why trials timed on a CPU run one at a time).
This module is the driver (`run_study`); the settings, space and study are in study.py, one
trial's work in trial.py, early stopping in mo_asha.py and the shared start in warm_start.py.

How the pieces fit (checked in the installed sources of Ray 2.60 and Optuna 5.0):

* **Storage.** `open_storage` gives an Optuna storage *object* (pitfall 5): a
  `JournalStorage(JournalFileBackend(path))` for a file, an `RDBStorage` for a URL
  (postgresql://, sqlite:///). Ray's `OptunaSearch(storage=, study_name=)` accepts exactly such an
  object and calls `create_study(load_if_exists=True)`, so it binds to the persistent study.
* **Seeds.** The paper's Dynamic-A/B/C points (λ2, μ from `models.BUDGETS`) are the
  points to evaluate first. `OptunaSearch(points_to_evaluate=…)` would `enqueue_trial` them again
  every time a driver starts, so a resumed study would re-run them; instead they are enqueued here
  with `skip_if_exists=True` (and a `seeded_from` user attribute). Enqueued trials are WAITING and
  `Study.ask` pops WAITING trials first, so they run first. A seed outside the space is an error
  (clipping would train something that is not Dynamic-A but still call it so).
* **Trial identity.** The search space is a define-by-run function, which gives each Tune trial
  its Optuna trial: the number and a `run_name` user attribute, `{study}-t{number:03d}`. The
  training run (checkpoints in `{results}/trials/<run_name>`, or under a remote run.storage; the
  MLflow run) is named after it, so running the trial again resumes its training from the latest
  checkpoint.
* **Resume** (`resume=True` after the driver was killed): trials that finished (COMPLETE, PRUNED,
  FAIL) are counted from the study and only `num_samples` minus that many trials run. Ray asks
  and tells Optuna from the driver, without Optuna's heartbeat, so a trial still RUNNING in the
  study belonged to the dead driver: it is marked FAIL and re-queued with Optuna's own
  `RetryHeartbeatStaleTrialCallback` (a WAITING copy with the same params and user attributes,
  `failed_trial` / `retry_history` in its system attributes). The copy keeps the `run_name`, so its
  training resumes from the old trial's checkpoint and MLflow run; the abandoned trial stays in
  the study (and in trials.json) as FAILED and does not count towards `num_samples`. The sampler
  is seeded with `seed + len(study.trials)`: the same seed again would replay the random
  start-up suggestions of the first session.
* **Reports.** Optuna receives only a trial's last report and silently drops one without its
  objectives (pitfall 4): every report is checked in the trial (a missing or NaN objective fails
  the trial with the reason) and again on the driver before `tell`.
* **Early stopping** (`scheduler: mo-asha`, mo_asha.py): the trial trains rung by rung with
  `TrainSpec.stop_at`, evaluating and reporting at each rung. `OptunaSearch.on_trial_complete`
  would `tell` a stopped trial COMPLETE with its half-trained values; `_StudySearch` tells it
  PRUNED instead (its rung figures stay as user attributes), so it never joins the front.
* **Hard-budget mode** (`max_gflops` B > 0): a single-objective study (maximise mIoU) whose
  TPE sampler has `constraints_func` returning `gflops_mean − B` (≤ 0 is feasible). The value is
  a user attribute that `_StudySearch` sets from the trial's final report before `tell`; the
  sampler's `after_trial` (run by `tell`) stores it as the trial's `constraints` system attribute
  and TPE then favours feasible regions (Optuna's constrained TPE, c-TPE style).
* **Processes.** `training.train` with `workers=0` runs Ray Train V2's local mode, which refuses
  to run inside a Tune function (it sees the Tune session). So each rung (train, then evaluate)
  is a Ray task started from the trial: the trial's placement group has an empty head bundle for
  the Tune function and a bundle of `trial_cpus` (and a GPU for in-process GPU training) that
  captures the task. With `workers ≥ 1` the task's `train` starts a TorchTrainer whose workers
  take their own resources (the Train V2 pattern: one trainer per trial); on GPUs the rung's
  evaluation then runs in a task of its own, with one GPU and no CPU, outside the trial's group
  (`trial.rung_evaluation_options`).
* **Shared start** (warm_start.py, `tune.warm_start`): before the trials, the budget-free first
  ⌊budget_start · iterations⌋ steps that every trial would compute alike are trained once as
  the `{study}-prefix` run (a Ray task, like a rung); each trial's run folder gets a copy of its
  checkpoint before the first rung, unless the trial trained before.
* **MLflow.** One parent run per study (run name = study, tags study + mode; its id is kept as a
  study user attribute, so a resumed study reuses it); each trial's training run is a child
  (`TrackingSpec.parent_run_id`) that also gets the rung and final mIoU/GFLOPs metrics and the
  effective λ2, μ as params. Trials stopped early end their run KILLED, failed ones FAILED.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from dynroute.platform import metrics as M
from dynroute.platform.data.shards import read_manifest
from dynroute.platform.search.latency_cost import LATENCY_DEVICE, LATENCY_NOISE, check_concurrency
from dynroute.platform.search.mo_asha import MOASHA
from dynroute.platform.search.study import (
    BUDGET_KEYS,
    BY_KIND,
    CONSTRAINT_ATTR,
    COSTS,
    PARENT_RUN_ATTR,
    SEEDED_ATTR,
    STEP,
    DefineTrial,
    SearchError,
    SearchSpec,
    check_report,
    finished_trials,
    load_study,
    make_sampler,
    open_storage,
    report_keys,
    requeue_interrupted,
    seed_points,
)
from dynroute.platform.search.trial import (
    TrialSetup,
    run_trial,
    train_prefix,
    trial_spec,
)
from dynroute.platform.search.trials_file import write_trials
from dynroute.platform.search.warm_start import prefix_spec, prefix_steps
from dynroute.platform.tracking import runs
from dynroute.platform.train import ray_train
from dynroute.platform.train.spec import TrainSpec


class _StudySearch(OptunaSearch):
    """OptunaSearch that tells stopped trials PRUNED and records figures before `tell`."""

    def __init__(self, *, iterations: int, max_gflops: float, cost: str = "gflops",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self._iterations = iterations
        self._max_gflops = max_gflops
        self._cost = cost  # tune.cost: which figure is the second value

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        state, values = TrialState.FAIL, None
        if result and not error:
            figures = check_report(result, where=f"trial {ot_trial.number}",
                                   keys=report_keys(self._cost))
            for key, value in figures.items():
                ot_trial.set_user_attr(key, int(value) if key == STEP else value)
            for key in BUDGET_KEYS:
                if isinstance(result.get(key), int | float):
                    ot_trial.set_user_attr(key, float(result[key]))
            for key in (BY_KIND, LATENCY_NOISE):
                if nested := _unflattened(result, key):
                    ot_trial.set_user_attr(key, nested)
            for key in ("checkpoint", "mlflow_run_id", LATENCY_DEVICE):
                if result.get(key):
                    ot_trial.set_user_attr(key, str(result[key]))
            if self._max_gflops > 0:
                ot_trial.set_user_attr(CONSTRAINT_ATTR,
                                       figures[M.GFLOPS_MEAN] - self._max_gflops)
            if figures[STEP] >= self._iterations:
                state = TrialState.COMPLETE
                values = ([figures[M.MIOU]] if self._max_gflops > 0 else
                          [figures[M.MIOU], figures[COSTS[self._cost]]])
            else:
                state = TrialState.PRUNED  # stopped at a rung by the scheduler
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)


def _unflattened(result: dict, key: str) -> dict:
    """`result[key]` as the dict a trial reported: Tune hands searchers its results flattened
    ("by_kind/small/images": 6)."""
    if isinstance(result.get(key), dict):
        return result[key]
    nested: dict = {}
    prefix = f"{key}/"
    for name, value in result.items():
        if name.startswith(prefix):
            *parents, leaf = name[len(prefix):].split("/")
            node = nested
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return nested


# -- the driver ------------------------------------------------------------------------------
def trial_resources(spec: SearchSpec, base: TrainSpec):
    """The placement group of a trial: nothing for the Tune function, a bundle for its tasks."""
    bundle = {"CPU": spec.trial_cpus}
    if base.use_gpu and base.workers == 0:
        bundle["GPU"] = 1
    return tune.PlacementGroupFactory([{}, bundle])


def max_concurrent_trials(spec: SearchSpec, base: TrainSpec, resources: Mapping[str, float]
                          ) -> int:
    """tune.max_concurrent, or as many trials as the CPUs (GPUs) Ray reports hold at once.

    A trial takes `trial_cpus` for its task plus, with `workers ≥ 1`, one CPU (one GPU with
    use_gpu) per Ray Train worker of its TorchTrainer.
    """
    if spec.max_concurrent > 0:
        return spec.max_concurrent
    if base.use_gpu:
        need, have, kind = max(base.workers, 1), resources.get("GPU", 0.0), "GPU"
    else:
        need, have, kind = spec.trial_cpus + base.workers, resources.get("CPU", 0.0), "CPU"
    count = int(have // need)
    if count < 1:
        raise SearchError(f"a trial needs {need} {kind} but Ray reports {have}; lower "
                          f"tune.trial_cpus / run.workers or set tune.max_concurrent")
    return count


class _StudyCallback(tune.Callback):
    """Ends the MLflow runs of stopped and failed trials; calls on_trial for progress."""

    def __init__(self, *, search: SearchSpec, base: TrainSpec, done: int, parent_id: str | None,
                 on_trial: Callable[[dict, int, int], None] | None) -> None:
        self.search, self.base, self.done, self.on_trial = search, base, done, on_trial
        self.parent_id = parent_id

    def _finish(self, trial, state: str) -> None:
        result = trial.last_result or {}
        if state != "COMPLETE":
            status = "KILLED" if state == "PRUNED" else "FAILED"
            runs.end_run(self.base.tracking.uri, self.base.tracking.experiment,
                           result.get("mlflow_run_id") or self._run_of(trial), status)
        self.done += 1
        if self.on_trial is not None:
            number = trial.config.get("optuna_trial")
            entry = {"id": self.search.trial_id(number) if number is not None else None,
                     "number": number, "state": state,
                     **{k: result.get(k) for k in (*self.search.report_keys, STEP)}}
            self.on_trial(entry, self.done, self.search.num_samples)

    def _run_of(self, trial) -> str | None:
        """The MLflow run of a trial that failed before its first report (its process died
        before the training could end the run), found by name under the study's run."""
        name = trial.config.get("run_name")
        if not (self.base.tracking.uri and self.parent_id and name):
            return None
        return runs.find_trial_run(self.base.tracking.uri, self.base.tracking.experiment,
                                   run_name=name, parent_run_id=self.parent_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get(STEP, 0)
        self._finish(trial, "COMPLETE" if step >= self.search.iterations else "PRUNED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FAILED")


def _parent_run(spec: SearchSpec, base: TrainSpec, study):
    """(tracker with the study's parent run active, its id), or (None, None) without MLflow."""
    if not base.tracking.uri:
        return None, None
    tracker, run_id = runs.open_study_run(
        base.tracking.uri, base.tracking.experiment,
        known_run_id=study.user_attrs.get(PARENT_RUN_ATTR), run_name=spec.study,
        tags={"study": spec.study, "mode": spec.mode, "cost": spec.cost})
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return tracker, run_id


def run_study(search: SearchSpec, base: TrainSpec, *, resume: bool = False,
              on_trial: Callable[[dict, int, int], None] | None = None,
              verbose: int = 0) -> Path:
    """Run (or continue) the budget search; write and return `{results}/trials.json`.

    Args:
        search: the search settings.
        base: the training every trial starts from (params.yaml's model/train/run/tracking);
            its `tracking.uri` None turns MLflow off.
        resume: continue a study that already has trials (without it such a study is an
            error, so a second run never silently mixes into an old one).
        on_trial: called after each trial with (entry: id, state, number and the reported
            figures; trials done in the study; num_samples).
        verbose: Ray Tune's console verbosity (0 silent, 1 status tables).
    """
    check_concurrency(cost=search.cost, max_concurrent=search.max_concurrent,
                      on_gpu=base.use_gpu)
    if "://" not in base.data:
        base = replace(base, data=os.path.abspath(base.data))
    read_manifest(base.data)  # fail early and clearly when the data is missing
    seeds = seed_points(search.seed_budgets, search.ranges)
    storage = open_storage(search.storage)
    study = load_study(search, storage)
    if study.trials and not resume:
        raise SearchError(f"study {search.study!r} in {search.storage} already has "
                          f"{len(study.trials)} trials: continue it with --resume, or set "
                          f"another tune.study")
    if not study.trials:  # a new study: the seeds first (a resumed one has them already)
        for name, point in seeds:
            study.enqueue_trial(point, user_attrs={SEEDED_ATTR: name}, skip_if_exists=True)
    requeue_interrupted(study)
    done = finished_trials(study.get_trials(deepcopy=False))
    remaining = search.num_samples - done
    parent, parent_id = _parent_run(search, base, study)
    started_ray = not ray.is_initialized()
    status = "FAILED"
    try:
        if remaining > 0:
            ray_train.init_ray()
            _fit(search, base, study, storage, done=done, remaining=remaining,
                 parent_id=parent_id, on_trial=on_trial, verbose=verbose,
                 scheduler=MOASHA if search.scheduler == "mo-asha" else None)
        path = write_trials(search, base, study, parent_run_id=parent_id)
        status = "FINISHED"
        return path
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            parent.end_run(status)
        if started_ray and ray.is_initialized():
            ray.shutdown()


def _shared_start(search: SearchSpec, base: TrainSpec, parent_id: str | None,
                  task_gpus: float) -> tuple[str | None, str | None]:
    """Train the trials' shared first steps once (warm_start.py): (checkpoint, MLflow run), or
    (None, None) when the trials train from scratch."""
    if not search.warm_start:
        return None, None
    trial_base = trial_spec(search, base, {}, run_name=search.study, parent_run_id=parent_id,
                            tags={})
    steps = prefix_steps(searched=set(search.ranges), stops=search.stops,
                         iterations=search.iterations,
                         budget_start=trial_base.train.budget_start)
    if not steps:
        print("tune: every trial trains from scratch (a shared start needs a space of only "
              "train.lambda2 / train.mu and rungs after train.budget_start)", file=sys.stderr)
        return None, None
    spec = prefix_spec(trial_base, study=search.study, steps=steps, parent_run_id=parent_id)
    print(f"tune: training the trials' shared first {steps} of {search.iterations} steps once "
          f"({spec.name}); every trial continues from there", file=sys.stderr, flush=True)
    task = ray.remote(train_prefix).options(num_cpus=search.trial_cpus, num_gpus=task_gpus,
                                            max_retries=0)
    return ray.get(task.remote(spec.to_dict()))


def _fit(search, base, study, storage, *, done, remaining, parent_id, on_trial, verbose,
         scheduler) -> None:
    task_gpus = 1.0 if base.use_gpu and base.workers == 0 else 0.0
    prefix, prefix_run = _shared_start(search, base, parent_id, task_gpus)
    setup = TrialSetup(base=base.to_dict(), search=search, parent_run_id=parent_id,
                       task_gpus=task_gpus, warm_start=prefix, warm_start_run_id=prefix_run)
    objectives = ([M.MIOU], ["max"]) if search.mode == "constrained" else (
        [m for m, _ in search.objectives], [d for _, d in search.objectives])
    searcher = _StudySearch(
        space=DefineTrial(search.ranges.values(), search.study), metric=objectives[0],
        mode=objectives[1], sampler=make_sampler(search, len(study.trials)),
        study_name=search.study, storage=storage, iterations=search.iterations,
        max_gflops=search.max_gflops, cost=search.cost)
    if scheduler is not None:
        scheduler = scheduler(max_t=search.iterations, grace_period=search.grace_period,
                              reduction_factor=search.reduction_factor, time_attr=STEP,
                              cost=search.cost_metric)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    trial_resources(search, base))
    concurrent = max_concurrent_trials(search, base, ray.cluster_resources())
    callback = _StudyCallback(search=search, base=base, done=done, parent_id=parent_id,
                              on_trial=on_trial)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=remaining, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=f"{search.study}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(search.results_dir() / "ray"), verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            callbacks=[callback]))
    tuner.fit()  # failed trials are in the study as FAIL; they do not end the search
