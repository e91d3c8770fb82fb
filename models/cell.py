"""The cell of a routing node: H = SepBlock(X) + X (paper Eq. 1, docs/model.md §3).

The identity branch has no parameters (C_in = C_out). The SepBlock has variants for the paper's
cell ablation (Table 2), all built as flat Sequentials:

    sep1        dw → pw → BN
    sep2        dw → pw → BN → ReLU, dw → pw → BN                 (default)
    sep3        two units ending BN → ReLU, then one ending BN
    mbconv      1×1 C→4C, BN, ReLU; dw 3×3, BN, ReLU; 1×1 4C→C, BN
    bottleneck  1×1 C→C/4, BN, ReLU; 3×3, BN, ReLU; 1×1 C/4→C, BN

Scheduled drop path (optional) drops the SepBlock branch per sample, never the identity:
keep prob p = 1 − drop_prob·((l+1)/L)·(step/max_step), kept samples scaled by 1/p, off at eval.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn, init_weights, separable


def _sep(units: int) -> Callable[[int], list[nn.Module]]:
    def build(c: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for i in range(units):
            layers += separable(c, c, relu=i < units - 1)
        return layers
    return build


def _mbconv(c: int) -> list[nn.Module]:
    return [*conv_bn(c, 4 * c), *conv_bn(4 * c, 4 * c, kernel=3, padding=1, groups=4 * c),
            *conv_bn(4 * c, c, relu=False)]


def _bottleneck(c: int) -> list[nn.Module]:
    mid = max(1, c // 4)
    return [*conv_bn(c, mid), *conv_bn(mid, mid, kernel=3, padding=1), *conv_bn(mid, c, relu=False)]


CELL_OPS: dict[str, Callable[[int], list[nn.Module]]] = {
    "sep1": _sep(1),
    "sep2": _sep(2),
    "sep3": _sep(3),
    "mbconv": _mbconv,
    "bottleneck": _bottleneck,
}


def drop_path(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """Zero whole samples with probability 1 − keep_prob and scale the kept ones by 1/keep_prob."""
    if keep_prob >= 1.0:
        return x
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    mask.bernoulli_(keep_prob)
    return x * mask / keep_prob


class Cell(nn.Module):
    """H = op(X) + X with optional scheduled drop path on op(X).

    Args:
        channels: C of the node (input = output).
        op: one of CELL_OPS.
        depth_rate: (l+1)/L of the cell's row; 0 disables drop path (the init cell).
        drop_prob: the drop path probability at the last row and the end of training.
    """

    def __init__(self, *, channels: int, op: str = "sep2", depth_rate: float = 0.0,
                 drop_prob: float = 0.0) -> None:
        super().__init__()
        if op not in CELL_OPS:
            raise ValueError(f"unknown cell {op!r}; choose one of {sorted(CELL_OPS)}")
        self.op = nn.Sequential(*CELL_OPS[op](channels))
        self.depth_rate = depth_rate
        self.drop_prob = drop_prob
        init_weights(self)

    def keep_prob(self, progress: float) -> float:
        """p = 1 − drop_prob·((l+1)/L)·(step/max_step)."""
        return 1.0 - self.drop_prob * self.depth_rate * progress

    def forward(self, x: torch.Tensor, progress: float = 0.0, *,
                relu: bool = False) -> torch.Tensor:
        """H = op(X) + X (B, C, h, w); ReLU(H) when `relu` (what every transform of the node reads,
        so an inference copy can fuse the sum and the ReLU into its last conv: fusion.py)."""
        branch = self.op(x)  # (B, C, h, w)
        if self.training and self.drop_prob > 0:
            branch = drop_path(branch, self.keep_prob(progress))
        h = branch + x
        return F.relu(h) if relu else h
