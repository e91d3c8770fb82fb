"""Cost accounting: expected and real FLOPs at a declared resolution (Eq. 7–8; docs/model.md §7).

FLOPs are the paper's "Multi-Adds", computed analytically by walking the network's own modules at
a *declared* input size (1024×2048 for Cityscapes tables, 512×512 for VOC), whatever tensor is fed:

    conv   k_h·k_w·(C_in/groups)·C_out·H_out·W_out  (+ C_out·H_out·W_out with a bias)
    BN     2 per output element;   ReLU 1 per element;   global/adaptive pooling 1 per input element
    a folded conv → BN (fusion.py, inference) is counted as the conv and the BN it replaced
    not counted: interpolation, sums, products with α, the init cell

Transitions are counted once, in the cell that receives them (as the reference does): the init
cell's outgoing paths count, the last row's keep paths into the decoder do not.

    expected(b) = Σ_cells max_j α_j(b)·C(cell) + Σ_paths α_path(b)·C(transform)    (differentiable)
    real(b)     = stem + decoder + head
                  + Σ_cells [C(gate) + 1[any α > t]·C(cell)] + Σ_paths 1[α > t]·C(transform)

The gate cost is paid even by a skipped cell (its gate ran, or would have, to decide).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from .decoder import PyramidPooling
from .fusion import FoldedConv2d, FusedConvReLU
from .gate import FixedGate, SoftConditionalGate
from .layers import Resize
from .routing_space import INIT_ROW, NUM_SCALES, NodeId, channels
from .stem import PAD_MULTIPLE
from .transforms import SharedReLU

if TYPE_CHECKING:
    from .network import DynamicRoutingNetwork

Shape = tuple[int, int, int]  # (C, h, w)


@dataclass(frozen=True)
class Flops:
    """Multi-adds of a part, by kind of operation."""

    conv: int = 0
    bias: int = 0
    norm: int = 0
    act: int = 0
    pool: int = 0

    @property
    def total(self) -> int:
        return self.conv + self.bias + self.norm + self.act + self.pool

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def count_flops(module: nn.Module, shape: Shape) -> tuple[Flops, Shape]:
    """Multi-adds of `module` on an input of `shape`, and its output shape.

    Raises TypeError for a module the cost model does not know, so a new layer cannot slip in
    uncounted.
    """
    c, h, w = shape
    if isinstance(module, nn.Sequential):
        total = Flops()
        for child in module:
            flops, shape = count_flops(child, shape)
            total += flops
        return total, shape
    if isinstance(module, nn.Conv2d):
        (kh, kw), (sh, sw) = module.kernel_size, module.stride
        (ph, pw), (dh, dw) = module.padding, module.dilation  # type: ignore[misc]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = module.out_channels
        conv = kh * kw * (module.in_channels // module.groups) * out * ho * wo
        if isinstance(module, FusedConvReLU):  # counted as the conv → BN → ReLU it replaces
            return Flops(conv=conv, norm=2 * out * ho * wo, act=out * ho * wo), (out, ho, wo)
        if isinstance(module, FoldedConv2d):  # counted as the conv → BN it replaces
            return Flops(conv=conv, norm=2 * out * ho * wo), (out, ho, wo)
        bias = out * ho * wo if module.bias is not None else 0
        return Flops(conv=conv, bias=bias), (out, ho, wo)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return Flops(norm=2 * c * h * w), shape
    if isinstance(module, nn.ReLU):
        return Flops(act=c * h * w), shape
    if isinstance(module, nn.AdaptiveAvgPool2d):
        oh, ow = _pair(module.output_size)
        return Flops(pool=c * h * w), (c, oh, ow)
    if isinstance(module, nn.Upsample):
        sf = module.scale_factor
        sf_h, sf_w = (sf, sf) if not isinstance(sf, tuple) else sf
        return Flops(), (c, int(h * sf_h), int(w * sf_w))
    if isinstance(module, Resize):
        return Flops(), (c, *module.output_size(h, w))
    if isinstance(module, PyramidPooling):
        total = Flops()
        for branch in module.branches:
            flops, (cb, _, _) = count_flops(branch, shape)
            total += flops
            c += cb
        flops, shape = count_flops(module.fuse, (c, h, w))
        return total + flops, shape
    if isinstance(module, SoftConditionalGate):
        return count_flops(module.features, shape)
    if isinstance(module, SharedReLU):  # applied once by the node, counted per path
        return Flops(act=c * h * w), shape
    if isinstance(module, (nn.Identity, FixedGate)):
        return Flops(), shape
    raise TypeError(f"the cost model does not know {type(module).__name__}; add it to "
                    f"models/cost.py:count_flops")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


@dataclass(frozen=True)
class NodeCost:
    """Costs of one node: its cell, its gate and the transform of each of its paths.

    `paths` follows the gate column order; `counted[j]` is False for a path into the decoder.
    """

    cell: Flops
    gate: Flops
    paths: tuple[Flops, ...]
    counted: tuple[bool, ...]


@dataclass(frozen=True)
class CostModel:
    """Cost tables of one network at one declared resolution, and the per-sample costs."""

    height: int
    width: int
    threshold: float
    stem: Flops
    nodes: Mapping[NodeId, NodeCost]  # the init cell included
    decoder_levels: tuple[Flops, ...]  # per scale; zero for a level the route never feeds
    head: Flops
    _vectors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def decoder(self) -> Flops:
        return sum(self.decoder_levels, Flops())

    @property
    def fixed(self) -> Flops:
        """Paid by every image: stem, decoder and head."""
        return self.stem + self.decoder + self.head

    def _path_costs(self, node: NodeId, like: torch.Tensor) -> torch.Tensor:
        key = (node, like.dtype, like.device)
        if key not in self._vectors:
            cost = self.nodes[node]
            self._vectors[key] = torch.tensor(
                [p.total if counted else 0 for p, counted in zip(cost.paths, cost.counted,
                                                                  strict=True)],
                dtype=like.dtype, device=like.device)
        return self._vectors[key]

    def expected(self, gates: Mapping[NodeId, torch.Tensor]) -> torch.Tensor:
        """Expected cost per sample (B,), differentiable in α (Eq. 7–8)."""
        total: torch.Tensor | None = None
        for node, alpha in gates.items():
            term = alpha @ self._path_costs(node, alpha)  # (B,)
            if node[0] != INIT_ROW:
                term = term + alpha.max(dim=1).values * self.nodes[node].cell.total
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no gates given")
        return total

    def real(self, gates: Mapping[NodeId, torch.Tensor], *, routing_only: bool = False
             ) -> torch.Tensor:
        """FLOPs each sample really costs at inference (B,), float64.

        routing_only: count cells and transitions only (what `expected` counts), without stem,
        decoder, head and gates.
        """
        total: torch.Tensor | None = None
        for node, alpha in gates.items():
            opened = (alpha.detach() > self.threshold).to(torch.float64)  # (B, g)
            term = opened @ self._path_costs(node, opened)
            if node[0] != INIT_ROW:
                cost = self.nodes[node]
                term = term + opened.amax(dim=1) * cost.cell.total
                if not routing_only:
                    term = term + cost.gate.total
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no gates given")
        return total if routing_only else total + self.fixed.total

    def all_open(self) -> dict[str, Flops]:
        """Breakdown by part with every cell and path of the route open."""
        parts = {"stem": self.stem, "init_cell": Flops(), "cells": Flops(), "gates": Flops(),
                 "transforms": Flops(), "decoder": self.decoder, "head": self.head}
        for node, cost in self.nodes.items():
            paths = sum((p for p, c in zip(cost.paths, cost.counted, strict=True) if c), Flops())
            if node[0] == INIT_ROW:
                parts["init_cell"] = cost.cell + cost.gate
            else:
                parts["cells"] += cost.cell
                parts["gates"] += cost.gate
            parts["transforms"] += paths
        return parts

    def all_open_real(self) -> int:
        """Real FLOPs of one image with every path of the route open."""
        return sum(f.total for name, f in self.all_open().items() if name != "init_cell")

    def all_open_expected(self) -> int:
        """C_all of the budget loss: the expected cost with every α = 1."""
        parts = self.all_open()
        return parts["cells"].total + parts["transforms"].total


def build_cost_model(network: DynamicRoutingNetwork, height: int, width: int) -> CostModel:
    """Walk `network`'s modules at a declared (height, width), padded as the forward pads it."""
    if height < 1 or width < 1:
        raise ValueError(f"declared resolution {height}x{width} must be positive")
    ph = math.ceil(height / PAD_MULTIPLE) * PAD_MULTIPLE
    pw = math.ceil(width / PAD_MULTIPLE) * PAD_MULTIPLE
    stem, (c0, h0, w0) = count_flops(network.stem, (3, ph, pw))
    base = network.base_channels

    def shape(scale: int) -> Shape:
        return channels(scale, base), h0 >> scale, w0 >> scale

    nodes: dict[NodeId, NodeCost] = {}
    for node in network.route.cells:
        module = network.node(node)
        s = shape(node[1])
        nodes[node] = NodeCost(
            cell=count_flops(module.cell.op, s)[0],
            gate=count_flops(module.gate, s)[0],
            paths=tuple(count_flops(module.transforms[p.direction], s)[0] for p in module.paths),
            counted=tuple(p.target[0] < network.layers for p in module.paths),
        )
    decoder_levels = tuple(count_flops(network.decoder.levels[k], shape(k))[0]
                           if _decoder_level_runs(network, k) else Flops()
                           for k in range(NUM_SCALES))
    head = Flops()
    if network.head.psp is not None:
        head += count_flops(network.head.psp, (c0, h0, w0))[0]
    head += count_flops(network.head.classifier, (c0, h0, w0))[0]
    return CostModel(height=height, width=width, threshold=network.closed_threshold,
                     stem=stem, nodes=nodes, decoder_levels=decoder_levels, head=head)


def _decoder_level_runs(network: DynamicRoutingNetwork, scale: int) -> bool:
    """Level k runs when the route feeds the decoder at scale k or anywhere coarser."""
    return any(k >= scale for k in network.route.decoder_scales())
