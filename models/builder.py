"""One builder from config to network, and the named variants (paper Tables 1–4).

`NetworkConfig` is the frozen, typed description of a network; `build_network` is the only place
that turns it into modules. Named variants are plain functions in a dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from .cell import CELL_OPS
from .gate import GATE_KINDS
from .network import DynamicRoutingNetwork
from .routes import Route


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that defines a network's modules.

    `route` None means the whole routing space of `layers` rows.
    """

    layers: int = 16
    num_classes: int = 19
    base_channels: int = 64
    cell: str = "sep2"
    gate: str = "tanh"
    small_gate: bool = False
    gate_bias: float = 1.5
    closed_threshold: float = 1e-4
    drop_path_prob: float = 0.0
    psp: bool = False
    route: Route | None = None

    def __post_init__(self) -> None:
        if self.layers < 4:
            raise ValueError(f"layers={self.layers}: the routing space needs at least 4 rows so "
                             f"that every scale is reached")
        if self.base_channels < 1:
            raise ValueError(f"base_channels={self.base_channels}: must be at least 1")
        if self.cell not in CELL_OPS:
            raise ValueError(f"cell={self.cell!r}: choose one of {sorted(CELL_OPS)}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate={self.gate!r}: choose one of {list(GATE_KINDS)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}: need at least one class")
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise ValueError(f"drop_path_prob={self.drop_path_prob}: must lie in [0, 1)")
        if self.route is not None and self.route.layers != self.layers:
            raise ValueError(f"route {self.route.name!r} has {self.route.layers} rows but "
                             f"layers={self.layers}; make them agree")

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "model config") -> NetworkConfig:
        """Build from plain data (params.yaml), rejecting unknown keys."""
        known = {f.name for f in fields(cls)} - {"route"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def build_network(config: NetworkConfig) -> DynamicRoutingNetwork:
    route = config.route if config.route is not None else Route.full(config.layers)
    return DynamicRoutingNetwork(
        route=route, num_classes=config.num_classes, base_channels=config.base_channels,
        cell=config.cell, gate=config.gate, small_gate=config.small_gate,
        gate_bias=config.gate_bias, closed_threshold=config.closed_threshold,
        drop_path_prob=config.drop_path_prob, psp=config.psp)


def dynamic_l16(**overrides) -> NetworkConfig:
    """Dynamic-Raw, L=16: full-size gates, no budget."""
    return replace(NetworkConfig(layers=16), **overrides)


def dynamic_l33(**overrides) -> NetworkConfig:
    return replace(NetworkConfig(layers=33), **overrides)


def dynamic_l33_psp(**overrides) -> NetworkConfig:
    return replace(NetworkConfig(layers=33, psp=True), **overrides)


def budgeted_l16(**overrides) -> NetworkConfig:
    """Dynamic-A/B/C, L=16: the budget's small gate (λ2 and μ live in `losses.BUDGETS`)."""
    return replace(NetworkConfig(layers=16, small_gate=True), **overrides)


def network_fix_l16(**overrides) -> NetworkConfig:
    """Every cell and path, gates fixed to 1."""
    return replace(NetworkConfig(layers=16, gate="fixed"), **overrides)


def network_fix_l33(**overrides) -> NetworkConfig:
    return replace(NetworkConfig(layers=33, gate="fixed"), **overrides)


VARIANTS: dict[str, Callable[..., NetworkConfig]] = {
    "dynamic-l16": dynamic_l16,
    "dynamic-l33": dynamic_l33,
    "dynamic-l33-psp": dynamic_l33_psp,
    "budgeted-l16": budgeted_l16,
    "network-fix-l16": network_fix_l16,
    "network-fix-l33": network_fix_l33,
}
