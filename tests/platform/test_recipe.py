import math
from itertools import pairwise

import pytest
import torch

from dynroute.models import NetworkConfig, build_network
from dynroute.models.gate import SoftConditionalGate
from dynroute.platform.train.recipe import (
    TrainConfig,
    build_optimizer,
    check_finite,
    clip_gradients,
    lr_factor,
    network_for_budget,
    set_lr,
    steps_per_epoch,
)


def test_warmup_then_poly():
    config = TrainConfig(iterations=1000, warmup_iterations=100, warmup_factor=0.001)
    assert lr_factor(0, config) == pytest.approx(0.001)
    assert lr_factor(50, config) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(100, config) == pytest.approx((1 - 0.1) ** 0.9)
    assert lr_factor(999, config) == pytest.approx((1 / 1000) ** 0.9)
    assert lr_factor(1000, config) == 0.0
    values = [lr_factor(s, config) for s in range(100, 1000)]
    assert all(a >= b for a, b in pairwise(values)), "poly decreases"


def test_no_weight_decay_on_bn_and_biases_and_a_gate_lr_multiplier():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(layers=4, base_channels=4, num_classes=3))
    config = TrainConfig(lr=0.1, warmup_iterations=0, gate_lr_multiplier=2.5)
    opt = build_optimizer(net, config)
    decay, no_decay, gates = opt.param_groups
    bn = {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)
          for p in m.parameters()}
    gate = {id(p) for m in net.modules() if isinstance(m, SoftConditionalGate)
            for p in m.parameters()}
    assert not bn & {id(p) for p in decay["params"]}
    assert bn - gate <= {id(p) for p in no_decay["params"]}
    assert {id(p) for p in gates["params"]} == gate
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    set_lr(opt, 0, config)
    assert decay["lr"] == pytest.approx(0.1) and gates["lr"] == pytest.approx(0.25)


def test_named_budgets_pick_the_network():
    model = NetworkConfig(layers=4)
    assert network_for_budget(model, "dynamic-a").small_gate
    assert not network_for_budget(model, "dynamic-raw").small_gate
    assert network_for_budget(model, "network-fix").gate == "fixed"
    assert TrainConfig(budget="dynamic-c").budget_weights == (0.5, 0.2)
    assert TrainConfig(budget="dynamic-a", mu=0.3).budget_weights == (0.8, 0.3)
    assert TrainConfig(budget="network-fix").budget_weights == (0.0, 0.0)
    with pytest.raises(ValueError, match="network-fix"):
        TrainConfig(budget="dynamic-z")


def test_clipping_bounds_the_total_norm_and_divergence_is_named():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    norm = clip_gradients([p], 5.0)
    assert isinstance(norm, torch.Tensor) and norm.item() == pytest.approx(20.0)
    assert p.grad.norm().item() == pytest.approx(5.0, rel=1e-4)
    p.grad = torch.tensor([float("nan"), 0, 0, 0])
    assert math.isnan(clip_gradients([p], 5.0).item())  # no wait here: the caller checks
    check_finite({"loss": 1.0, "grad_norm": 2.0}, "in steps 1-2")
    with pytest.raises(FloatingPointError, match="grad_norm not finite in steps 3-4"):
        check_finite({"loss": 1.0, "grad_norm": math.nan}, "in steps 3-4")


def test_steps_per_epoch_needs_a_full_batch():
    assert steps_per_epoch(17, 8) == 2
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(5, 8)
