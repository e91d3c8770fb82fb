"""The routing space of the dynamic routing network (paper §3.1, Fig. 2; docs/model.md §2).

Pure geometry, no tensors: which nodes exist, which scale-transform paths leave each node, and
which paths arrive at each node. Everything else (modules, cost, routes) is built from this.

Scale index k = 0..3 stands for 1/4, 1/8, 1/16 and 1/32 of the input. Row -1 is the *init cell*
at 1/4 between the stem and the L rows; rows 0..L-1 hold the routing cells. Row sizes are
[2, 3, 4] + [4]·(L-3): a new coarsest node appears one row after its parent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NUM_SCALES = 4
INIT_ROW = -1
MIN_LAYERS = 4

Direction = Literal["keep", "up", "down"]
# Column order of a gate's outputs: keep, then up (if any), then down last.
DIRECTIONS: tuple[Direction, ...] = ("keep", "up", "down")
_SCALE_STEP: dict[str, int] = {"keep": 0, "up": -1, "down": 1}

NodeId = tuple[int, int]  # (row, scale)


@dataclass(frozen=True, order=True)
class Path:
    """A scale-transform path leaving node (row, scale) in `direction`."""

    row: int
    scale: int
    direction: Direction

    @property
    def source(self) -> NodeId:
        return (self.row, self.scale)

    @property
    def target(self) -> NodeId:
        """Receiving node; for a last-row keep path this is (L, k), the decoder's input k."""
        return (self.row + 1, self.scale + _SCALE_STEP[self.direction])

    def __str__(self) -> str:
        return f"{self.row}:{self.scale}:{self.direction}"

    @classmethod
    def parse(cls, text: str) -> Path:
        """Parse the `row:scale:direction` form written by `str(path)`."""
        parts = text.split(":")
        if len(parts) != 3 or parts[2] not in DIRECTIONS:
            raise ValueError(f"path {text!r} is not of the form 'row:scale:keep|up|down'")
        try:
            row, scale = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"path {text!r}: row and scale must be integers") from None
        return cls(row, scale, parts[2])  # type: ignore[arg-type]


@dataclass(frozen=True)
class RoutingSpace:
    """The lattice of L rows (plus the init cell) and the paths between them.

    Args:
        layers: number of rows L (16 and 33 in the paper); at least 4.
    """

    layers: int

    def __post_init__(self) -> None:
        if self.layers < MIN_LAYERS:
            raise ValueError(f"layers={self.layers}: the routing space needs at least "
                             f"{MIN_LAYERS} rows so that every scale is reached")

    # -- nodes -------------------------------------------------------------------------------
    def scales(self, row: int) -> range:
        """Scales present in `row`: {0} for the init cell, then {0,1}, {0..2}, {0..3}, ..."""
        if row == INIT_ROW:
            return range(1)
        if not 0 <= row < self.layers:
            raise ValueError(f"row {row} is outside the routing space (0..{self.layers - 1})")
        return range(min(row + 2, NUM_SCALES))

    def has_node(self, node: NodeId) -> bool:
        row, scale = node
        return INIT_ROW <= row < self.layers and scale in self.scales(row)

    def nodes(self, *, include_init: bool = False) -> list[NodeId]:
        """All nodes row by row, finest scale first."""
        first = INIT_ROW if include_init else 0
        return [(row, k) for row in range(first, self.layers) for k in self.scales(row)]

    @property
    def last_row(self) -> int:
        return self.layers - 1

    # -- paths -------------------------------------------------------------------------------
    def paths_of(self, node: NodeId) -> tuple[Path, ...]:
        """Paths leaving `node`, in gate column order (keep, up, down).

        The init cell has keep and down; last-row cells have keep only (to the decoder).
        """
        row, k = node
        if not self.has_node(node):
            raise ValueError(f"node {node} is not in a routing space of {self.layers} rows")
        last = row == self.last_row
        out = [Path(row, k, "keep")]
        if row != INIT_ROW and k > 0 and not last:
            out.append(Path(row, k, "up"))
        if k < NUM_SCALES - 1 and not last:
            out.append(Path(row, k, "down"))
        return tuple(out)

    def paths(self) -> list[Path]:
        """Every path of the space, from the init cell's through the last row's."""
        return [p for node in self.nodes(include_init=True) for p in self.paths_of(node)]

    def incoming(self, node: NodeId) -> tuple[Path, ...]:
        """Paths arriving at `node` (row >= 0), in the order down, keep, up of the senders."""
        row, k = node
        if row < 0 or not self.has_node(node):
            raise ValueError(f"node {node} has no inputs in a space of {self.layers} rows")
        senders = ((k - 1, "down"), (k, "keep"), (k + 1, "up"))
        prev = row - 1
        return tuple(
            Path(prev, ks, d)  # type: ignore[arg-type]
            for ks, d in senders
            if self.has_node((prev, ks)) and Path(prev, ks, d) in self.paths_of((prev, ks))
        )


def channels(scale: int, base_channels: int) -> int:
    """Channels at `scale`: C_k = base·2^k (64, 128, 256, 512 in the paper)."""
    return base_channels * 2**scale
