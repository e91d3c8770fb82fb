"""The training recipe (paper §4.2 + reference code; docs/model.md §9), as plain data and functions.

SGD with momentum 0.9 and weight decay 1e-4 except on BN parameters (and biases); lr 0.05 from
scratch, the gates' lr ×`gate_lr_multiplier` (2.5 in the reference with ImageNet init); linear
warm-up from 0.001× over 1000 iterations, then poly 0.9; gradient clipping at total norm 5.0; the
budget loss with its schedule (losses.BudgetLoss), its λ2 times `lambda2_scale` (1 in the paper).

Named budgets (paper Table 4) select λ2, μ and the small gate; "network-fix" trains the fixed-gate
network without a budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from dynroute.models import BUDGETS, NetworkConfig
from dynroute.models.gate import SoftConditionalGate

BUDGET_NAMES = (*BUDGETS, "network-fix")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (the `train:` section of params.yaml)."""

    iterations: int = 300
    batch_size: int = 8
    crop: tuple[int, int] = (256, 256)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gate_lr_multiplier: float = 1.0
    warmup_iterations: int = 1000
    warmup_factor: float = 0.001
    poly_power: float = 0.9
    grad_clip: float = 5.0
    budget: str = "dynamic-raw"
    lambda2: float | None = None  # overrides the named budget's
    mu: float | None = None
    # The budget loss weighs the penalty by λ2 · lambda2_scale (1 in the paper): a short training
    # scales the budget's pull on the gates up so that it reaches μ in fewer steps.
    lambda2_scale: float = 1.0
    budget_start: float = 0.4
    budget_ramp: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        if self.budget not in BUDGET_NAMES:
            raise ValueError(f"train.budget = {self.budget!r}: choose one of "
                             f"{', '.join(BUDGET_NAMES)}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("train.iterations and train.batch_size must be at least 1")
        if len(self.crop) != 2 or min(self.crop) < 32:
            raise ValueError(f"train.crop = {list(self.crop)}: give [height, width], each >= 32")
        if self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip = {self.grad_clip}: must be positive")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("train.lr must be positive, train.momentum in [0, 1) and "
                             "train.weight_decay >= 0")
        if self.warmup_iterations < 0 or not 0 < self.warmup_factor <= 1:
            raise ValueError("train.warmup_iterations must be >= 0 and train.warmup_factor in "
                             "(0, 1]")
        if self.lambda2 is not None and self.lambda2 < 0:
            raise ValueError(f"train.lambda2 = {self.lambda2}: the budget's weight must be >= 0")
        if not self.lambda2_scale > 0:
            raise ValueError(f"train.lambda2_scale = {self.lambda2_scale}: must be positive (1 "
                             f"is the paper's budget loss)")
        if self.mu is not None and not 0 <= self.mu <= 1:
            raise ValueError(f"train.mu = {self.mu}: the target cost is a fraction of C_all, "
                             f"in [0, 1]")
        if not 0 <= self.budget_start <= 1 or self.budget_ramp < 0:
            raise ValueError("train.budget_start must lie in [0, 1] (a fraction of the "
                             "iterations) and train.budget_ramp be >= 0")

    @property
    def budget_weights(self) -> tuple[float, float]:
        """(λ2, μ) after overrides; (0, 0) for Dynamic-Raw and Network-Fix."""
        base = BUDGETS.get(self.budget)
        lambda2 = self.lambda2 if self.lambda2 is not None else (base.lambda2 if base else 0.0)
        mu = self.mu if self.mu is not None else (base.mu if base else 0.0)
        return lambda2, mu


def network_for_budget(model: NetworkConfig, budget: str) -> NetworkConfig:
    """The network a named budget trains: the small gate with a budget, fixed gates for
    Network-Fix, the model as configured for Dynamic-Raw."""
    if budget == "network-fix":
        return replace(model, gate="fixed", small_gate=False)
    if budget in BUDGETS and BUDGETS[budget].small_gate:
        return replace(model, small_gate=True)
    return model


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warm-up, then poly."""
    if step < config.warmup_iterations:
        alpha = step / config.warmup_iterations
        return config.warmup_factor * (1 - alpha) + alpha
    return max(0.0, 1 - step / config.iterations) ** config.poly_power


def build_optimizer(network: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with three groups: weights (decay), norms and biases (no decay), gates (lr × mult)."""
    gate_params = {id(p) for m in network.modules() if isinstance(m, SoftConditionalGate)
                   for p in m.parameters()}
    decay, no_decay, gates = [], [], []
    for module in network.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if id(param) in gate_params:
                gates.append(param)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": gates, "weight_decay": config.weight_decay,
         "lr_scale": config.gate_lr_multiplier},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    set_lr(optimizer, 0, config)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """Apply the schedule for `step`; returns the base lr in effect."""
    lr = config.lr * lr_factor(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip to total norm `max_norm`; returns the norm before clipping, a 0-d tensor on the
    gradients' device. Nothing here waits for the device: a non-finite norm (the step's
    gradients then become NaN) is the caller's to check where it reads its figures back
    (`check_finite`)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm).detach()


def check_finite(figures: dict[str, float], where: str) -> None:
    """Raise FloatingPointError naming the first non-finite figure: the training diverged."""
    bad = [k for k, v in figures.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"{', '.join(bad)} not finite {where}: the training diverged (lower train.lr or "
            f"train.grad_clip, or check the data); no checkpoint was written past it")


def steps_per_epoch(samples_per_rank: int, batch_size: int) -> int:
    """Full batches per epoch on one rank (the last partial batch is dropped)."""
    steps = samples_per_rank // batch_size
    if steps < 1:
        raise ValueError(f"{samples_per_rank} training samples per worker cannot fill a batch of "
                         f"{batch_size}; lower train.batch_size or add data")
    return steps


def epochs_for(iterations: int, per_epoch: int) -> int:
    return math.ceil(iterations / per_epoch)
