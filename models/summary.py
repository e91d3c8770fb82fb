"""What a network costs: parameters and GFLOPs by part at a declared resolution (docs/model.md §7).

Pure functions over a built network, used by `dynroute model summary` and by anything that reports
model metadata. GFLOPs are multi-adds / 1e9 with every path of the network's route open.
"""

from __future__ import annotations

from .network import DynamicRoutingNetwork
from .routing_space import INIT_ROW

PARTS = ("stem", "init_cell", "cells", "gates", "transforms", "decoder", "head")


def parameter_counts(network: DynamicRoutingNetwork) -> dict[str, int]:
    """Parameters by part; the init cell's transforms count as transforms, as their FLOPs do."""
    counts = dict.fromkeys(PARTS, 0)

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    counts["stem"] = n(network.stem)
    counts["decoder"] = n(network.decoder)
    counts["head"] = n(network.head)
    for node in network.nodes.values():
        own = n(node.cell) + n(node.gate)
        if node.node[0] == INIT_ROW:
            counts["init_cell"] += own
        else:
            counts["cells"] += n(node.cell)
            counts["gates"] += n(node.gate)
        counts["transforms"] += n(node.transforms)
    return counts


def summarize(network: DynamicRoutingNetwork, height: int, width: int) -> dict:
    """Parameters and all-open GFLOPs of `network` at (height, width), with the breakdown.

    Keys: `params` (int), `gflops` (float, real cost of one image with every path of the route
    open; the init cell is not counted, as in the paper), `expected_gflops` (C_all of the budget
    loss at this resolution), `resolution`, and `breakdown` {part: {params, gflops}}.
    """
    cost = network.cost_model(height, width)
    flops = cost.all_open()
    params = parameter_counts(network)
    return {
        "params": sum(params.values()),
        "gflops": cost.all_open_real() / 1e9,
        "expected_gflops": cost.all_open_expected() / 1e9,
        "resolution": [height, width],
        "breakdown": {part: {"params": params[part], "gflops": flops[part].total / 1e9,
                             "counted": part != "init_cell"}
                      for part in PARTS},
    }
