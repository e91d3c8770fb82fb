"""The fixed stem that brings the image to 1/4 scale (paper §3.1, docs/model.md §1).

The paper says "three SepConv3×3"; the reference code's first layer is a dense 3×3 conv with
padding 0, which is what we build:

    conv 3×3 s2 p0 (3→C) → BN → ReLU
    dw 3×3 s1 → pw 1×1 → BN → ReLU
    dw 3×3 s2 → pw 1×1 → BN → ReLU          # (B, C, H/4, W/4) for H, W multiples of 4

Inputs are BGR images with the mean below subtracted (std 1), zero-padded to a multiple of 32.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_bn, init_weights, separable

# Inputs are zero-padded (after mean subtraction) to a multiple of the coarsest stride.
PAD_MULTIPLE = 32
# BGR order, 0–255 scale, as the reference implementation.
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)


def normalize_bgr(images: torch.Tensor) -> torch.Tensor:
    """Subtract the BGR pixel mean from (B, 3, H, W) or (3, H, W) 0–255 images."""
    mean = torch.tensor(PIXEL_MEAN_BGR, dtype=images.dtype, device=images.device)
    return images - mean.view(3, 1, 1)


class Stem(nn.Sequential):
    """3 → `channels` at 1/4 resolution."""

    def __init__(self, *, channels: int, in_channels: int = 3) -> None:
        super().__init__(
            *conv_bn(in_channels, channels, kernel=3, stride=2, padding=0),
            *separable(channels, channels, stride=1),
            *separable(channels, channels, stride=2),
        )
        init_weights(self)
