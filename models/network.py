"""The dynamic routing network (paper §3, Fig. 2; docs/model.md §1–§6).

    images (B, 3, H, W), BGR mean-subtracted
      → zero-pad to a multiple of 32 → stem (1/4) → init cell → L rows of nodes → decoder → head
      → logits (B, classes, H, W), cropped back to the input size

Two forwards share the same modules:
- *soft* (training, Eq. 4): every node computes its cell and every path, scaled by α.
- *hard* (inference, Eq. 5–6): per sample, a node whose paths are all closed (α ≤ threshold) is
  skipped (its input passes on by keep), a closed path is not computed, and a node that no open
  path reaches is absent (its gate is not evaluated; it passes nothing on). Samples of one batch
  may take different routes: each node runs its cell on the samples that need it and each path on
  the samples that opened it, so the result equals running every sample alone.

A `Route` restricts the network to a subset of the routing space; with `gate="fixed"` that is a
static network that contains only the route's cells and paths (docs/model.md §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cost import CostModel, build_cost_model
from .decoder import Decoder, Feature, SegmentationHead, to_device
from .node import Node, module_key
from .routes import Route
from .routing_space import INIT_ROW, NUM_SCALES, NodeId
from .stem import PAD_MULTIPLE, Stem


@dataclass
class RoutingOutput:
    """What a forward returns.

    logits: (B, classes, H, W) at the input size.
    gates: per node on the route (init cell included), α of shape (B, g) in the order of
        `route.paths_of(node)`; at inference, zeros for samples the node was absent for.
    """

    logits: torch.Tensor
    gates: dict[NodeId, torch.Tensor]


class DynamicRoutingNetwork(nn.Module):
    """Stem, routing space (or a route of it), decoder and head.

    Args:
        route: the cells and paths that exist; `Route.full(L)` for the whole space.
        num_classes: output classes (19 for Cityscapes, 21 for VOC).
        base_channels: C₀ (64 in the paper); scale k has C₀·2^k channels.
        cell: cell variant, see `cell.CELL_OPS`.
        gate: gate kind, see `gate.GATE_KINDS`; "fixed" makes the network static.
        small_gate: gates read their input at ×0.25 (used with a budget).
        gate_bias: initial gate bias β.
        closed_threshold: a path is closed when α ≤ this (1e-4).
        drop_path_prob: scheduled drop path probability (0 = off).
        psp: add a pyramid pooling module before the classifier.
    """

    def __init__(self, *, route: Route, num_classes: int = 19, base_channels: int = 64,
                 cell: str = "sep2", gate: str = "tanh", small_gate: bool = False,
                 gate_bias: float = 1.5, closed_threshold: float = 1e-4,
                 drop_path_prob: float = 0.0, psp: bool = False) -> None:
        super().__init__()
        if base_channels < 2:
            raise ValueError(f"base_channels={base_channels}: need at least 2")
        self.route = route
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.closed_threshold = closed_threshold
        self.stem = Stem(channels=base_channels)
        self.nodes = nn.ModuleDict({
            module_key(node): Node(
                node=node, paths=route.paths_of(node), base_channels=base_channels, cell=cell,
                gate=gate, small_gate=small_gate, gate_bias=gate_bias, layers=route.layers,
                drop_path_prob=drop_path_prob, closed_threshold=closed_threshold)
            for node in sorted(route.cells)
        })
        self.decoder = Decoder(base_channels=base_channels)
        self.head = SegmentationHead(base_channels=base_channels, num_classes=num_classes,
                                     psp=psp)
        self._cost_models: dict[tuple[int, int], CostModel] = {}

    @property
    def layers(self) -> int:
        return self.route.layers

    def node(self, node: NodeId) -> Node:
        return self.nodes[module_key(node)]

    def rows(self) -> list[list[Node]]:
        """Nodes of the route row by row (init cell first), finest scale first."""
        return [[self.node((row, k)) for k in range(NUM_SCALES) if (row, k) in self.route.cells]
                for row in range(INIT_ROW, self.layers)]

    # -- cost --------------------------------------------------------------------------------
    def cost_model(self, height: int, width: int) -> CostModel:
        """Analytic cost tables at a declared input resolution (cached)."""
        key = (height, width)
        if key not in self._cost_models:
            self._cost_models[key] = build_cost_model(self, height, width)
        return self._cost_models[key]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, progress: float = 0.0,
                skip: bool | None = None) -> RoutingOutput:
        """Segment a batch.

        Args:
            images: (B, 3, H, W) BGR, mean subtracted (see `stem.normalize_bgr`).
            progress: step / max_step, for scheduled drop path (training only).
            skip: use the hard inference forward; defaults to `not self.training`.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, _pad_to(width), 0, _pad_to(height)))  # zeros after the mean
        x = self.stem(padded)  # (B, C₀, H'/4, W'/4)
        skip = (not self.training) if skip is None else skip
        route = self._route_hard if skip else self._route_soft
        features, gates = route(x, progress)
        p = self.decoder(features)  # (B, C₀, H'/4, W'/4)
        logits = self.head(p)[..., :height, :width]
        return RoutingOutput(logits=logits, gates=gates)

    def _decoder_inputs(self, inputs: dict[NodeId, Feature]) -> list[Feature | None]:
        return [inputs.get((self.layers, k)) for k in range(NUM_SCALES)]

    def _route_soft(self, x: torch.Tensor, progress: float
                    ) -> tuple[list[Feature | None], dict[NodeId, torch.Tensor]]:
        inputs: dict[NodeId, torch.Tensor] = {(INIT_ROW, 0): x}
        gates: dict[NodeId, torch.Tensor] = {}
        for row in self.rows():
            received: dict[NodeId, torch.Tensor] = {}
            for node in row:
                gates[node.node] = node(inputs[node.node], received, progress)
            inputs = received
        features = {node: Feature(value) for node, value in inputs.items()}
        return self._decoder_inputs(features), gates

    def _route_hard(self, x: torch.Tensor, progress: float
                    ) -> tuple[list[Feature | None], dict[NodeId, torch.Tensor]]:
        """Per-sample routing, row by row: the gates of a whole row are evaluated first and
        their open/closed decisions reach the host in one transfer, the row's only wait on the
        device (L + 1 waits per forward instead of one or more per node). Which samples are
        present where is bookkept on the host in plain Python, so it costs no further waits and no
        tensor operators."""
        batch = x.shape[0]
        inputs: dict[NodeId, Feature] = {(INIT_ROW, 0): Feature(x)}
        gates: dict[NodeId, torch.Tensor] = {}
        for row in self.rows():
            received: dict[NodeId, Feature] = {}
            # (node, batch indices of its present samples or None, the same on the device, its
            # input, α)
            work = []
            for node in row:
                feature = inputs.get(node.node)
                if feature is None or not feature.any:
                    gates[node.node] = x.new_zeros(batch, len(node.paths))
                    continue
                idx = feature.index()
                where = None if idx is None else to_device(idx, x.device)
                value = feature.value if where is None else feature.value.index_select(0, where)
                work.append((node, idx, where, value, node.gate(value)))
            if work:
                opened = torch.cat([(alpha > self.closed_threshold).flatten()
                                    for *_, alpha in work]).tolist()  # the row's one wait
                start = 0
                for node, idx, where, value, alpha in work:
                    n, g = alpha.shape
                    open_ = [opened[start + i * g:start + (i + 1) * g] for i in range(n)]
                    start += n * g
                    _node_hard(node, idx, value, alpha, open_, received, batch)
                    gates[node.node] = alpha if where is None else alpha.new_zeros(
                        batch, g).index_copy(0, where, alpha)
            inputs = received
        return self._decoder_inputs(inputs), gates


