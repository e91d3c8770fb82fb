"""Primitive layers shared by the network's parts (docs/model.md §1, §3).

Every block is an `nn.Sequential` of primitives (conv, BN, ReLU, pooling, resizing) so that the
analytic cost model in `cost.py` can walk it layer by layer; nothing here reads a global config.
Norm comes before the activation everywhere, convolutions have no bias unless stated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(c_in: int, c_out: int, *, kernel: int = 1, stride: int = 1, padding: int = 0,
            groups: int = 1, relu: bool = True) -> list[nn.Module]:
    """conv (no bias) → BN → optional ReLU, as a list to splice into a Sequential."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU())
    return layers


def separable(c_in: int, c_out: int, *, stride: int = 1, relu: bool = True) -> list[nn.Module]:
    """Depthwise 3×3 → pointwise 1×1 → BN → optional ReLU (no norm between dw and pw)."""
    return [
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        *conv_bn(c_in, c_out, relu=relu),
    ]


class Resize(nn.Module):
    """Bilinear resize by a constant factor (the "small gate" reads its input at ×0.25).

    The output side is max(1, floor(side·factor)), so tiny test inputs never reach size 0.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, int(height * self.factor)), max(1, int(width * self.factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size(x.shape[-2], x.shape[-1])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def init_weights(module: nn.Module) -> None:
    """He-normal (fan_in) for every conv, BN weight 1 / bias 0, conv biases 0 (docs/model.md §1).

    Blocks that need another bias (the gate's 1.5) set it after calling this.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _AddScaled(torch.autograd.Function):
    """into + a·t as one pass (addcmul), with the backward of the plain formula.

    torch's own addcmul backward multiplies t by its `value` before the gradient of `a`: one
    more pass over a full-size map than `into + a * t`, which would cancel the pass it saves.
    """

    @staticmethod
    def forward(ctx, into: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, t)
        return torch.addcmul(into, a, t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        a, t = ctx.saved_tensors
        need_into, need_a, need_t = ctx.needs_input_grad
        return (grad if need_into else None,
                (grad * t).sum_to_size(a.shape) if need_a else None,
                grad * a if need_t else None)


def add_scaled(into: torch.Tensor | None, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """into + a·t (a broadcast over t, e.g. per sample (B, 1, 1, 1)); a·t when `into` is None.

    One pass over the maps instead of two (the product, then the sum); `into` must have the
    shape of the result.
    """
    if into is None:
        return a * t
    if torch.is_grad_enabled() and (into.requires_grad or a.requires_grad or t.requires_grad):
        return _AddScaled.apply(into, a, t)
    return torch.addcmul(into, a, t)  # nothing to differentiate: skip the Function's overhead
