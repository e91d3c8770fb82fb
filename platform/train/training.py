"""Training: the per-worker loop and the driver call (docs/model.md §9, paper §4.2).

`train(spec)` runs `train_loop` on Ray Train workers (see ray_train.py). Each worker builds the
network, reads its share of the shards, and runs the recipe (recipe.py): soft routing forward, L =
L_seg + L_C, backward, clipping, SGD (train_step.py; on one GPU replayed as a CUDA graph). Every
`checkpoint_every` steps all workers report the same all-reduced metrics and rank 0 hands Ray a
checkpoint (model, optimizer, step, the MLflow run id). After a failure the loop starts again from
the latest checkpoint: the step counter goes back at most `checkpoint_every` steps and the MLflow
run continues. Data order and augmentation are seeded per epoch and sample, drop path per worker
and step (`step_seed`), so a resumed training ends bit for bit where an uninterrupted one does
(same device, workers and loader workers; tested on CPU).

The driver owns the MLflow run: `train` starts it with the parameters and tags (git commit,
data hash, params hash), or continues the run of the newest checkpoint, hands its id to the
workers, and ends it FAILED (KILLED on an interrupt) when the training fails, so no failed
training stays RUNNING and a retry before the first checkpoint logs into the same run. Only
rank 0 of the workers logs (the Tracker is disabled elsewhere): metrics every `log_every` steps
and, at the end, the model, which ends the run FINISHED.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from dynroute.models import BudgetLoss, BudgetSchedule, build_network
from dynroute.platform import metrics as M
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_manifest, verify_shards
from dynroute.platform.device import fast_path
from dynroute.platform.tracking import runs
from dynroute.platform.train import checkpoints, ray_train
from dynroute.platform.train.recipe import (
    build_optimizer,
    check_finite,
    set_lr,
    steps_per_epoch,
)
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.train.train_step import TrainStep, graph_blocker
from dynroute.platform.url_secrets import mask_url

log = logging.getLogger("dynroute.train")
_DROP_PATH_STREAM = 2  # the dataset's streams are 0 (permutation) and 1 (augmentation)


def train(spec: TrainSpec) -> ray_train.FitResult:
    """Run a training (in this process with workers=0, else on Ray Train workers)."""
    if "://" not in spec.data:  # workers run elsewhere (other folders, other nodes)
        spec = replace(spec, data=os.path.abspath(spec.data))
    manifest = read_manifest(spec.data)  # fail early and clearly when the data is missing
    # Every byte the training reads is the one the manifest's hash (its MLflow tag) stands for.
    verify_shards(spec.data, manifest, splits=("train",))
    with checkpoints.one_writer(spec):
        checkpoints.check_resume(spec, data_hash=manifest.content_hash)
        return _fit(spec, manifest)


def _fit(spec: TrainSpec, manifest) -> ray_train.FitResult:
    # The state the training resumes from, read before any work: a run whose checkpoints all
    # fail to load is refused (DamagedRunError), not started over from step 0.
    state = ray_train.latest_state(checkpoints.run_dir(spec), name=checkpoints.STATE_FILE,
                                   in_worker=False)
    spec, tracker = _open_run(spec, manifest, state)
    del state  # the workers read it again: not held on the driver through the training
    try:
        return ray_train.fit(train_loop, config=spec.to_dict(), name=spec.name,
                             storage=spec.storage, num_workers=spec.workers,
                             use_gpu=spec.use_gpu, max_failures=spec.max_failures)
    except BaseException as exc:
        if tracker is not None:
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            try:
                tracker.terminate(spec.tracking.run_id, status)
            except Exception as end_exc:  # the training's own error is what matters
                log.warning("could not mark MLflow run %s %s: %s", spec.tracking.run_id,
                            status, end_exc)
        raise


def _open_run(spec: TrainSpec, manifest, state: object | None):
    """(spec with `tracking.run_id` set, its tracker), or (spec, None) without tracking; which run
    it is (`runs.open_training_run`) follows `state`, the one the training resumes from."""
    if spec.tracking.uri is None:
        return spec, None
    model = spec.to_dict()["model"]
    tags = runs.provenance_tags(
        data_hash=manifest.content_hash, dataset=manifest.dataset,
        params={"model": model, "train": asdict(spec.train)}) | spec.tracking.tags
    tracker, run_id = runs.open_training_run(
        spec.tracking.uri, spec.tracking.experiment, run_name=spec.tracking.run_name,
        parent_run_id=spec.tracking.parent_run_id,
        state=state if isinstance(state, dict) else None, tags=tags,
        params={"model": asdict(spec.network) | {"route": None}, "train": asdict(spec.train),
                "data": mask_url(spec.data), "workers": spec.workers})
    return replace(spec, tracking=replace(spec.tracking, run_id=run_id)), tracker


def train_loop(config: dict) -> None:
    """The per-worker training loop (Ray Train calls it on every worker)."""
    spec = TrainSpec.from_dict(config)
    recipe, net_config = spec.train, spec.network
    me = ray_train.worker()
    layout = fast_path.for_training(me.device, fast=spec.fast, channels_last=spec.channels_last,
                                    bf16=spec.bf16)
    torch.manual_seed(recipe.seed)  # the same initial weights on every worker
    network = layout.network(build_network(net_config))
    # On the device before the optimizer exists: its loaded state then lands beside the params.
    network = network.to(me.device)
    cost = network.cost_model(*recipe.crop)  # C_all at the training resolution
    lambda2, mu = recipe.budget_weights
    budget = BudgetLoss(lambda2=lambda2 * recipe.lambda2_scale, mu=mu,
                        c_all=cost.all_open_expected(),
                        schedule=BudgetSchedule(recipe.budget_start, recipe.budget_ramp))
    optimizer = build_optimizer(network, recipe)
    step, history = 0, {"resumes": []}
    # Batch order depends on the number of loader processes, so a resume keeps the count the
    # run started with (recorded in its checkpoints) unless one is set explicitly.
    workers = spec.loader_workers
    state = ray_train.latest_state(checkpoints.run_dir(spec), name=checkpoints.STATE_FILE)
    if state is not None:
        if workers is None:
            workers = state.get("loader_workers")
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        # The run's history, carried in its checkpoints: the steps it restarted from (failures,
        # pauses) and the search's shared start it began from (warm_start.py), if any.
        history = {"resumes": list(state.get("resumes", [])),
                   "warm_start": state.get("warm_start")}
        if "resumes" in state or history["warm_start"] is None:
            history["resumes"].append(step)
            print(f"[rank {me.rank}] resumed from checkpoint at step {step}", flush=True)
        else:  # the copy of the search's shared prefix: a start, not a restart
            print(f"[rank {me.rank}] started from the search's shared first {step} steps",
                  flush=True)
        del state
    model = ray_train.prepare_model(network, device=me.device)
    if workers is None:
        workers = fast_path.loader_workers(me.device)
    history["loader_workers"] = workers
    if me.device.type == "cuda" and workers == 0 and me.is_chief:
        print("[rank 0] warning: run.loader_workers is 0, so decoding and augmentation run in "
              "the training process, which decodes far fewer images a second than a GPU trains; "
              "leave run.loader_workers unset or give the cores each GPU can use",
              flush=True)

    data_hash = read_manifest(spec.data).content_hash  # recorded in each checkpoint's spec
    dataset = ShardDataset(root=spec.data, split="train", train=True, crop=recipe.crop,
                           seed=recipe.seed, rank=me.rank, world_size=me.world_size)
    per_epoch = steps_per_epoch(len(dataset), recipe.batch_size)
    run_id = spec.tracking.run_id
    tracker = runs.worker_tracker(spec.tracking.uri, spec.tracking.experiment, run_id,
                                  chief=me.is_chief)
    if not history["resumes"]:  # a start (from zero or from the search's shared steps)
        tracker.log_metrics({"c_all_gflops": cost.all_open_expected() / 1e9}, step=0)

    # Per-step figures stay on the device (seg, budget, expected FLOPs, grad norm) and are read
    # back only every log_every steps and at checkpoints: no step waits for the device, so the
    # host queues the next step's kernels while the GPU still runs this one.
    sums = torch.zeros(4, dtype=torch.float64, device=me.device)
    blocker = graph_blocker(layout, me.device, distributed=me.world_size > 1,
                            drop_path_prob=net_config.drop_path_prob, optimizer=optimizer)
    if layout.cuda_graph and me.is_chief:
        print(f"[rank 0] training step: {'eager, ' + blocker if blocker else 'CUDA graph'}",
              flush=True)
    train_step = TrainStep(model, network, cost, budget, optimizer, recipe, layout, me.device,
                           graphed=blocker is None)
    fallback_told = False
    count = 0
    started, last_metrics = time.monotonic(), {}
    end = recipe.iterations if spec.stop_at is None else min(spec.stop_at, recipe.iterations)
    while step < end:
        epoch, skip = divmod(step, per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, drop_last=True,
                            num_workers=workers, pin_memory=me.device.type == "cuda")
        for i, batch in enumerate(loader):
            if i < skip:
                continue  # resumed mid-epoch: these batches were trained before the failure
            if step >= end or i >= per_epoch:
                break
            lr = set_lr(optimizer, step, recipe)
            torch.manual_seed(step_seed(recipe.seed, me.rank, step))
            progress = step / recipe.iterations
            sums += train_step(batch, progress)
            if train_step.fallback is not None and not fallback_told:
                fallback_told = True
                print(f"[rank {me.rank}] warning: the CUDA graph capture of the training step "
                      f"failed ({train_step.fallback}); training goes on eagerly", flush=True)
            step += 1
            count += 1
            logs = step % spec.log_every == 0 or step == recipe.iterations
            saves = step % spec.checkpoint_every == 0 or step == end
            if logs or saves:  # read back, and never checkpoint past a diverged step
                figures = _metrics(sums, count, lr, step, started, c_all=budget.c_all)
                check_finite({k: figures[k] for k in _CHECKED}, f"in steps {step - count + 1}-"
                             f"{step}")
                if logs:
                    last_metrics = figures
                    sums.zero_()
                    count = 0
                    tracker.log_metrics(last_metrics, step=step)
                    if me.is_chief:
                        line = _progress_line(last_metrics, step, recipe.iterations, started)
                        print(line, flush=True)
            if saves:
                _checkpoint(network, optimizer, step, run_id, history, spec, me, last_metrics,
                            data_hash)
        skip = 0
    if me.is_chief:
        if history["resumes"] and history["resumes"][-1] >= recipe.iterations:
            tracker.end_run()  # trained to the end before: the model is logged already
        elif step >= recipe.iterations:
            runs.finish_training_run(tracker, network, net_config)
        else:  # paused (stop_at): the run goes on when training resumes
            tracker.flush()


_CHECKED = (M.LOSS_SEGMENTATION, M.LOSS_BUDGET, "grad_norm")


def _metrics(sums: torch.Tensor, count: int, lr: float, step: int, started: float, *,
             c_all: float) -> dict:
    """Means over the last `count` steps and every worker (identical numbers everywhere)."""
    seg, budget, expected, norm = (ray_train.all_reduce_mean(sums) / count).tolist()
    return {
        M.LOSS_SEGMENTATION: seg,
        M.LOSS_BUDGET: budget,
        M.EXPECTED_GFLOPS: expected / 1e9,
        M.EXPECTED_COST_RATIO: expected / c_all,
        "grad_norm": norm,
        M.LEARNING_RATE: lr,
        "step": step,
        "elapsed_s": time.monotonic() - started,
    }


def _progress_line(metrics: dict, step: int, total: int, started: float) -> str:
    elapsed = time.monotonic() - started
    eta = elapsed / max(step, 1) * (total - step)
    return (f"train: step {step}/{total} loss_seg {metrics[M.LOSS_SEGMENTATION]:.4f} "
            f"loss_budget {metrics[M.LOSS_BUDGET]:.4f} expected_gflops "
            f"{metrics[M.EXPECTED_GFLOPS]:.3f} (E/C_all {metrics[M.EXPECTED_COST_RATIO]:.3f}) "
            f"lr {metrics[M.LEARNING_RATE]:.5f} "
            f"ETA {eta:.0f}s")


def _checkpoint(network, optimizer, step, run_id, history, spec, me, metrics,
                data_hash) -> None:
    """`history`: `resumes` (the steps this run restarted from so far), `warm_start` and
    `loader_workers` (the loader processes the run's batch order comes from)."""
    with ray_train.checkpoint_dir(step) as folder:
        if me.is_chief:
            checkpoints.write(folder, spec=spec, data_hash=data_hash, state={
                "model": network.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "mlflow_run_id": run_id, **history,
                # The last logged figures: where the budget stood (`trial.py` reports it).
                "figures": {k: float(v) for k, v in metrics.items()
                            if isinstance(v, int | float)}})
        report = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        ray_train.report(report | {"step": step},
                         checkpoint=folder if me.is_chief else None, step=step)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one worker's random draws (drop path) at one step.

    A pure function of (seed, rank, step): a resumed training (or a warm-started trial) draws what
    an uninterrupted one would without carrying generator state, and workers, which all start
    from the same seed for the same initial weights, do not drop the same samples' branches.
    """
    return int(np.random.SeedSequence([seed, rank, step, _DROP_PATH_STREAM]).generate_state(1)[0])
