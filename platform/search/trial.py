"""One trial of the budget search: train rung by rung, evaluate with hard routing, report.

`run_trial` is the Tune function. Each rung (train up to the rung, then evaluate on the search
split) runs as a Ray task, `train_and_evaluate`, that reserves the trial's CPUs (and GPU):
Ray Train V2's in-process mode refuses to run inside a Tune function. A GPU run on several Ray
Train workers evaluates in a task of its own that takes a GPU the workers have handed back
(`rung_evaluation_options`). With `tune.cost: latency` each evaluation also times the network on
the device it evaluated on (latency_cost.py). The trial's training run is named after the Optuna
trial, so running the trial again resumes its checkpoint and MLflow run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import ray
import torch
from ray import tune
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dynroute.models import build_network
from dynroute.platform import metrics as M
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_manifest, read_scene_kinds
from dynroute.platform.device.fast_path import inference_device
from dynroute.platform.evaluate.evaluation import evaluate
from dynroute.platform.evaluate.latency import LatencySettings
from dynroute.platform.search.latency_cost import measure_latency, trial_threads
from dynroute.platform.search.study import (
    BY_KIND,
    SEEDED_ATTR,
    STEP,
    SearchSpec,
    apply_params,
    check_report,
    report_keys,
)
from dynroute.platform.search.warm_start import WARM_START_TAG, seed_run
from dynroute.platform.tracking import runs
from dynroute.platform.train import ray_train
from dynroute.platform.train.checkpoints import STATE_FILE, completed_checkpoint
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.train.training import train


@dataclass(frozen=True)
class TrialSetup:
    base: dict  # TrainSpec.to_dict() of the trials' common spec
    search: SearchSpec
    parent_run_id: str | None
    task_gpus: float
    warm_start: str | None = None  # the shared prefix's checkpoint (warm_start.py), if any
    warm_start_run_id: str | None = None  # its MLflow run


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
                   train=replace(spec.train, iterations=search.iterations),
                   tracking=replace(spec.tracking, run_name=run_name,
                                    parent_run_id=parent_run_id,
                                    tags=dict(spec.tracking.tags) | dict(tags)))


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune function of one trial: train and evaluate rung by rung, report each."""
    search = setup.search
    params = {k: config[k] for k in search.ranges}
    tags = {"study": search.study, "optuna_trial": str(config["optuna_trial"])}
    if config.get("seeded_from"):
        tags[SEEDED_ATTR] = config["seeded_from"]
    if setup.warm_start:
        tags[WARM_START_TAG] = setup.warm_start_run_id or setup.warm_start
    spec = trial_spec(search, TrainSpec.from_dict(setup.base), params,
                      run_name=config["run_name"], parent_run_id=setup.parent_run_id, tags=tags)
    if setup.warm_start:  # a trial that trained before resumes from its own checkpoint
        seed_run(setup.warm_start, f"{spec.storage.rstrip('/')}/{spec.name}")
    stage = ray.remote(train_and_evaluate).options(
        num_cpus=search.trial_cpus, num_gpus=setup.task_gpus, max_retries=0)
    latency = search.latency if search.cost == "latency" else None
    for stop in search.stops:
        final = stop >= search.iterations
        report = ray.get(stage.remote(spec.to_dict(), stop=None if final else stop,
                                      split=search.split,
                                      cost_resolution=search.cost_resolution, latency=latency,
                                      threads=trial_threads(search.trial_cpus)))
        check_report(report, where=f"trial {config['run_name']} at step {stop}",
                     keys=search.report_keys)
        tune.report(report)


def train_prefix(spec_dict: dict) -> tuple[str, str | None]:
    """Train the study's shared prefix (warm_start.py; a training paused at step P, or found
    there already) and end its MLflow run FINISHED: (its checkpoint, the run id)."""
    spec = TrainSpec.from_dict(spec_dict)
    result = train(spec)
    checkpoint = result.checkpoint or ray_train.newest_checkpoint(
        f"{spec.storage.rstrip('/')}/{spec.name}")
    if checkpoint is None:
        raise RuntimeError(f"the shared prefix {spec.name} left no checkpoint")
    state = ray_train.load_state(str(checkpoint), name=STATE_FILE)
    if int(state["step"]) != spec.stop_at:
        raise RuntimeError(f"the shared prefix {spec.name} is at step {state['step']}, not "
                           f"{spec.stop_at}: remove {spec.storage}/{spec.name} and run again")
    run_id = state.get("mlflow_run_id")
    runs.end_run(spec.tracking.uri, spec.tracking.experiment, run_id, "FINISHED")
    return str(checkpoint), run_id


