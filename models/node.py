"""A node of the routing space: cell, gate and the scale transforms leaving it (paper Fig. 2).

Training-time forward (Eq. 4 with the all-closed residual of Eq. 6), per sample b:

    α = gate(X)                                  # (B, g)
    H = cell(X)
    m = 1[Σ_j α_j < 1e-4]
    Y_keep = m·X + α_keep·keep(H);   Y_up = α_up·up(H);   Y_down = α_down·down(H)

Everything is computed in training. The inference forward that really skips closed cells and
paths per sample lives in `network.py`, which owns the batch bookkeeping. Both apply the ReLU that
every transform starts with once per node (`transforms.SharedReLU`), asking the cell for ReLU(H)
(`cell(x, relu=True)`, which an inference copy can fuse into its last conv: `fusion.py`): two
passes over H fewer per node and, in training, ~10% fewer activations kept for the backward pass
(L=16, C₀=8, batch 2 of 256×256: 90.5 instead of 100.4 MiB).

Each Y_j is added straight into the input of the node it reaches, since that input is their sum
(Eq. 4), in as few passes over full-size maps as the maths allows: products with α and sums took
a fifth of a training step's kernel time on a GPU (benchmarks/gpu_profile.py). A product and a sum
are one pass (`layers.add_scaled`), and the up path scales by α before its bilinear ×2
(`transforms.UpTransform`). Counted from operator shapes for a training step (L=16, C₀=16, batch 2
of 256×256), the products, sums and upsamplings move 15% fewer bytes (674 instead of 793 MiB) and
the step keeps 7% fewer activations for the backward pass (161 instead of 174 MiB).
"""

from __future__ import annotations

import torch
from torch import nn

from .cell import Cell
from .gate import build_gate
from .layers import add_scaled
from .routing_space import INIT_ROW, Direction, NodeId, Path, channels
from .transforms import build_transform


def module_key(node: NodeId) -> str:
    """ModuleDict key of a node: `init` or `r{row}s{scale}`."""
    row, k = node
    return "init" if row == INIT_ROW else f"r{row}s{k}"


class Node(nn.Module):
    """Cell + gate + transforms of node (row, scale).

    Args:
        node: (row, scale); row -1 is the init cell (no drop path).
        paths: the paths leaving the node on the route, in gate column order.
        base_channels: C₀; the node has C₀·2^scale channels.
        cell: cell variant (see `cell.CELL_OPS`).
        gate: gate kind (see `gate.GATE_KINDS`).
        layers: L, for the drop path depth rate (l+1)/L.
    """

    def __init__(self, *, node: NodeId, paths: tuple[Path, ...], base_channels: int,
                 cell: str, gate: str, small_gate: bool, gate_bias: float, layers: int,
                 drop_path_prob: float, closed_threshold: float) -> None:
        super().__init__()
        row, scale = node
        c = channels(scale, base_channels)
        self.node = node
        self.paths = paths
        self.channels = c
        self.closed_threshold = closed_threshold
        depth_rate = 0.0 if row == INIT_ROW else (row + 1) / layers
        self.cell = Cell(channels=c, op=cell, depth_rate=depth_rate, drop_prob=drop_path_prob)
        self.gate = build_gate(gate, channels=c, num_paths=len(paths), small=small_gate,
                               bias_init=gate_bias)
        self.transforms = nn.ModuleDict({p.direction: build_transform(p.direction, c)
                                         for p in paths})

    def forward(self, x: torch.Tensor, received: dict[NodeId, torch.Tensor],
                progress: float = 0.0) -> torch.Tensor:
        """Soft forward (Eq. 4 and the residual of Eq. 6): adds each Y_j to `received[target_j]`
        (set when absent) and returns α (B, g)."""
        alpha = self.gate(x)  # (B, g)
        r = self.cell(x, progress, relu=True)  # (B, C, h, w): the ReLU(H) every transform reads
        closed = (alpha.sum(dim=1) < self.closed_threshold).to(x.dtype)  # (B,)
        columns = alpha.view(*alpha.shape, 1, 1, 1).unbind(1)  # g × (B, 1, 1, 1)
        for path, a in zip(self.paths, columns, strict=True):
            y = self.add_path(path.direction, r, a, received.get(path.target))
            if path.direction == "keep":
                y = add_scaled(y, closed.view(-1, 1, 1, 1), x)
            received[path.target] = y
        return alpha

    def add_path(self, direction: Direction, r: torch.Tensor, a: torch.Tensor,
                   into: torch.Tensor | None = None) -> torch.Tensor:
        """into + a·T(r): the path along `direction` applied to r = ReLU(H) (n, C, h, w), scaled
        per sample by a (n, 1, 1, 1) and added to `into` (its target's input so far) if given."""
        transform = self.transforms[direction]
        if direction == "up":
            y = transform(r, a)  # α applied before its upsample (UpTransform)
            return y if into is None else into + y
        return add_scaled(into, a, transform(r))
