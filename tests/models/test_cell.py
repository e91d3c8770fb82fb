import pytest
import torch

from dynroute.models.cell import CELL_OPS, Cell, drop_path
from dynroute.models.gate import pin_gate
from dynroute.models.node import Node
from dynroute.models.routing_space import RoutingSpace
from dynroute.models.transforms import SharedReLU


@pytest.mark.parametrize("op", sorted(CELL_OPS))
def test_every_cell_variant_keeps_shape_and_trains(op):
    torch.manual_seed(0)
    cell = Cell(channels=8, op=op)
    x = torch.randn(2, 8, 6, 10, requires_grad=True)
    y = cell(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())


def test_cell_is_identity_plus_sepblock():
    cell = Cell(channels=4, op="sep2").eval()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(cell(x), cell.op(x) + x)
    # sep2 = (dw, pw, BN, ReLU) then (dw, pw, BN): no activation at its end
    kinds = [type(m).__name__ for m in cell.op]
    assert kinds == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Conv2d", "BatchNorm2d"]


def test_unknown_cell_names_the_choices():
    with pytest.raises(ValueError, match="bottleneck"):
        Cell(channels=4, op="sep4")


def test_scheduled_drop_path_keep_probability():
    cell = Cell(channels=4, depth_rate=(7 + 1) / 16, drop_prob=0.2)
    assert cell.keep_prob(0.0) == 1.0
    assert cell.keep_prob(1.0) == pytest.approx(1 - 0.2 * 0.5)
    assert cell.keep_prob(0.5) == pytest.approx(1 - 0.2 * 0.5 * 0.5)


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(400, 2, 3, 3)
    y = drop_path(x, keep_prob=0.7)
    per_sample = y.flatten(1)
    rescaled = torch.isclose(per_sample, torch.tensor(1 / 0.7)).all(1)
    assert bool(((per_sample == 0).all(1) | rescaled).all())
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert 0.6 < kept < 0.8


def test_drop_path_touches_only_the_branch_and_only_in_training():
    torch.manual_seed(0)
    cell = Cell(channels=4, depth_rate=1.0, drop_prob=0.9)
    x = torch.randn(64, 4, 4, 4)
    cell.train()
    y = cell(x, progress=1.0)  # keep prob 0.1: most samples lose the branch, never the identity
    dropped = [(y[i] - x[i]).abs().max() == 0 for i in range(len(x))]
    assert 40 < sum(dropped) < 64
    cell.eval()
    torch.testing.assert_close(cell(x, progress=1.0), cell.op(x) + x)


def _node(gate="tanh"):
    torch.manual_seed(0)
    space = RoutingSpace(4)
    return Node(node=(1, 1), paths=space.paths_of((1, 1)), base_channels=4, cell="sep2",
                gate=gate, small_gate=False, gate_bias=1.5, layers=4, drop_path_prob=0.0,
                closed_threshold=1e-4)


def _soft(node, x, received=None):
    """The node's soft forward: (α, [Y_j in path order]) when `received` starts empty."""
    received = {} if received is None else received
    alpha = node(x, received)
    return alpha, [received[p.target] for p in node.paths]


def test_training_forward_follows_eq4_and_eq6():
    node = _node().train()
    x = torch.randn(3, 8, 6, 6)
    alpha, outs = _soft(node, x)
    r = torch.relu(node.cell(x))  # every transform starts with ReLU(H), applied once
    keep, up, down = (node.transforms[d] for d in ("keep", "up", "down"))
    assert all(isinstance(t[0], SharedReLU) for t in (keep, up, down))
    a = alpha.view(3, 3, 1, 1, 1)
    torch.testing.assert_close(outs[0], a[:, 0] * r)  # keep = ReLU; Σα ≥ 1e-4: no residual
    torch.testing.assert_close(outs[0], a[:, 0] * keep(r))
    torch.testing.assert_close(outs[1], a[:, 1] * up(r))
    torch.testing.assert_close(outs[2], a[:, 2] * down(r))
    assert outs[1].shape == (3, 4, 12, 12) and outs[2].shape == (3, 16, 3, 3)


def test_each_path_adds_into_its_targets_input_with_the_gradients_of_the_plain_formula():
    """Eq. 4's sum, fused into the paths (addcmul; α before the up path's upsample), gives the
    values and the gradients of Σ α_j·T_j(ReLU(H)) added one product at a time."""
    node = _node().train()
    x = torch.randn(3, 8, 6, 6, requires_grad=True)
    prev = {p.target: torch.randn(3, *shape, requires_grad=True)
            for p, shape in zip(node.paths, [(8, 6, 6), (4, 12, 12), (16, 3, 3)], strict=True)}
    received = dict(prev)
    alpha = node(x, received)
    fused = [received[p.target] for p in node.paths]
    grads_fused = torch.autograd.grad(sum((y * y.detach().sin()).sum() for y in fused),
                                      [x, *prev.values(), *node.parameters()])
    alpha, r = node.gate(x), torch.relu(node.cell(x))  # a second graph for the plain sums
    plain = [prev[p.target] + alpha[:, j].view(-1, 1, 1, 1) * node.transforms[p.direction](r)
             for j, p in enumerate(node.paths)]
    grads_plain = torch.autograd.grad(sum((y * y.detach().sin()).sum() for y in plain),
                                      [x, *prev.values(), *node.parameters()])
    for y_fused, y_plain in zip(fused, plain, strict=True):
        torch.testing.assert_close(y_fused, y_plain)
    for g_fused, g_plain in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(g_fused, g_plain)
    assert received.keys() == prev.keys()  # nothing else written


def test_closed_node_passes_its_input_on_by_keep_in_training():
    node = _node().train()
    pin_gate(node.gate, [False, False, False])
    x = torch.randn(2, 8, 6, 6)
    alpha, outs = _soft(node, x)
    assert bool((alpha == 0).all())
    assert torch.equal(outs[0], x)
    assert bool((outs[1] == 0).all()) and bool((outs[2] == 0).all())


def test_partially_open_node_scales_each_path_by_its_own_alpha():
    node = _node().train()
    pin_gate(node.gate, [False, True, False])
    x = torch.randn(2, 8, 6, 6)
    alpha, outs = _soft(node, x)
    assert bool((outs[0] == 0).all()), "keep closed while another path is open: no residual"
    up = node.transforms["up"](torch.relu(node.cell(x)))
    torch.testing.assert_close(outs[1], alpha[:, 1].view(-1, 1, 1, 1) * up)
