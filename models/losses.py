"""Losses: segmentation cross-entropy and the budget constraint (paper Eq. 9–10; docs/model.md §7).

    L = λ1·L_seg + L_C,   L_C = λ2 · w(t) · (E / C_all − μ)²

E is the batch mean of the per-sample expected cost (as the reference computes it), C_all the
expected cost with every α = 1 at the training resolution, t = step / max_step. The schedule w(t)
is 0 until `start` (40% of training), then ramps linearly to 1 over `ramp` (2%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The label the shards mark ignore (platform/data/shards.py); models/ stands alone, so it keeps a
# copy (tests/test_layout.py holds the two equal).
IGNORE_INDEX = 255


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels; logits (B, K, H, W), targets (B, H, W)."""
    return F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class Budget:
    """A named budget of paper Table 4: λ2, μ and whether gates read ×0.25 inputs."""

    name: str
    lambda2: float
    mu: float
    small_gate: bool


BUDGETS: dict[str, Budget] = {
    "dynamic-a": Budget("dynamic-a", lambda2=0.8, mu=0.1, small_gate=True),
    "dynamic-b": Budget("dynamic-b", lambda2=0.5, mu=0.1, small_gate=True),
    "dynamic-c": Budget("dynamic-c", lambda2=0.5, mu=0.2, small_gate=True),
    "dynamic-raw": Budget("dynamic-raw", lambda2=0.0, mu=0.0, small_gate=False),
}


def budget(name: str) -> Budget:
    try:
        return BUDGETS[name]
    except KeyError:
        raise ValueError(f"unknown budget {name!r}; choose one of {sorted(BUDGETS)}") from None


@dataclass(frozen=True)
class BudgetSchedule:
    """w(t): 0 before `start`, then linear to 1 over `ramp` (fractions of training)."""

    start: float = 0.4
    ramp: float = 0.02

    def __call__(self, progress: float) -> float:
        if progress < self.start:
            return 0.0
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (progress - self.start) / self.ramp)


@dataclass(frozen=True)
class BudgetLoss:
    """L_C = λ2 · w(t) · (mean_b E_b / C_all − μ)².

    Args:
        lambda2: weight λ2 (0 disables the constraint).
        mu: target fraction μ of C_all.
        c_all: expected cost with every α = 1 at the training resolution
            (`CostModel.all_open_expected()`).
        schedule: w(t).
    """

    lambda2: float
    mu: float
    c_all: float
    schedule: BudgetSchedule = BudgetSchedule()

    def __post_init__(self) -> None:
        if self.c_all <= 0:
            raise ValueError(f"c_all={self.c_all}: the all-open expected cost must be positive")
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"mu={self.mu}: the budget fraction must lie in [0, 1]")

    def __call__(self, expected: torch.Tensor, progress: float) -> torch.Tensor:
        """expected: (B,) per-sample expected cost; progress: step / max_step."""
        return self.weight(progress) * self.penalty(expected)

    def weight(self, progress: float) -> float:
        """λ2 · w(t)."""
        return self.lambda2 * self.schedule(progress)

    def penalty(self, expected: torch.Tensor) -> torch.Tensor:
        """(mean_b E_b / C_all − μ)², a 0-d tensor: the loss without its weight (a step replayed
        as a CUDA graph multiplies it by a weight tensor, since w(t) changes every step)."""
        ratio = expected.mean() / self.c_all
        return (ratio - self.mu) ** 2