def train_and_evaluate(spec_dict: dict, *, stop: int | None, split: str,
                       cost_resolution: tuple[int, int], latency: LatencySettings | None = None,
                       threads: int = 1) -> dict:
    """Train `spec` up to `stop` (None: the end), evaluate its checkpoint on `split` with hard
    routing (and time it as `latency` says, with `threads` on a CPU; None: no timing), log the
    figures to its MLflow run; the report (objectives, GFLOPs, latencies, step, ids)."""
    spec = TrainSpec.from_dict(spec_dict)
    final = stop is None
    checkpoint = completed_checkpoint(spec) if final else None
    if checkpoint is None:  # else: trained to the end before a restart; do not log it twice
        checkpoint = train(replace(spec, stop_at=stop)).checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training {spec.name} left no checkpoint to evaluate")
    state = ray_train.load_state(str(checkpoint), name=STATE_FILE)
    step, run_id = int(state["step"]), state.get("mlflow_run_id")
    try:
        options = rung_evaluation_options(spec)
        if options is None:  # this task holds the trial's CPUs, and its GPU if it trained here
            figures = _evaluate(spec, state["model"], split=split,
                                cost_resolution=cost_resolution, latency=latency,
                                threads=threads)
        else:
            task = ray.remote(evaluate_checkpoint).options(**options)
            figures = ray.get(task.remote(spec_dict, str(checkpoint), split=split,
                                          cost_resolution=cost_resolution, latency=latency,
                                          threads=threads))
        ended = state.get("figures", {}).get(M.EXPECTED_COST_RATIO)  # older checkpoints: none
        if ended is not None:
            figures = figures | {M.EXPECTED_COST_RATIO: float(ended)}
        report = figures | {STEP: step, "iterations": spec.train.iterations,
                            "checkpoint": str(checkpoint), "mlflow_run_id": run_id or ""}
        check_report(report, where=f"{spec.name} at step {step}",
                     keys=report_keys("gflops" if latency is None else "latency"))
    except Exception:  # the trial fails: so does its run (the training may have finished it)
        runs.end_run(spec.tracking.uri, spec.tracking.experiment, run_id, "FAILED")
        raise
    if run_id and spec.tracking.uri:
        _log_evaluation(spec, run_id, figures, step=step, final=final)
    return report


def rung_evaluation_options(spec: TrainSpec) -> dict | None:
    """Ray options of a task of its own for a rung's evaluation, or None: the rung's task
    evaluates.

    With `run.workers ≥ 1` and GPUs, the GPUs were the TorchTrainer workers', and they are free
    again once the training returns; the rung's task holds only the trial's CPUs (`tune.py`:
    the trial's placement group has no GPU then). Evaluated there, a rung would segment the
    split on the CPU, some 80 times slower for Cityscapes (benchmarks/README.md, "On a CPU").
    So the evaluation asks Ray for one GPU outside the trial's placement group, and
    for no CPU: the group's CPUs may be all a node has, and one that waited for a CPU would
    wait for the end of the search.
    """
    if not (spec.use_gpu and spec.workers >= 1):
        return None
    return {"num_cpus": 0, "num_gpus": 1, "max_retries": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}


def evaluate_checkpoint(spec_dict: dict, checkpoint: str, *, split: str,
                        cost_resolution: tuple[int, int], latency: LatencySettings | None = None,
                        threads: int = 1) -> dict:
    """The figures of `checkpoint` on `split` (a Ray task of its own: `rung_evaluation_options`)."""
    spec = TrainSpec.from_dict(spec_dict)
    state = ray_train.load_state(checkpoint, name=STATE_FILE)
    return _evaluate(spec, state["model"], split=split, cost_resolution=cost_resolution,
                     latency=latency, threads=threads)


def _evaluate(spec: TrainSpec, weights: dict, *, split: str, cost_resolution: tuple[int, int],
              latency: LatencySettings | None = None, threads: int = 1) -> dict:
    """mIoU and per-image GFLOPs of the network `weights` on `split`, with hard routing, on the
    GPU this process holds when the run trains on GPUs (else on the CPU); with `latency`, its
    latency there too (latency_cost.py: only when the study minimises it, timing costs time)."""
    network = build_network(spec.network)
    network.load_state_dict(weights)
    manifest = read_manifest(spec.data)
    device = inference_device() if spec.use_gpu else torch.device("cpu")
    with torch.inference_mode():
        result = evaluate(network, ShardDataset(root=spec.data, split=split, train=False,
                                                crop=None, verify=True),
                          num_classes=manifest.num_classes, class_names=manifest.class_names,
                          cost_resolution=tuple(cost_resolution), device=device,
                          scene_kinds=read_scene_kinds(spec.data, split))
    timed = {} if latency is None else measure_latency(
        network, data=spec.data, split=split, resolution=tuple(cost_resolution), device=device,
        threads=threads, timing=latency)
    g = result.gflops
    cost = network.cost_model(*cost_resolution)
    all_open = cost.all_open_real()
    return {M.MIOU: result.miou, M.GFLOPS_MEAN: g.mean, M.GFLOPS_MAX: g.max,
            M.GFLOPS_MIN: g.min, M.GFLOPS_P50: g.p50, M.GFLOPS_P90: g.p90,
            M.GFLOPS_ALL_OPEN: all_open / 1e9,
            M.GFLOPS_FLOOR: (all_open - cost.all_open_expected()) / 1e9,
            BY_KIND: result.by_kind(), **timed}


def _log_evaluation(spec: TrainSpec, run_id: str, figures: dict, *, step: int,
                    final: bool) -> None:
    """Rung and final figures on the trial's run; the final ones end it FINISHED."""
    lambda2, mu = spec.train.budget_weights
    numbers = {k: v for k, v in figures.items() if isinstance(v, int | float)}
    runs.log_trial_figures(spec.tracking.uri, spec.tracking.experiment, run_id, numbers,
                           step=step, final_params={"lambda2": lambda2, "mu": mu} if final
                           else None)
