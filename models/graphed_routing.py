"""Per-sample routing at batch 1, replayed from CUDA graphs piece by piece.

Why: profiled (benchmarks/gpu_profile.py; benchmarks/README.md, "On an H200"), the batch-1 hard
forward at 1024×2048 keeps the GPU busy well under half its wall time: the host, launching over a
thousand operators, is slower than the kernels. One graph cannot hold the forward, since each row's
routes are read on the host before the row's cells run. But between two such reads the work is fixed
by what the host already knows, so the forward splits into pieces that each replay as a graph:

    stem      the padded image → the init cell's input
    gates     per row and set of present nodes: each node's gate, and the row's open/closed
              decisions (then the row's one wait: the host reads the decisions)
    paths     per row, present nodes and decisions: the cells of nodes with an open path, their
              open transforms scaled by α, summed per target; nodes with every path closed pass
              their input on (Eq. 5–6)
    decoder   per set of present last-row nodes: decoder, head, logits

A piece met for the first time runs eagerly (on a side stream, which a capture needs before it)
and is then captured; later calls with the same piece replay it. Pieces hand their results to
each other through fixed buffers (one per node input, α and decisions per row, the logits), since
a replay reads and writes fixed addresses; the pieces share one memory pool for what lives only
inside them. The computation is `_node_hard`'s and the decoder's own, so the result equals the
hard forward's (bit for bit on a CPU, where nothing is captured and every piece runs eagerly:
what the tests compare).

Outputs (logits and α) are the fixed buffers: valid until the next call.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import Feature
from .network import RoutingOutput, _node_hard, _pad_to
from .routing_space import INIT_ROW, NodeId

MAX_GRAPHS = 512  # pieces captured at most; later new pieces run eagerly (memory stays bounded)


class GraphedRouting:
    """`network(images, skip=True)` for one image at a time, its pieces replayed as CUDA graphs.

    capture: record graphs (default: on CUDA). Without it every piece runs eagerly through the
    same buffers, which is how a CPU checks the piece-wise forward against the hard one.
    """

    def __init__(self, network: nn.Module, *, capture: bool | None = None,
                 max_graphs: int = MAX_GRAPHS) -> None:
        if network.training:
            raise ValueError("GraphedRouting runs inference: put the network in eval mode")
        self.network = network
        device = next(network.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the network is on {device}")
        self.max_graphs = max_graphs
        self.rows = network.rows()
        self._reset(None)

    def _reset(self, key: tuple | None) -> None:
        self.shape_key = key
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.eager_pieces = 0  # pieces met after MAX_GRAPHS, run eagerly
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.image: torch.Tensor | None = None
        self.inputs: dict[NodeId, torch.Tensor] = {}  # each node's input
        self.alphas: dict[NodeId, torch.Tensor] = {}
        self.decisions: dict[tuple, torch.Tensor] = {}
        self.targets: dict[tuple, list[NodeId]] = {}  # the nodes each paths piece feeds
        self.zeros: dict[NodeId, torch.Tensor] = {}  # α of absent nodes
        self.logits: torch.Tensor | None = None

    @property
    def captured(self) -> int:
        return len(self.graphs)

    def __call__(self, images: torch.Tensor) -> RoutingOutput:
        if images.dim() != 4 or images.shape[0] != 1 or images.shape[1] != 3:
            raise ValueError(f"GraphedRouting takes one image (1, 3, H, W), got "
                             f"{tuple(images.shape)}; run the network itself for a batch")
        key = (tuple(images.shape), images.dtype, images.stride())
        if key != self.shape_key:
            self._reset(key)
            self.image = images.clone()
        with torch.inference_mode():
            self.image.copy_(images)
            self._piece(("stem",), self._stem)
            present: list[NodeId] = [(INIT_ROW, 0)]
            gated: set[NodeId] = set()
            for r, row in enumerate(self.rows):
                here = tuple(n.node for n in row if n.node in present)
                nodes = [self.network.node(n) for n in here]
                if not nodes:
                    present = []
                    continue
                self._piece(("gates", r, here), partial(self._gates, nodes, (r, here)))
                gated.update(here)
                flags = tuple(self.decisions[(r, here)].tolist())  # the row's one wait
                key = ("paths", r, here, flags)
                self._piece(key, partial(self._paths, nodes, flags, key))
                present = self.targets[key]
            last = tuple(sorted(present))
            self._piece(("decoder", last), partial(self._decoder, last))
        gates = {n.node: self.alphas[n.node] if n.node in gated else self._zeros(n)
                 for row in self.rows for n in row}
        return RoutingOutput(logits=self.logits, gates=gates)

    # -- running a piece --------------------------------------------------------------------
    def _piece(self, key: tuple, fn: Callable[[], object]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if not self.capture:
            fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # this call's result, and the warm-up a capture needs
        torch.cuda.current_stream().wait_stream(side)
        if len(self.graphs) >= self.max_graphs:
            self.eager_pieces += 1
            return
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.graphs[key] = graph

    @staticmethod
    def _store(buffers: dict, key, value: torch.Tensor) -> None:
        """Copy `value` into the fixed buffer `key` (made on first use, outside any capture:
        a piece's first call is eager)."""
        buffer = buffers.get(key)
        if buffer is None:
            buffers[key] = buffer = torch.empty_like(value)
        buffer.copy_(value)

    # -- the pieces -------------------------------------------------------------------------
    def _stem(self) -> None:
        height, width = self.image.shape[-2:]
        padded = F.pad(self.image, (0, _pad_to(width), 0, _pad_to(height)))
        self._store(self.inputs, (INIT_ROW, 0), self.network.stem(padded))

    def _gates(self, nodes: list, key: tuple) -> None:
        threshold = self.network.closed_threshold
        opened = []
        for node in nodes:
            alpha = node.gate(self.inputs[node.node])  # (1, g)
            self._store(self.alphas, node.node, alpha)
            opened.append((alpha > threshold).flatten())
        self._store(self.decisions, key, torch.cat(opened))

    def _paths(self, nodes: list, flags: tuple[bool, ...], key: tuple) -> None:
        received: dict[NodeId, Feature] = {}
        start = 0
        for node in nodes:
            g = len(node.paths)
            open_ = [list(flags[start:start + g])]
            start += g
            _node_hard(node, None, self.inputs[node.node], self.alphas[node.node], open_,
                       received, 1)
        for target, feature in received.items():
            self._store(self.inputs, target, feature.value)
        self.targets[key] = list(received)  # what a replay of this piece fills, for the next row

    def _decoder(self, last: tuple[NodeId, ...]) -> None:
        net = self.network
        features = {n: Feature(self.inputs[n]) for n in last}
        p = net.decoder(net._decoder_inputs(features))
        height, width = self.image.shape[-2:]
        logits = net.head(p)[..., :height, :width]
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _zeros(self, node) -> torch.Tensor:
        if node.node not in self.zeros:
            self.zeros[node.node] = self.image.new_zeros(1, len(node.paths))
        return self.zeros[node.node]