def _node_hard(node: Node, idx: list[int] | None, x: torch.Tensor, alpha: torch.Tensor,
               open_: list[list[bool]], received: dict[NodeId, Feature], batch: int) -> None:
    """Run one node on its present samples; deposit its outputs in `received`.

    idx: batch indices of the rows of `x`, None when they are the whole batch in order;
    alpha (n, g): the node's gates; open_[i][j]: whether row i opened path j.
    """
    act = [i for i, row in enumerate(open_) if any(row)]
    if len(act) < len(open_) and "keep" in node.transforms:
        # A node with every path closed passes its input on unchanged (Eq. 5–6).
        rest = [i for i, row in enumerate(open_) if not any(row)]
        keep = next(p for p in node.paths if p.direction == "keep")
        _deposit(received, keep.target, _take(x, rest, x.shape[0]), _select(idx, rest), batch)
    if not act:
        return
    r = node.cell(_take(x, act, x.shape[0]), relu=True)  # (n_active, C, h, w): ReLU(H), shared
    a = _take(alpha, act, x.shape[0])  # (n, g)
    columns = a.view(*a.shape, 1, 1, 1).unbind(1)  # g × (n, 1, 1, 1)
    for j, path in enumerate(node.paths):
        sel = [k for k, i in enumerate(act) if open_[i][j]]
        if not sel:
            continue
        r_j = _take(r, sel, len(act))
        a_j = _take(columns[j], sel, len(act))  # (n_j, 1, 1, 1)
        rows = _select(idx, [act[k] for k in sel])
        if len(rows) == batch:  # every sample, in order: sum fused into the path's last pass
            prev = received.get(path.target)
            received[path.target] = Feature(node.add_path(
                path.direction, r_j, a_j, None if prev is None else prev.value))
        else:
            _deposit(received, path.target, node.add_path(path.direction, r_j, a_j), rows,
                     batch)


def _pad_to(size: int) -> int:
    return math.ceil(size / PAD_MULTIPLE) * PAD_MULTIPLE - size


def _take(t: torch.Tensor, rows: list[int], total: int) -> torch.Tensor:
    """t[rows] (`rows` ascending) without a copy when `rows` is every row."""
    if len(rows) == total:
        return t
    return t.index_select(0, to_device(rows, t.device))


def _select(idx: list[int] | None, rows: list[int]) -> list[int]:
    """Batch indices of local rows `rows` given the batch indices `idx` of the local samples."""
    return rows if idx is None else [idx[r] for r in rows]


def _deposit(received: dict[NodeId, Feature], target: NodeId, value: torch.Tensor,
             batch_idx: list[int], batch: int) -> None:
    """Add `value` (rows for the samples `batch_idx`) to the input of `target`."""
    prev = received.get(target)
    if len(batch_idx) == batch:  # every sample, in order: plain sum, every sample present
        received[target] = Feature(value if prev is None else prev.value + value)
        return
    base = value.new_zeros(batch, *value.shape[1:]) if prev is None else prev.value
    present = None
    if prev is None or prev.present is not None:
        flags = [False] * batch if prev is None else list(prev.present)
        for i in batch_idx:
            flags[i] = True
        present = tuple(flags)
    received[target] = Feature(base.index_add(0, to_device(batch_idx, value.device), value),
                               present)

