"""Scale transforms between rows (paper §3.4, Eq. 4; docs/model.md §5).

    keep   ReLU
    up     ReLU → 1×1 C→C/2 → BN → ReLU → bilinear ×2 (align_corners False)
    down   ReLU → 1×1 stride 2 C→2C → BN → ReLU

Every transform of a node starts with the same ReLU of the same H, so the node applies it once for
all its paths (node.py) and each transform holds a `SharedReLU` in its place: a no-op here that
the cost model counts as the ReLU it stands for.

The up transform also takes the path's α (`UpTransform`): bilinear ×2 is linear, so α·up(z) =
up(α·z), and scaling before the upsample multiplies a quarter as many elements.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_bn, init_weights
from .routing_space import Direction


class SharedReLU(nn.Identity):
    """The leading ReLU of a transform, applied by its node once for all paths (counted per path
    by the cost model, as the paper's accounting does)."""


class UpTransform(nn.Sequential):
    """ReLU → 1×1 C→C/2 → BN → ReLU → bilinear ×2, as a plain Sequential of those layers.

    `up(r, alpha)` with α of shape (n, 1, 1, 1) returns α·up(r), scaling the map before the
    upsample instead of after: equal, since the upsample is linear, and over a quarter of the
    elements (in the backward pass too, where the map kept for α's gradient is the small one).
    """

    def forward(self, r: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        *head, upsample = self
        z = r
        for layer in head:
            z = layer(z)  # (n, C/2, h, w)
        return upsample(z if alpha is None else alpha * z)  # (n, C/2, 2h, 2w)


def build_transform(direction: Direction, channels: int) -> nn.Sequential:
    """The transform along `direction` of a cell output of `channels` channels, to be applied
    to ReLU(H) (see `SharedReLU`)."""
    if direction == "keep":
        block = nn.Sequential(SharedReLU())
    elif direction == "up":
        block = UpTransform(
            SharedReLU(), *conv_bn(channels, channels // 2),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )
    elif direction == "down":
        block = nn.Sequential(SharedReLU(), *conv_bn(channels, 2 * channels, stride=2))
    else:
        raise ValueError(f"unknown direction {direction!r}")
    init_weights(block)
    return block
