"""Scale transforms between rows (paper §3.4, Eq. 4; model.md §5).

    keep   ReLU
    up     ReLU → 1×1 C→C/2 → BN → ReLU → bilinear ×2 (align_corners False)
    down   ReLU → 1×1 stride 2 C→2C → BN → ReLU

Every transform of a node starts with the same ReLU of the same H, so the node applies it once for
all its paths (node.py) and each transform holds a `SharedReLU` in its place: a no-op here that
the cost model counts as the ReLU it stands for.
"""

from __future__ import annotations

from torch import nn

from .layers import conv_bn, init_weights
from .routing_space import Direction


class SharedReLU(nn.Identity):
    """The leading ReLU of a transform, applied by its node once for all paths (counted per path
    by the cost model, as the paper's accounting does)."""


def build_transform(direction: Direction, channels: int) -> nn.Sequential:
    """The transform along `direction` of a cell output of `channels` channels, to be applied
    to ReLU(H) (see `SharedReLU`)."""
    if direction == "keep":
        block = nn.Sequential(SharedReLU())
    elif direction == "up":
        block = nn.Sequential(
            SharedReLU(), *conv_bn(channels, channels // 2),
            # last, so that the node scales by α before it (Node.add_scaled)
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )
    elif direction == "down":
        block = nn.Sequential(SharedReLU(), *conv_bn(channels, 2 * channels, stride=2))
    else:
        raise ValueError(f"unknown direction {direction!r}")
    init_weights(block)
    return block
