"""One shared start for a budget search's trials: the budget-free part of training, trained once.

The budget loss is λ2 · w(t) · (E/C_all − μ)² with w(t) = 0 until `train.budget_start` (40% of
training; losses.BudgetSchedule). Trials that differ only in λ2 and μ build the same network
from the same seed and read the same batches, so their first P = ⌊budget_start · N⌋ steps compute
the same thing. The search trains those steps once, as the study's *prefix* run
(`{study}-prefix`, a child MLflow run of the study), and every trial starts from a copy of its
checkpoint at step P: the search then costs 1 − budget_start (60%) of its training steps plus
one prefix.

A copy is the checkpoint's model and optimizer state at step P without the prefix's MLflow run
(the trial logs into a run of its own, tagged `warm_start` with the prefix's run id) and with
`warm_start` = {step: P, run_id: the prefix's run}, which the trial's own checkpoints carry on.
Training resumes from it exactly as from its own checkpoint; the trial's new MLflow run gets
a copy of the prefix's metrics up to step P, so its curves are whole. Random draws are seeded
per worker and step (`training.step_seed`), so on the same device and worker count a
warm-started trial ends bit for bit where a cold one does.

It applies when every searched key is a budget weight (`train.lambda2`, `train.mu`) and every
early-stopping rung comes after the prefix (up to it, all trials are the same network, so a rung
there would compare identical models). Otherwise `prefix_steps` is 0 and trials train from
scratch.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from dynroute.platform.train import ray_train
from dynroute.platform.train.checkpoints import STATE_FILE
from dynroute.platform.train.spec import TrainSpec

BUDGET_ONLY_KEYS = frozenset({"train.lambda2", "train.mu"})
PREFIX_SUFFIX = "prefix"
WARM_START_TAG = "warm_start"


def prefix_steps(*, searched: set[str] | frozenset[str], stops: tuple[int, ...],
                 iterations: int, budget_start: float) -> int:
    """P, the steps every trial shares, or 0 when the trials do not share a start.

    Args:
        searched: the dotted keys of the search space.
        stops: where trials stop to report (the rungs, then `iterations`).
        iterations: steps per trial.
        budget_start: `train.budget_start`, the fraction of training before the budget acts.
    """
    if not searched or not set(searched) <= BUDGET_ONLY_KEYS:
        return 0
    steps = math.floor(budget_start * iterations)
    if steps < 1 or steps >= iterations or any(stop <= steps for stop in stops):
        return 0
    return steps


def prefix_spec(trial_base: TrainSpec, *, study: str, steps: int,
                parent_run_id: str | None) -> TrainSpec:
    """The prefix's training: a trial's spec (any λ2, μ: they act only later) paused at P."""
    name = f"{study}-{PREFIX_SUFFIX}"
    return replace(trial_base, name=name, stop_at=steps,
                   tracking=replace(trial_base.tracking, run_name=name,
                                    parent_run_id=parent_run_id,
                                    tags=dict(trial_base.tracking.tags) | {"study": study}))


def seed_run(prefix_checkpoint: str, run_dir: str) -> bool:
    """Put the trial's copy of the prefix checkpoint into `run_dir` (a local path or URI).

    Returns False, writing nothing, when the run has a checkpoint already (the trial trained
    before: it resumes from its own).
    """
    if ray_train.latest_state(run_dir, name=STATE_FILE, in_worker=False) is not None:
        return False
    state = ray_train.load_state(prefix_checkpoint, name=STATE_FILE)
    step = int(state["step"])
    copy = {"model": state["model"], "optimizer": state["optimizer"], "step": step,
            "mlflow_run_id": None, "loader_workers": state.get("loader_workers"),
            "warm_start": {"step": step, "run_id": state.get("mlflow_run_id")}}
    with tempfile.TemporaryDirectory(prefix="dynroute-warm-") as folder:
        torch.save(copy, Path(folder) / STATE_FILE)
        ray_train.place_checkpoint(Path(folder), run_dir=run_dir, step=step)
    return True
