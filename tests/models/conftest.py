"""Tiny networks for CPU tests: 4 rows, 4 base channels, inputs of 64 pixels."""

from __future__ import annotations

import pytest
import torch

from dynroute.models import NetworkConfig, build_network


def tiny_config(**overrides) -> NetworkConfig:
    values = {"layers": 4, "base_channels": 4, "num_classes": 3} | overrides
    return NetworkConfig(**values)


def tiny_network(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_network(tiny_config(**overrides))


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 96) * 40.0  # (B, 3, H, W), mean-subtracted BGR scale


@pytest.fixture
def make_network():
    """Factory: make_network(seed=0, **config overrides) -> a tiny DynamicRoutingNetwork."""
    return tiny_network
