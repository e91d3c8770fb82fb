"""The budget search: Ray Tune trials sampled by Optuna, each a training evaluated on val.

Every trial trains the network with λ2, μ (or any `train.*` / `model.*` key of `tune.space`)
set by Optuna, evaluates it with hard routing on the validation split and reports both
objectives of `metrics.SEARCH_OBJECTIVES` — mIoU (max) and the mean real GFLOPs per image
(min) — with the GFLOPs distribution (max/min/p50/p90) and the step. The Optuna study, in
persistent storage under a fixed name, is the source of truth; `trials.json` is written from it.

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
  take their own resources (the Train V2 pattern: one trainer per trial).
* **MLflow.** One parent run per study (run name = study, tags study + mode; its id is kept as a
  study user attribute, so a resumed study reuses it); each trial's training run is a child
  (`TrackingSpec.parent_run_id`) that also gets the rung and final mIoU/GFLOPs metrics and the
  effective λ2, μ as params. Trials stopped early end their run KILLED, failed ones FAILED.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import ray
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from dynroute.models import BUDGETS, NetworkConfig
from dynroute.platform import metrics as M
from dynroute.platform.recipe import TrainConfig
from dynroute.platform.training import STATE_FILE, TrainSpec

TRIALS_FILE = "trials.json"
REPORT_KEYS = (M.MIOU, M.GFLOPS_MEAN, M.GFLOPS_MAX, M.GFLOPS_MIN, M.GFLOPS_P50, M.GFLOPS_P90)
STEP = "step"
SCHEDULERS = ("fifo", "mo-asha")
# User attributes of the study and its trials.
RUN_NAME_ATTR = "run_name"
SEEDED_ATTR = "seeded_from"
CONSTRAINT_ATTR = "constraint"  # gflops_mean − max_gflops; ≤ 0 is feasible
PARENT_RUN_ATTR = "mlflow_parent_run_id"
MODE_ATTR = "mode"
_TRIAL_STATES = {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "FAILED"}


class SearchError(ValueError):
    """A search setting that cannot work; the message names the params key."""


# -- the search space ------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """One searched key: a float (or int) range, sampled uniformly or log-uniformly."""

    key: str  # dotted, e.g. "train.lambda2"
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> float | int:
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _numeric_fields(cls: type) -> dict[str, type]:
    """Field name → int or float for the numeric fields of a config dataclass."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        allowed = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
        if allowed == {float} or allowed == {int}:
            found[f.name] = allowed.pop()
    return found


_SECTIONS: dict[str, type] = {"train": TrainConfig, "model": NetworkConfig}


def parse_space(space: Mapping[str, object]) -> dict[str, Range]:
    """`tune.space` → ranges, with an error naming the key for anything that cannot be searched.

    Args:
        space: dotted key (`train.<field>` or `model.<field>` of a numeric field) → mapping with
            `low`, `high` (numbers, low < high) and optional `log` (bool; needs low > 0).
    """
    if not space:
        raise SearchError("tune.space is empty: give at least one key, e.g. "
                          "train.lambda2: {low: 0.05, high: 1.5, log: true}")
    ranges = {}
    for key, bounds in space.items():
        where = f"tune.space.{key}"
        section, _, name = str(key).partition(".")
        if section not in _SECTIONS or not name:
            raise SearchError(f"{where}: keys are train.<field> or model.<field> "
                              f"(e.g. train.lambda2), not {key!r}")
        numeric = _numeric_fields(_SECTIONS[section])
        if name not in numeric:
            raise SearchError(f"{where}: {section}.{name} is not a numeric {section} field; "
                              f"searchable: {', '.join(f'{section}.{n}' for n in numeric)}")
        if not isinstance(bounds, Mapping):
            raise SearchError(f"{where}: expected {{low, high, log}}, got {bounds!r}")
        unknown = sorted(set(bounds) - {"low", "high", "log"})
        if unknown or not {"low", "high"} <= set(bounds):
            raise SearchError(f"{where}: give exactly low, high and optionally log "
                              f"(got {sorted(bounds)})")
        low, high, log = bounds["low"], bounds["high"], bounds.get("log", False)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool)
                      and math.isfinite(v) for v in (low, high))
        if not numbers:
            raise SearchError(f"{where}: low and high must be finite numbers, got {low!r}, "
                              f"{high!r}")
        if not isinstance(log, bool):
            raise SearchError(f"{where}.log = {log!r}: expected true or false")
        if not low < high:
            raise SearchError(f"{where}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise SearchError(f"{where}: a log range needs low > 0 (got {low}); use log: false "
                              f"or a positive low")
        integer = numeric[name] is int
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise SearchError(f"{where}: {section}.{name} is an integer; give integer bounds")
        ranges[key] = Range(key=key, low=float(low), high=float(high), log=log,
                            integer=integer)
    return ranges


