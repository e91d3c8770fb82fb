"""Scale transforms between rows (paper §3.4, Eq. 4; model.md §5).

    keep   ReLU
    up     ReLU → 1×1 C→C/2 → BN → ReLU → bilinear ×2 (align_corners False)
    down   ReLU → 1×1 stride 2 C→2C → BN → ReLU
"""

from __future__ import annotations

from torch import nn

from .layers import conv_bn, init_weights
from .routing_space import Direction


def build_transform(direction: Direction, channels: int) -> nn.Sequential:
    """The transform applied to a cell output H of `channels` channels along `direction`."""
    if direction == "keep":
        block = nn.Sequential(nn.ReLU())
    elif direction == "up":
        block = nn.Sequential(
            nn.ReLU(), *conv_bn(channels, channels // 2),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )
    elif direction == "down":
        block = nn.Sequential(nn.ReLU(), *conv_bn(channels, 2 * channels, stride=2))
    else:
        raise ValueError(f"unknown direction {direction!r}")
    init_weights(block)
    return block
