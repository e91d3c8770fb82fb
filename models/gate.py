"""The soft conditional gate (paper Eq. 2–3, §4.4.2; docs/model.md §4).

It reads the aggregated input X of a node (not the cell output H):

    [×0.25 bilinear if small] → 1×1 C→C/2 → BN → ReLU → global avg pool → 1×1 C/2→g (+bias 1.5)
    α = δ(·), shape (B, g): one factor per path of the node, per sample.

Activations δ: `tanh` = max(0, tanh) (default, exact zeros close paths), `sigmoid`, `softmax` over
the g paths. A path counts as closed when α ≤ threshold (1e-4 by default); sigmoid and softmax
reach that only for strongly negative logits, so they rarely close paths. `fixed` is no gate at
all: α ≡ 1 and no parameters ("Network-Fix" and static routes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Resize, conv_bn, init_weights

GATE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda g: F.relu(torch.tanh(g)),
    "sigmoid": torch.sigmoid,
    "softmax": lambda g: torch.softmax(g, dim=1),
}
GATE_KINDS = (*GATE_ACTIVATIONS, "fixed")
SMALL_GATE_FACTOR = 0.25


class SoftConditionalGate(nn.Module):
    """α = δ(conv(GAP(ReLU(BN(conv(X))))) + β), per sample.

    Args:
        channels: C of the node's input.
        num_paths: g, the number of paths leaving the node.
        activation: one of GATE_ACTIVATIONS.
        small: read X resized by ×0.25 (used with a budget).
        bias_init: initial β (1.5: every path starts open).
    """

    def __init__(self, *, channels: int, num_paths: int, activation: str = "tanh",
                 small: bool = False, bias_init: float = 1.5) -> None:
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"unknown gate {activation!r}; choose one of {list(GATE_KINDS)}")
        hidden = max(1, channels // 2)
        resize: list[nn.Module] = [Resize(SMALL_GATE_FACTOR)] if small else []
        self.features = nn.Sequential(
            *resize,
            *conv_bn(channels, hidden),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(hidden, num_paths, 1, bias=True),
        )
        self.activation = activation
        self.num_paths = num_paths
        init_weights(self)
        nn.init.constant_(self.features[-1].bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.features(x).flatten(1)  # (B, g)
        return GATE_ACTIVATIONS[self.activation](logits)


class FixedGate(nn.Module):
    """α ≡ 1 for every path: a static node without gate parameters or cost."""

    def __init__(self, *, num_paths: int) -> None:
        super().__init__()
        self.num_paths = num_paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], self.num_paths)  # (B, g)


def build_gate(kind: str, *, channels: int, num_paths: int, small: bool = False,
               bias_init: float = 1.5) -> nn.Module:
    if kind == "fixed":
        return FixedGate(num_paths=num_paths)
    return SoftConditionalGate(channels=channels, num_paths=num_paths, activation=kind,
                               small=small, bias_init=bias_init)


def pin_gate(gate: nn.Module, opened: list[bool] | tuple[bool, ...], *,
             strength: float = 10.0) -> None:
    """Make a soft gate input-independent: path j open (α≈1) or closed (α≈0) as `opened[j]`.

    For analysis and benchmarks (forcing a route through the real gates); ±10 closes a path
    under every activation at the default 1e-4 threshold.
    """
    if not isinstance(gate, SoftConditionalGate):
        raise TypeError("only a soft gate can be pinned; a fixed gate is always open")
    if len(opened) != gate.num_paths:
        raise ValueError(f"gate has {gate.num_paths} paths, got {len(opened)} decisions")
    final = gate.features[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.copy_(torch.tensor([strength if o else -strength for o in opened]))
