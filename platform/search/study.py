"""The Optuna side of the budget search: its settings, search space, study and trials.json.

`SearchSpec` is params.yaml's `tune:` section resolved; `parse_space` turns `tune.space` into
`Range`s of `train.*` / `model.*` keys and `seed_points` the paper's named budgets into points of
it. The study lives in persistent storage under a fixed name (`open_storage`, `load_study`) and
is the source of truth: `requeue_interrupted` and `finished_trials` let a killed driver's study
resume; trials_file.py writes `trials.json` from it. How these fit with Ray Tune is told in
tune.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from dynroute.models import BUDGETS, NetworkConfig
from dynroute.platform import metrics as M
from dynroute.platform.evaluate.latency import LatencySettings
from dynroute.platform.search.latency_cost import LATENCY_KEYS
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrainSpec

REPORT_KEYS = (M.MIOU, M.GFLOPS_MEAN, M.GFLOPS_MAX, M.GFLOPS_MIN, M.GFLOPS_P50, M.GFLOPS_P90)
STEP = "step"
# Figures a trial reports beside the objectives when it has them: where its budget ended, and
# the real cost its network can reach (trials_file.budget_end).
BUDGET_KEYS = (M.EXPECTED_COST_RATIO, M.GFLOPS_FLOOR, M.GFLOPS_ALL_OPEN)
# Per scene kind figures of a trial's evaluation, where the data records kinds (evaluation.py).
BY_KIND = "by_kind"
SCHEDULERS = ("fifo", "mo-asha")
# tune.cost → the metric the study minimises beside mIoU (latency_cost.py says why p90).
COSTS = {"gflops": M.GFLOPS_MEAN, "latency": M.LATENCY_P90_MS}
# User attributes of the study and its trials.
RUN_NAME_ATTR = "run_name"
SEEDED_ATTR = "seeded_from"
CONSTRAINT_ATTR = "constraint"  # gflops_mean − max_gflops; ≤ 0 is feasible
PARENT_RUN_ATTR = "mlflow_parent_run_id"
MODE_ATTR = "mode"
COST_ATTR = "cost"  # tune.cost of the study; absent: a study from before tune.cost (gflops)


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
    """`base` with the dotted `params` set in its train and model sections (validated: an
    impossible combination raises here)."""
    changes: dict[str, dict] = {"train": {}, "model": {}}
    for key, value in params.items():
        section, _, name = key.partition(".")
        changes[section][name] = value
    return replace(base, train=replace(base.train, **changes["train"]),
                   model=replace(base.model, **changes["model"]))


# -- settings --------------------------------------------------------------------------------
def _default_space() -> dict:
    return {"train.lambda2": {"low": 0.05, "high": 1.5, "log": True},
            "train.mu": {"low": 0.0, "high": 1.0, "log": False}}


@dataclass(frozen=True)
class TuneSettings:
    """The budget search as params.yaml's `tune:` section states it (defaults: params.yaml's).

    space: dotted params.yaml keys (train.* or model.*) → {low, high, log}. storage: an Optuna
    journal file, or an RDB URL (postgresql://…, sqlite:///…) on a cluster. max_gflops > 0
    switches to the hard-budget mode (best mIoU subject to real GFLOPs ≤ max_gflops). cost:
    the second objective, the mean real GFLOPs or the measured p90 latency (latency_cost.py).
    """

    study: str = "dynroute-budget"
    storage: str = "artifacts/tune/optuna.journal"
    results: str = "artifacts/tune"  # Ray Tune state, the trials' training runs, trials.json
    num_samples: int = 6  # trials in all, the seeded ones included
    max_concurrent: int = 0  # 0: as many as the CPUs (GPUs) Ray sees allow
    trial_cpus: float = 1.0
    seed: int = 0
    seed_budgets: tuple[str, ...] = ("dynamic-a", "dynamic-b", "dynamic-c")
    space: dict = field(default_factory=_default_space)
    iterations: int = 0  # iterations per trial; 0: train.iterations
    scheduler: str = "fifo"  # fifo | mo-asha
    grace_period: int = 100  # mo-asha: the first rung, in iterations
    reduction_factor: int = 2  # mo-asha: keep ~1/η of the trials at each rung
    max_gflops: float = 0.0
    warm_start: bool = True  # train the trials' budget-free first steps once (warm_start.py)
    cost: str = "gflops"  # gflops | latency


@dataclass(frozen=True, kw_only=True)
class SearchSpec(TuneSettings):
    """A budget search, resolved and checked: the `tune:` settings it inherits (`iterations`
    resolved to at least 1), plus what it takes from the `evaluate:` and `run:` sections."""

    split: str = "val"
    cost_resolution: tuple[int, int] = (1024, 2048)
    max_failures: int = 1  # Tune retries of a failing trial
    latency: LatencySettings = field(default_factory=LatencySettings)  # profile: (cost: latency)
    ranges: dict[str, Range] = field(init=False, repr=False, compare=False)

    @classmethod
    def resolve(cls, tune: TuneSettings, *, train_iterations: int, **given) -> SearchSpec:
        """`tune`'s settings with `iterations` 0 meaning `train_iterations`, and the `given`
        fields."""
        settings = {f.name: getattr(tune, f.name) for f in dataclasses.fields(TuneSettings)}
        settings["iterations"] = tune.iterations or train_iterations
        return cls(**settings, **given)

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
        if self.cost not in COSTS:
            raise SearchError(f"tune.cost = {self.cost!r}: choose gflops (mean real GFLOPs) or "
                              f"latency (measured p90 ms on the trials' device)")
        if self.cost == "latency" and self.max_gflops > 0:
            raise SearchError(f"tune.max_gflops = {self.max_gflops} bounds GFLOPs, and the hard-"
                              f"budget mode optimises mIoU alone, so tune.cost: latency would "
                              f"measure for nothing: set tune.max_gflops: 0 or tune.cost: gflops")
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
    def cost_metric(self) -> str:
        """The second objective's metric: gflops_mean or latency_p90_ms."""
        return COSTS[self.cost]

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """(metric, direction) of the Pareto search: mIoU (max), then the cost (min)."""
        (miou, up), (_, down) = M.SEARCH_OBJECTIVES
        return ((miou, up), (self.cost_metric, down))

    @property
    def report_keys(self) -> tuple[str, ...]:
        return report_keys(self.cost)

    @property
    def stops(self) -> tuple[int, ...]:
        """Where a trial pauses to evaluate and report: the rungs, then the end."""
        if self.scheduler == "fifo":
            return (self.iterations,)
        # Lazy: mo_asha imports Ray Tune (seconds), and params.yaml's schema imports this module,
        # so reading params would load Ray.
        from dynroute.platform.search.mo_asha import rung_levels

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
    cost = study.user_attrs.get(COST_ATTR, "gflops" if mode is not None else None)
    if cost not in (None, spec.cost):
        raise SearchError(f"study {spec.study!r} in {spec.storage} minimised {cost}; tune.cost "
                          f"now asks for {spec.cost}, and the trials' values would mix the "
                          f"two: use another tune.study")
    if mode is None:
        study.set_user_attr(MODE_ATTR, spec.mode)
    if COST_ATTR not in study.user_attrs:
        study.set_user_attr(COST_ATTR, spec.cost)
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


class DefineTrial:
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


def report_keys(cost: str) -> tuple[str, ...]:
    """The figures every report must carry: REPORT_KEYS, and the latencies for cost: latency."""
    return (*REPORT_KEYS, *LATENCY_KEYS) if cost == "latency" else REPORT_KEYS


def check_report(result: Mapping[str, object], *, where: str,
                 keys: Sequence[str] = REPORT_KEYS) -> dict[str, float]:
    """The `keys` (report_keys) of a report; an error if one is missing or not finite."""
    bad = [k for k in (*keys, STEP) if not isinstance(result.get(k), int | float)
           or not math.isfinite(result[k])]
    if bad:
        raise ValueError(f"{where}: the report lacks finite {', '.join(bad)} (got "
                         f"{ {k: result.get(k) for k in bad} }); Optuna would drop the trial")
    return {k: float(result[k]) for k in (*keys, STEP)}


def make_sampler(spec: SearchSpec, done: int):
    constraints = _GflopsConstraint() if spec.mode == "constrained" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constraints_func is marked experimental
        return optuna.samplers.TPESampler(seed=spec.seed + done, constraints_func=constraints)
