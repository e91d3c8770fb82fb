"""Training: the per-worker loop and the driver call (model.md §9, paper §4.2).

`train(spec)` runs `train_loop` on Ray Train workers (see ray_train.py). Each worker builds the
network, reads its share of the shards, and runs the recipe (recipe.py): soft routing forward,
L = L_seg + L_C, backward, clipping, SGD. Every `checkpoint_every` steps all workers report the
same all-reduced metrics and rank 0 hands Ray a checkpoint (model, optimizer, step, the MLflow run
id). After a failure the loop starts again from the latest checkpoint: the step counter goes
back at most `checkpoint_every` steps and the MLflow run continues.

Only rank 0 talks to MLflow (the Tracker is disabled elsewhere); it logs parameters, metrics
every `log_every` steps, tags (git commit, data hash, params hash) and the final model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from dynroute.models import BudgetLoss, BudgetSchedule, NetworkConfig, build_network
from dynroute.models.losses import segmentation_loss
from dynroute.platform import fast_path, ray_train
from dynroute.platform import metrics as M
from dynroute.platform.dataset import ShardDataset
from dynroute.platform.recipe import (
    TrainConfig,
    build_optimizer,
    clip_gradients,
    network_for_budget,
    set_lr,
    steps_per_epoch,
)
from dynroute.platform.shards import read_manifest

log = logging.getLogger("dynroute.train")
STATE_FILE = "state.pt"
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None  # None: no tracking
    experiment: str = "dynroute"
    run_name: str = "train"
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs; JSON-able so it travels to Ray workers and into checkpoints."""

    data: str  # prepared dataset root (path or s3://)
    model: dict  # NetworkConfig fields
    train: dict  # TrainConfig fields
    name: str = "train"
    storage: str = "runs"
    workers: int = 0
    use_gpu: bool = False
    loader_workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    max_failures: int = 2
    stop_at: int | None = None  # pause after this step (a checkpoint there); a later call resumes
    fast: bool = True  # the measured fast path of this device (fast_path.py); False: plain fp32
    bf16: bool = False
    channels_last: bool = False
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainSpec:
        data = dict(data)
        data["tracking"] = TrackingSpec(**data.get("tracking", {}))
        return cls(**data)

    @property
    def recipe(self) -> TrainConfig:
        return TrainConfig(**self.train)

    @property
    def network(self) -> NetworkConfig:
        return network_for_budget(NetworkConfig.from_dict(self.model), self.recipe.budget)


def train(spec: TrainSpec) -> ray_train.FitResult:
    """Run a training (in this process with workers=0, else on Ray Train workers)."""
    spec.recipe, spec.network  # noqa: B018 (validate on the driver, before any worker starts)
    if "://" not in spec.data:  # workers run elsewhere (other folders, other nodes)
        spec = replace(spec, data=os.path.abspath(spec.data))
    read_manifest(spec.data)  # fail early and clearly when the data is missing
    return ray_train.fit(train_loop, config=spec.to_dict(), name=spec.name,
                         storage=spec.storage, num_workers=spec.workers,
                         use_gpu=spec.use_gpu, max_failures=spec.max_failures)


def _run_dir(spec: TrainSpec) -> str:
    """The run's folder in storage, where Ray persists its checkpoints."""
    base = spec.storage if "://" in spec.storage else os.path.abspath(spec.storage)
    return f"{base.rstrip('/')}/{spec.name}"


def _tracker(spec: TrainSpec, enabled: bool):
    from dynroute.platform.tracking import Tracker

    return Tracker(uri=spec.tracking.uri, experiment=spec.tracking.experiment,
                   enabled=enabled and spec.tracking.uri is not None)