def seed_points(budgets: Sequence[str], ranges: Mapping[str, Range]) -> list[tuple[str, dict]]:
    """The named budgets' (λ2, μ) as points of the space: [(budget name, {key: value})]."""
    points = []
    for name in budgets:
        if name not in BUDGETS:
            raise SearchError(f"tune.seed_budgets: unknown budget {name!r}; choose from "
                              f"{', '.join(BUDGETS)}")
        budget = BUDGETS[name]
        values = {"train.lambda2": budget.lambda2, "train.mu": budget.mu}
        point = {k: v for k, v in values.items() if k in ranges}
        if not point:
            raise SearchError(f"tune.seed_budgets: {name} sets train.lambda2 and train.mu, but "
                              f"tune.space searches neither; add them or drop the seeds")
        for key, value in point.items():
            r = ranges[key]
            if not r.contains(value):
                raise SearchError(f"tune.seed_budgets: {name} has {key} = {value}, outside "
                                  f"tune.space.{key} [{r.low}, {r.high}]; widen the range or "
                                  f"drop {name} from tune.seed_budgets")
        points.append((name, point))
    return points


def apply_params(base: TrainSpec, params: Mapping[str, object]) -> TrainSpec:
    """`base` with the dotted `params` set in its train/model dicts (validated)."""
    train, model = dict(base.train), dict(base.model)
    for key, value in params.items():
        section, _, name = key.partition(".")
        {"train": train, "model": model}[section][name] = value
    spec = replace(base, train=train, model=model)
    spec.recipe, spec.network  # noqa: B018 (raise now on an impossible combination)
    return spec


# -- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpec:
    """A budget search, resolved from params.yaml's `tune:` section (see TuneParams)."""

    study: str
    storage: str  # an Optuna journal file, or an RDB URL
    results: str  # folder: Ray Tune state, the trials' training runs, trials.json
    num_samples: int
    space: Mapping[str, object]
    iterations: int  # per trial
    seed_budgets: tuple[str, ...] = ()
    seed: int = 0
    max_concurrent: int = 0  # 0: from the resources Ray reports
    trial_cpus: float = 1.0
    scheduler: str = "fifo"
    grace_period: int = 100
    reduction_factor: int = 2
    max_gflops: float = 0.0  # > 0: hard-budget mode
    split: str = "val"
    cost_resolution: tuple[int, int] = (1024, 2048)
    max_failures: int = 1  # Tune retries of a failing trial
    ranges: dict[str, Range] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", parse_space(self.space))
        if "://" in self.results:
            raise SearchError(f"tune.results = {self.results}: give a local folder (trials.json "
                              f"and the Tune state live there; run.storage may be remote)")
        # Absolute: trials run in working folders of their own.
        object.__setattr__(self, "results", os.path.abspath(self.results))
        object.__setattr__(self, "cost_resolution", tuple(int(v) for v in self.cost_resolution))
        if not self.study or "/" in self.study:
            raise SearchError(f"tune.study = {self.study!r}: give a name without '/'")
        if self.num_samples < 1:
            raise SearchError(f"tune.num_samples = {self.num_samples}: run at least 1 trial")
        if self.iterations < 1:
            raise SearchError(f"tune.iterations = {self.iterations}: trials must train")
        if self.scheduler not in SCHEDULERS:
            raise SearchError(f"tune.scheduler = {self.scheduler!r}: choose one of "
                              f"{', '.join(SCHEDULERS)}")
        if self.max_concurrent < 0 or self.trial_cpus <= 0:
            raise SearchError("tune.max_concurrent must be >= 0 and tune.trial_cpus > 0")
        if not math.isfinite(self.max_gflops) or self.max_gflops < 0:
            raise SearchError(f"tune.max_gflops = {self.max_gflops}: 0 (Pareto search) or a "
                              f"positive GFLOPs budget")
        if len(self.seed_budgets) > self.num_samples:
            raise SearchError(f"tune.num_samples = {self.num_samples} is smaller than the "
                              f"{len(self.seed_budgets)} tune.seed_budgets; raise it or seed "
                              f"fewer budgets")
        seed_points(self.seed_budgets, self.ranges)
        self.stops  # noqa: B018 (validate the rungs)

    @property
    def mode(self) -> str:
        return "constrained" if self.max_gflops > 0 else "pareto"

    @property
    def stops(self) -> tuple[int, ...]:
        """Where a trial pauses to evaluate and report: the rungs, then the end."""
        if self.scheduler == "fifo":
            return (self.iterations,)
        from dynroute.platform.mo_asha import rung_levels

        return (*rung_levels(grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor,
                             max_t=self.iterations), self.iterations)

    def trial_id(self, number: int) -> str:
        return f"{self.study}-t{number:03d}"

    def results_dir(self) -> Path:
        return Path(self.results)


