import pytest
import torch

from dynroute.models.gate import (
    FixedGate,
    SoftConditionalGate,
    build_gate,
    pin_gate,
)
from dynroute.models.layers import Resize


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softmax"])
def test_gate_outputs_one_factor_per_path_and_sample(activation):
    torch.manual_seed(0)
    gate = SoftConditionalGate(channels=8, num_paths=3, activation=activation)
    alpha = gate(torch.randn(5, 8, 6, 6))
    assert alpha.shape == (5, 3)
    assert bool((alpha >= 0).all()) and bool((alpha <= 1).all())
    if activation == "softmax":
        torch.testing.assert_close(alpha.sum(1), torch.ones(5))


def test_tanh_gate_is_max0_tanh_and_closes_exactly():
    gate = SoftConditionalGate(channels=4, num_paths=2)
    x = torch.randn(3, 4, 5, 5)
    logits = gate.features(x).flatten(1)
    torch.testing.assert_close(gate(x), torch.clamp(torch.tanh(logits), min=0))
    pin_gate(gate, [False, True])
    alpha = gate(x)
    assert bool((alpha[:, 0] == 0).all()), "a negative logit must close the path exactly"
    assert bool((alpha[:, 1] > 0.99).all())


def test_gate_bias_starts_at_1_5_so_every_path_starts_open():
    gate = SoftConditionalGate(channels=4, num_paths=3)
    torch.testing.assert_close(gate.features[-1].bias.detach(), torch.full((3,), 1.5))


def test_small_gate_reads_a_quarter_size_input():
    gate = SoftConditionalGate(channels=4, num_paths=2, small=True)
    assert isinstance(gate.features[0], Resize)
    seen = {}
    gate.features[1].register_forward_pre_hook(lambda m, args: seen.update(shape=args[0].shape))
    gate(torch.randn(2, 4, 16, 24))
    assert seen["shape"][-2:] == (4, 6)
    # tiny inputs never collapse to zero size
    gate(torch.randn(2, 4, 2, 2))
    assert gate.features[0].output_size(2, 2) == (1, 1)


def test_fixed_gate_is_all_ones_without_parameters():
    gate = build_gate("fixed", channels=4, num_paths=3)
    assert isinstance(gate, FixedGate)
    assert list(gate.parameters()) == []
    assert torch.equal(gate(torch.randn(2, 4, 3, 3)), torch.ones(2, 3))


def test_unknown_gate_names_the_choices():
    with pytest.raises(ValueError, match="tanh"):
        build_gate("relu", channels=4, num_paths=2)


def test_pin_gate_checks_its_arguments():
    with pytest.raises(ValueError, match="3 paths"):
        pin_gate(SoftConditionalGate(channels=4, num_paths=3), [True])
    with pytest.raises(TypeError):
        pin_gate(FixedGate(num_paths=1), [True])