def train_loop(config: dict) -> None:
    """The per-worker training loop (Ray Train calls it on every worker)."""
    spec = TrainSpec.from_dict(config)
    recipe, net_config = spec.recipe, spec.network
    me = ray_train.worker()
    layout = fast_path.for_training(me.device, fast=spec.fast, channels_last=spec.channels_last,
                                    bf16=spec.bf16)
    torch.manual_seed(recipe.seed)  # the same initial weights on every worker
    network = layout.network(build_network(net_config))
    # On the device before the optimizer exists: its loaded state then lands beside the params.
    network = network.to(me.device)
    cost = network.cost_model(*recipe.crop)  # C_all at the training resolution
    lambda2, mu = recipe.budget_weights
    budget = BudgetLoss(lambda2=lambda2, mu=mu, c_all=cost.all_open_expected(),
                        schedule=BudgetSchedule(recipe.budget_start, recipe.budget_ramp))
    optimizer = build_optimizer(network, recipe)
    step, run_id, resumes = 0, None, []
    resume = ray_train.latest_checkpoint(_run_dir(spec), required=STATE_FILE)
    if resume is not None:
        state = torch.load(resume / STATE_FILE, map_location="cpu", weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, run_id = int(state["step"]), state.get("mlflow_run_id")
        resumes = [*state.get("resumes", []), step]  # the run's history, kept in checkpoints
        print(f"[rank {me.rank}] resumed from checkpoint at step {step}", flush=True)
    model = ray_train.prepare_model(network, device=me.device)

    dataset = ShardDataset(root=spec.data, split="train", train=True, crop=recipe.crop,
                           seed=recipe.seed, rank=me.rank, world_size=me.world_size)
    per_epoch = steps_per_epoch(len(dataset), recipe.batch_size)
    tracker = _tracker(spec, me.is_chief)
    run_id = _start_tracking(tracker, spec, run_id, cost)

    sums = torch.zeros(5, dtype=torch.float64)  # seg, budget, expected FLOPs, grad norm, count
    started, last_metrics = time.monotonic(), {}
    end = recipe.iterations if spec.stop_at is None else min(spec.stop_at, recipe.iterations)
    while step < end:
        epoch, skip = divmod(step, per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, drop_last=True,
                            num_workers=spec.loader_workers, pin_memory=me.device.type == "cuda")
        for i, batch in enumerate(loader):
            if i < skip:
                continue  # resumed mid-epoch: these batches were trained before the failure
            if step >= end or i >= per_epoch:
                break
            lr = set_lr(optimizer, step, recipe)
            progress = step / recipe.iterations
            seg, budget_value, expected, norm = _step(model, batch, me.device, network, cost,
                                                      budget, optimizer, recipe, layout, progress)
            step += 1
            sums += torch.tensor([seg, budget_value, expected, norm, 1.0], dtype=torch.float64)
            if step % spec.log_every == 0 or step == recipe.iterations:
                last_metrics = _metrics(sums, lr, step, started)
                sums.zero_()
                tracker.log_metrics(last_metrics, step=step)
                if me.is_chief:
                    line = _progress_line(last_metrics, step, recipe.iterations, started)
                    print(line, flush=True)
            if step % spec.checkpoint_every == 0 or step == end:
                _checkpoint(network, optimizer, step, run_id, resumes, spec, me, last_metrics)
        skip = 0
    if me.is_chief:
        if step >= recipe.iterations:
            _finish_tracking(tracker, network, recipe)
        else:  # paused (stop_at): the run goes on when training resumes
            tracker.flush()


def _step(model, batch, device, network, cost, budget, optimizer, recipe, layout, progress):
    images = layout.images(batch["image"].to(device, non_blocking=True))
    labels = batch["label"].to(device, non_blocking=True)
    with layout.autocast(device):
        out = model(images, progress=progress)
        seg = segmentation_loss(out.logits.float(), labels)
        expected = cost.expected({k: v.float() for k, v in out.gates.items()})
        budget_value = budget(expected, progress)
    loss = seg + budget_value
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_gradients(network.parameters(), recipe.grad_clip)
    optimizer.step()
    return seg.item(), float(budget_value.detach()), expected.detach().mean().item(), norm


def _metrics(sums: torch.Tensor, lr: float, step: int, started: float) -> dict:
    mean = ray_train.all_reduce_mean(sums)  # identical numbers on every worker
    n = max(float(mean[4]), 1e-12)
    return {
        M.LOSS_SEGMENTATION: float(mean[0]) / n,
        M.LOSS_BUDGET: float(mean[1]) / n,
        M.EXPECTED_GFLOPS: float(mean[2]) / n / 1e9,
        "grad_norm": float(mean[3]) / n,
        M.LEARNING_RATE: lr,
        "step": step,
        "elapsed_s": time.monotonic() - started,
    }


def _progress_line(metrics: dict, step: int, total: int, started: float) -> str:
    elapsed = time.monotonic() - started
    eta = elapsed / max(step, 1) * (total - step)
    return (f"train: step {step}/{total} loss_seg {metrics[M.LOSS_SEGMENTATION]:.4f} "
            f"loss_budget {metrics[M.LOSS_BUDGET]:.4f} expected_gflops "
            f"{metrics[M.EXPECTED_GFLOPS]:.3f} lr {metrics[M.LEARNING_RATE]:.5f} "
            f"ETA {eta:.0f}s")


def _checkpoint(network, optimizer, step, run_id, resumes, spec, me, metrics) -> None:
    """`resumes`: the steps this run restarted from so far (its failures and pauses)."""
    with ray_train.checkpoint_dir(step) as folder:
        if me.is_chief:
            torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "mlflow_run_id": run_id, "resumes": resumes},
                       folder / STATE_FILE)
            (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
        report = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        ray_train.report(report | {"step": step},
                         checkpoint=folder if me.is_chief else None, step=step)


def _start_tracking(tracker, spec: TrainSpec, run_id: str | None, cost) -> str | None:
    from dynroute.platform.tracking import flatten, git_commit, params_hash

    if not tracker.enabled:
        return run_id
    manifest = read_manifest(spec.data)
    tags = {"git_commit": git_commit() or "unknown", "data_hash": manifest.content_hash,
            "params_hash": params_hash({"model": spec.model, "train": spec.train}),
            "dataset": manifest.dataset, **spec.tracking.tags}
    if run_id is not None:  # restarted from a checkpoint: continue the same MLflow run
        return tracker.resume_run(run_id)
    run_id = tracker.start_run(run_name=spec.tracking.run_name, tags=tags,
                               parent_run_id=spec.tracking.parent_run_id)
    tracker.log_params(flatten({"model": asdict(spec.network) | {"route": None},
                                "train": spec.train, "data": spec.data,
                                "workers": spec.workers}))
    tracker.log_metrics({"c_all_gflops": cost.all_open_expected() / 1e9}, step=0)
    return run_id


def _finish_tracking(tracker, network, recipe: TrainConfig) -> None:
    if not tracker.enabled:
        return
    h, w = recipe.crop
    example = np.zeros((1, 3, h, w), dtype=np.float32)
    logits = np.zeros((1, network.num_classes, h, w), dtype=np.float32)
    tracker.log_model(network.cpu().eval(), name="model", input_example=example,
                      output_example=logits, pip_requirements=_requirements())
    tracker.flush()
    tracker.end_run()


def _requirements() -> list[str]:
    """What a loaded model needs: this package's pinned torch and numpy."""
    from importlib.metadata import version

    return [f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}"]