# -- Optuna ----------------------------------------------------------------------------------
def open_storage(storage: str):
    """An Optuna storage object: RDB for a URL (`postgresql://…`, `sqlite:///…`), else a journal
    file (created with its folder)."""
    if "://" in storage:
        return optuna.storages.RDBStorage(url=storage)
    path = Path(storage).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _directions(spec: SearchSpec) -> list[str]:
    if spec.mode == "constrained":
        return ["maximize"]
    return ["maximize" if d == "max" else "minimize" for _, d in M.SEARCH_OBJECTIVES]


def load_study(spec: SearchSpec, storage=None):
    """The study (created if new), checked to have this search's mode and directions."""
    storage = storage if storage is not None else open_storage(spec.storage)
    study = optuna.create_study(study_name=spec.study, storage=storage, load_if_exists=True,
                                directions=_directions(spec))
    expected = [getattr(optuna.study.StudyDirection, d.upper()) for d in _directions(spec)]
    mode = study.user_attrs.get(MODE_ATTR)
    if list(study.directions) != expected or mode not in (None, spec.mode):
        raise SearchError(f"study {spec.study!r} in {spec.storage} was run in {mode} mode; "
                          f"tune.max_gflops now asks for {spec.mode}: use another tune.study")
    if mode is None:
        study.set_user_attr(MODE_ATTR, spec.mode)
    return study


