"""The naive decoder, the classifier and the optional PSP head (paper §3.1, docs/model.md §6).

Coarse to fine, fusion by sum, each conv 1×1 (no bias) + BN + ReLU:

    p = conv₃(f₃) ↑2;  p = conv₂(p + f₂) ↑2;  p = conv₁(p + f₁) ↑2;  p = conv₀(p + f₀)
    channels 8C→4C, 4C→2C, 2C→C, C→C, then [PSP] → 3×3 conv C→classes (+bias) → ↑4

A scale can be missing: absent from a static route (None), or absent for some samples of a batch
at inference (a `present` mask). A missing scale adds nothing; a level where neither the scale nor
anything coarser is present is skipped, as the reference decoder skips a dropped scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn, init_weights
from .routing_space import NUM_SCALES, channels


@dataclass
class Feature:
    """A batch of feature maps where only some samples may carry a value.

    `present` is None when every sample is present; absent samples hold zeros in `value`. It is
    plain Python on the host: reading it never waits for the device, and the bookkeeping runs no
    tensor operators (each costs microseconds of dispatch between a row's wait for its routes and
    its next kernels; at batch 1 they were 40% of the hard forward's operators).
    """

    value: torch.Tensor  # (B, C, h, w)
    present: tuple[bool, ...] | None = None  # (B,)

    def index(self) -> list[int] | None:
        """Batch indices of the present samples, None for all of them."""
        if self.present is None or all(self.present):
            return None
        return [i for i, p in enumerate(self.present) if p]

    @property
    def any(self) -> bool:
        return self.present is None or any(self.present)


def apply_to_present(block: nn.Module, feature: Feature) -> Feature:
    """Run `block` on the present samples only; absent ones stay zero (and absent)."""
    idx = feature.index()
    if idx is None:
        return Feature(block(feature.value), feature.present)
    idx = to_device(idx, feature.value.device)
    out = block(feature.value.index_select(0, idx))
    full = out.new_zeros((feature.value.shape[0], *out.shape[1:]))
    return Feature(full.index_copy(0, idx, out), feature.present)


def to_device(index: Sequence[int], device: torch.device) -> torch.Tensor:
    """Batch indices as an int64 tensor on `device`; to a GPU through pinned memory, so the copy
    is queued behind the kernels before it instead of waiting for them."""
    tensor = torch.tensor(index, dtype=torch.int64)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def merge(a: Feature | None, b: Feature | None) -> Feature | None:
    """Sum of two partial features; present where either is."""
    if a is None:
        return b
    if b is None:
        return a
    present = (None if a.present is None or b.present is None
               else tuple(x or y for x, y in zip(a.present, b.present, strict=True)))
    return Feature(a.value + b.value, present)


class PyramidPooling(nn.Module):
    """PSP module on the 1/4 output: avg-pool to each bin size, 1×1 conv C→C/4 + BN + ReLU,
    upsample back, concatenate with the input, 3×3 conv 2C→C + BN + ReLU."""

    def __init__(self, *, channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = max(1, channels // len(bins))
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn(channels, reduced)) for b in self.bins
        )
        self.fuse = nn.Sequential(
            *conv_bn(channels + reduced * len(self.bins), channels, kernel=3, padding=1))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
                  for branch in self.branches]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class Decoder(nn.Module):
    """Fuses the four last-row outputs into a (B, C₀, H/4, W/4) map."""

    def __init__(self, *, base_channels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(*conv_bn(channels(k, base_channels),
                                   channels(max(k - 1, 0), base_channels)))
            for k in range(NUM_SCALES)
        )
        init_weights(self)

    def forward(self, features: Sequence[Feature | None]) -> torch.Tensor:
        """(B, C₀, H/4, W/4); samples that nothing reached are zeros."""
        p: Feature | None = None
        for k in reversed(range(NUM_SCALES)):
            x = merge(p, features[k])
            if x is None or not x.any:
                p = None
                continue
            p = apply_to_present(self.levels[k], x)
            if k > 0:
                p = Feature(F.interpolate(p.value, scale_factor=2, mode="bilinear",
                                          align_corners=False), p.present)
        if p is None:
            k, finest = next((k, f) for k, f in enumerate(features) if f is not None)
            b, _, h, w = finest.value.shape  # input k is at 1/(4·2^k): scale back to 1/4
            return finest.value.new_zeros(b, self.levels[0][0].out_channels, h << k, w << k)
        return p.value


class SegmentationHead(nn.Module):
    """[PSP →] 3×3 conv C→classes with bias, then bilinear ×4."""

    def __init__(self, *, base_channels: int, num_classes: int, psp: bool = False) -> None:
        super().__init__()
        self.psp = PyramidPooling(channels=base_channels) if psp else None
        self.classifier = nn.Conv2d(base_channels, num_classes, 3, padding=1, bias=True)
        init_weights(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.psp is not None:
            x = self.psp(x)
        logits = self.classifier(x)  # (B, classes, H/4, W/4)
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