def requeue_interrupted(study) -> list[int]:
    """Fail every RUNNING trial (its driver is gone) and queue a retry of it; their numbers."""
    stale = study.get_trials(deepcopy=True, states=(TrialState.RUNNING,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the callback is marked experimental
        retry = RetryHeartbeatStaleTrialCallback()
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL)
            retry(study, trial)
    return [t.number for t in stale]


def finished_trials(trials: Sequence) -> int:
    """Trials that count towards num_samples: finished ones, except those retried."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if t.state.is_finished() and t.number not in retried)


class _DefineTrial:
    """The define-by-run space: suggests every range and names the trial's training run."""

    def __init__(self, ranges: Sequence[Range], study: str) -> None:
        self.ranges = tuple(ranges)
        self.study = study

    def __call__(self, trial) -> dict:
        for r in self.ranges:
            r.suggest(trial)
        run_name = trial.user_attrs.get(RUN_NAME_ATTR) or f"{self.study}-t{trial.number:03d}"
        trial.set_user_attr(RUN_NAME_ATTR, run_name)
        return {"optuna_trial": trial.number, "run_name": run_name,
                "seeded_from": trial.user_attrs.get(SEEDED_ATTR)}


class _GflopsConstraint:
    """constraints_func of the hard-budget mode: (gflops_mean − max_gflops,), ≤ 0 feasible."""

    def __call__(self, trial) -> tuple[float]:
        return (float(trial.user_attrs.get(CONSTRAINT_ATTR, math.inf)),)


def check_report(result: Mapping[str, object], *, where: str) -> dict[str, float]:
    """The objectives and GFLOPs figures of a report; an error if one is missing or not finite."""
    bad = [k for k in (*REPORT_KEYS, STEP) if not isinstance(result.get(k), int | float)
           or not math.isfinite(result[k])]
    if bad:
        raise ValueError(f"{where}: the report lacks finite {', '.join(bad)} (got "
                         f"{ {k: result.get(k) for k in bad} }); Optuna would drop the trial")
    return {k: float(result[k]) for k in (*REPORT_KEYS, STEP)}


class _StudySearch(OptunaSearch):
    """OptunaSearch that tells stopped trials PRUNED and records figures before `tell`."""

    def __init__(self, *, iterations: int, max_gflops: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self._iterations = iterations
        self._max_gflops = max_gflops

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        state, values = TrialState.FAIL, None
        if result and not error:
            figures = check_report(result, where=f"trial {ot_trial.number}")
            for key, value in figures.items():
                ot_trial.set_user_attr(key, int(value) if key == STEP else value)
            for key in ("checkpoint", "mlflow_run_id"):
                if result.get(key):
                    ot_trial.set_user_attr(key, str(result[key]))
            if self._max_gflops > 0:
                ot_trial.set_user_attr(CONSTRAINT_ATTR,
                                       figures[M.GFLOPS_MEAN] - self._max_gflops)
            if figures[STEP] >= self._iterations:
                state = TrialState.COMPLETE
                values = ([figures[M.MIOU]] if self._max_gflops > 0 else
                          [figures[name] for name, _ in M.SEARCH_OBJECTIVES])
            else:
                state = TrialState.PRUNED  # stopped at a rung by the scheduler
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)


def _sampler(spec: SearchSpec, done: int):
    constraints = _GflopsConstraint() if spec.mode == "constrained" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constraints_func is marked experimental
        return optuna.samplers.TPESampler(seed=spec.seed + done, constraints_func=constraints)


# -- the trial -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TrialSetup:
    base: dict  # TrainSpec.to_dict() of the trials' common spec
    search: SearchSpec
    parent_run_id: str | None
    task_gpus: float


def trial_storage(search: SearchSpec, base: TrainSpec) -> str:
    """Where trials keep their training runs: `{results}/trials`, or for a remote run.storage
    (multi-node training needs shared storage) `{run.storage}/{study}`."""
    if "://" in base.storage:
        return f"{base.storage.rstrip('/')}/{search.study}"
    return str(search.results_dir() / "trials")


def trial_spec(search: SearchSpec, base: TrainSpec, params: Mapping[str, object], *,
               run_name: str, parent_run_id: str | None, tags: Mapping[str, str]) -> TrainSpec:
    """The training of one trial: its params, its deterministic name, a child MLflow run."""
    spec = apply_params(base, params)
    return replace(spec, name=run_name, storage=trial_storage(search, base),
                   train=dict(spec.train) | {"iterations": search.iterations},
                   tracking=replace(spec.tracking, run_name=run_name,
                                    parent_run_id=parent_run_id,
                                    tags=dict(spec.tracking.tags) | dict(tags)))


def _run_trial(config: dict, setup: _TrialSetup) -> None:
    """The Tune function of one trial: train and evaluate rung by rung, report each."""
    search = setup.search
    params = {k: config[k] for k in search.ranges}
    tags = {"study": search.study, "optuna_trial": str(config["optuna_trial"])}
    if config.get("seeded_from"):
        tags[SEEDED_ATTR] = config["seeded_from"]
    spec = trial_spec(search, TrainSpec.from_dict(setup.base), params,
                      run_name=config["run_name"], parent_run_id=setup.parent_run_id, tags=tags)
    stage = ray.remote(train_and_evaluate).options(
        num_cpus=search.trial_cpus, num_gpus=setup.task_gpus, max_retries=0)
    for stop in search.stops:
        final = stop >= search.iterations
        report = ray.get(stage.remote(spec.to_dict(), stop=None if final else stop,
                                      split=search.split,
                                      cost_resolution=search.cost_resolution))
        check_report(report, where=f"trial {config['run_name']} at step {stop}")
        tune.report(report)


def _completed_checkpoint(spec: TrainSpec) -> Path | None:
    """The final checkpoint of a local run that already trained to the end, else None."""
    if "://" in spec.storage:
        return None
    from dynroute.platform.ray_train import CHECKPOINT_PREFIX

    folder = Path(spec.storage) / spec.name / f"{CHECKPOINT_PREFIX}{spec.recipe.iterations:08d}"
    return folder if (folder / STATE_FILE).is_file() else None


def train_and_evaluate(spec_dict: dict, *, stop: int | None, split: str,
                       cost_resolution: tuple[int, int]) -> dict:
    """Train `spec` up to `stop` (None: the end), evaluate its checkpoint on `split` with hard
    routing, log the figures to its MLflow run; the report (objectives, GFLOPs, step, ids)."""
    import torch

    from dynroute.models import build_network
    from dynroute.platform.dataset import ShardDataset
    from dynroute.platform.evaluation import evaluate
    from dynroute.platform.shards import read_manifest
    from dynroute.platform.training import train

    spec = TrainSpec.from_dict(spec_dict)
    final = stop is None
    checkpoint = _completed_checkpoint(spec) if final else None
    if checkpoint is None:  # else: trained to the end before a restart; do not log it twice
        checkpoint = train(replace(spec, stop_at=stop)).checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training {spec.name} left no checkpoint to evaluate")
    state = _load_state(str(checkpoint))
    step, run_id = int(state["step"]), state.get("mlflow_run_id")
    try:
        network = build_network(spec.network)
        network.load_state_dict(state["model"])
        manifest = read_manifest(spec.data)
        with torch.inference_mode():
            result = evaluate(network, ShardDataset(root=spec.data, split=split, train=False,
                                                    crop=None),
                              num_classes=manifest.num_classes,
                              class_names=manifest.class_names,
                              cost_resolution=tuple(cost_resolution))
        g = result.gflops
        figures = {M.MIOU: result.miou, M.GFLOPS_MEAN: g.mean, M.GFLOPS_MAX: g.max,
                   M.GFLOPS_MIN: g.min, M.GFLOPS_P50: g.p50, M.GFLOPS_P90: g.p90}
        report = figures | {STEP: step, "iterations": spec.recipe.iterations,
                            "checkpoint": str(checkpoint), "mlflow_run_id": run_id or ""}
        check_report(report, where=f"{spec.name} at step {step}")
    except Exception:  # the trial fails: so does its run (the training may have finished it)
        _end_child_run(spec.tracking.uri, spec.tracking.experiment, run_id, "FAILED")
        raise
    if run_id and spec.tracking.uri:
        _log_evaluation(spec, run_id, figures, step=step, final=final)
    return report


def _load_state(checkpoint: str) -> dict:
    import torch

    if "://" not in checkpoint:
        return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
    from ray.train import Checkpoint

    with Checkpoint(checkpoint).as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def _log_evaluation(spec: TrainSpec, run_id: str, figures: dict, *, step: int,
                    final: bool) -> None:
    """Rung and final figures on the trial's run; the final ones end it FINISHED."""
    from dynroute.platform.tracking import Tracker

    tracker = Tracker(uri=spec.tracking.uri, experiment=spec.tracking.experiment)
    tracker.resume_run(run_id)
    tracker.log_metrics(figures, step=step)
    if not final:
        tracker.flush()  # the training goes on in this run at the next rung
        return
    lambda2, mu = spec.recipe.budget_weights
    tracker.log_params({"lambda2": lambda2, "mu": mu})
    tracker.end_run("FINISHED")


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


def _end_child_run(uri: str | None, experiment: str, run_id: str | None, status: str) -> None:
    if not uri or not run_id:
        return
    from dynroute.platform.tracking import Tracker

    Tracker(uri=uri, experiment=experiment).terminate(run_id, status)


class _StudyCallback(tune.Callback):
    """Ends the MLflow runs of stopped and failed trials; calls on_trial for progress."""

    def __init__(self, *, search: SearchSpec, base: TrainSpec, done: int,
                 on_trial: Callable[[dict, int, int], None] | None) -> None:
        self.search, self.base, self.done, self.on_trial = search, base, done, on_trial

    def _finish(self, trial, state: str) -> None:
        result = trial.last_result or {}
        if state != "COMPLETE":
            status = "KILLED" if state == "PRUNED" else "FAILED"
            _end_child_run(self.base.tracking.uri, self.base.tracking.experiment,
                           result.get("mlflow_run_id") or None, status)
        self.done += 1
        if self.on_trial is not None:
            number = trial.config.get("optuna_trial")
            entry = {"id": self.search.trial_id(number) if number is not None else None,
                     "number": number, "state": state,
                     **{k: result.get(k) for k in (*REPORT_KEYS, STEP)}}
            self.on_trial(entry, self.done, self.search.num_samples)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get(STEP, 0)
        self._finish(trial, "COMPLETE" if step >= self.search.iterations else "PRUNED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FAILED")


def _parent_run(spec: SearchSpec, base: TrainSpec, study):
    """(tracker with the study's parent run active, its id), or (None, None) without MLflow."""
    if not base.tracking.uri:
        return None, None
    from dynroute.platform.tracking import Tracker

    tracker = Tracker(uri=base.tracking.uri, experiment=base.tracking.experiment)
    known = study.user_attrs.get(PARENT_RUN_ATTR)
    if known:
        try:
            return tracker, tracker.resume_run(known)
        except Exception:  # another tracking server than the first session's: start anew
            pass
    run_id = tracker.start_run(run_name=spec.study, tags={"study": spec.study,
                                                          "mode": spec.mode})
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
    from dynroute.platform import ray_train
    from dynroute.platform.mo_asha import MOASHA
    from dynroute.platform.shards import read_manifest

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


def _fit(search, base, study, storage, *, done, remaining, parent_id, on_trial, verbose,
         scheduler) -> None:
    setup = _TrialSetup(base=base.to_dict(), search=search, parent_run_id=parent_id,
                        task_gpus=1.0 if base.use_gpu and base.workers == 0 else 0.0)
    objectives = ([M.MIOU], ["max"]) if search.mode == "constrained" else (
        [m for m, _ in M.SEARCH_OBJECTIVES], [d for _, d in M.SEARCH_OBJECTIVES])
    searcher = _StudySearch(
        space=_DefineTrial(search.ranges.values(), search.study), metric=objectives[0],
        mode=objectives[1], sampler=_sampler(search, len(study.trials)),
        study_name=search.study, storage=storage, iterations=search.iterations,
        max_gflops=search.max_gflops)
    if scheduler is not None:
        scheduler = scheduler(max_t=search.iterations, grace_period=search.grace_period,
                              reduction_factor=search.reduction_factor, time_attr=STEP)
    trainable = tune.with_resources(tune.with_parameters(_run_trial, setup=setup),
                                    trial_resources(search, base))
    concurrent = max_concurrent_trials(search, base, ray.cluster_resources())
    callback = _StudyCallback(search=search, base=base, done=done, on_trial=on_trial)
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


# -- trials.json -----------------------------------------------------------------------------
def trial_records(search: SearchSpec, base: TrainSpec, study) -> list[dict]:
    """One record per finished trial of the study (all sessions), by trial number."""
    records = []
    for t in study.get_trials(deepcopy=False):
        state = _TRIAL_STATES.get(t.state.name)
        if state is None:  # WAITING or RUNNING: never run, or still running elsewhere
            continue
        attrs = t.user_attrs
        try:
            lambda2, mu = apply_params(base, t.params).recipe.budget_weights
        except (KeyError, ValueError):
            lambda2 = mu = None
        complete = state == "COMPLETE"
        run_id = attrs.get("mlflow_run_id") or None
        record = {
            "id": search.trial_id(t.number), "number": t.number, "state": state,
            "seeded_from": attrs.get(SEEDED_ATTR), "params": dict(t.params),
            "lambda2": lambda2, "mu": mu,
            "iterations": search.iterations,
            **{k: attrs.get(k) if complete else None for k in REPORT_KEYS},
            "checkpoint": attrs.get("checkpoint") if complete else None,
            "mlflow_run_id": run_id,
            "model_uri": f"runs:/{run_id}/model" if complete and run_id else None,
            "run_name": attrs.get(RUN_NAME_ATTR),
            "retry_of": t.system_attrs.get("failed_trial"),
        }
        if state == "PRUNED" and STEP in attrs:  # the figures where the scheduler stopped it
            record["last_rung"] = {k: attrs.get(k) for k in (STEP, *REPORT_KEYS)}
        if search.mode == "constrained":
            constraints = t.system_attrs.get("constraints")
            record["constraint"] = constraints[0] if constraints else None
            record["feasible"] = None if not constraints else constraints[0] <= 0
        records.append(record)
    return records


def write_trials(search: SearchSpec, base: TrainSpec, study, *,
                 parent_run_id: str | None) -> Path:
    """Write `{results}/trials.json` atomically (the pareto and register stages read it)."""
    document = {
        "study": search.study, "mode": search.mode,
        "max_gflops": search.max_gflops if search.mode == "constrained" else None,
        "storage": search.storage,
        "objectives": [list(o) for o in M.SEARCH_OBJECTIVES],
        "cost_resolution": list(search.cost_resolution),
        "parent_run_id": parent_run_id,
        "trials": trial_records(search, base, study),
    }
    path = search.results_dir() / TRIALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
