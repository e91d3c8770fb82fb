import pytest
import torch

from dynroute.models import (
    BudgetLoss,
    NetworkConfig,
    Route,
    budget,
    build_network,
    segmentation_loss,
)
from dynroute.models.cell import CELL_OPS
from dynroute.models.decoder import Decoder, Feature
from dynroute.models.gate import GATE_KINDS, SoftConditionalGate, pin_gate
from dynroute.models.routing_space import Path, RoutingSpace


@pytest.mark.parametrize("cell", sorted(CELL_OPS))
@pytest.mark.parametrize("gate", GATE_KINDS)
def test_forward_backward_for_every_cell_and_gate(make_network, cell, gate):
    net = make_network(cell=cell, gate=gate).train()
    x = torch.randn(2, 3, 64, 64) * 40
    out = net(x, progress=0.5)
    assert out.logits.shape == (2, 3, 64, 64)
    loss = segmentation_loss(out.logits, torch.randint(0, 3, (2, 64, 64)))
    loss.backward()
    assert torch.isfinite(loss)
    assert net.stem[0].weight.grad is not None
    net.eval()
    with torch.no_grad():
        assert net(x).logits.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (70, 90), (33, 47), (100, 31)])
def test_output_size_equals_input_size(make_network, size):
    net = make_network(psp=True)
    x = torch.randn(1, 3, *size)
    for mode in (net.train(), net.eval()):
        with torch.no_grad():
            assert mode(x).logits.shape[-2:] == size


def test_rejects_images_that_are_not_bchw(make_network):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_network()(torch.randn(3, 64, 64))


def test_gradients_reach_every_gate_with_the_budget_loss(make_network):
    net = make_network(small_gate=True).train()
    x = torch.randn(2, 3, 64, 64) * 40
    out = net(x)
    cost = net.cost_model(64, 64)
    spec = budget("dynamic-a")
    loss = segmentation_loss(out.logits, torch.randint(0, 3, (2, 64, 64)))
    budget_loss = BudgetLoss(spec.lambda2, spec.mu, cost.all_open_expected())
    loss = loss + budget_loss(cost.expected(out.gates), 1.0)
    loss.backward()
    gates = [m for m in net.modules() if isinstance(m, SoftConditionalGate)]
    assert len(gates) == len(net.route.cells)
    for gate in gates:
        grads = [p.grad for p in gate.parameters()]
        assert all(g is not None for g in grads)
        assert gate.features[-1].bias.grad.abs().sum() > 0


def test_inference_with_every_path_open_equals_the_soft_forward(make_network, images):
    net = make_network().eval()
    for node in net.nodes.values():
        pin_gate(node.gate, [True] * len(node.paths))
    with torch.no_grad():
        soft, hard = net(images, skip=False), net(images, skip=True)
    torch.testing.assert_close(hard.logits, soft.logits, rtol=1e-5, atol=1e-5)


def _diverse_network(make_network, seed=3):
    """Gates with strong random weights and no bias: decisions differ from image to image."""
    net = make_network(seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    for node in net.nodes.values():
        final = node.gate.features[-1]
        with torch.no_grad():
            final.weight.copy_(torch.randn(final.weight.shape, generator=g) * 3)
            final.bias.zero_()
    return net


def test_mixed_routes_in_a_batch_equal_per_sample_inference(make_network):
    net = _diverse_network(make_network)
    torch.manual_seed(5)
    images = torch.randn(6, 3, 64, 96) * 30 + torch.randn(6, 3, 1, 1) * 60  # colour casts
    # float64: batched and single convolutions then agree to rounding, so any routing mistake shows
    net, images = net.double(), images.double()
    with torch.no_grad():
        batched = net(images)
        single = [net(images[i : i + 1]) for i in range(len(images))]
    routes = {tuple(bool(v) for node in sorted(batched.gates)
                    for v in batched.gates[node][i] > 1e-4) for i in range(len(images))}
    assert len(routes) >= 3, "the test needs samples that take different routes"
    closed = sum(int((a <= 1e-4).sum()) for a in batched.gates.values())
    assert closed > 0
    for i, out in enumerate(single):
        torch.testing.assert_close(batched.logits[i : i + 1], out.logits, rtol=1e-9, atol=1e-9)
        for node, alpha in out.gates.items():
            torch.testing.assert_close(batched.gates[node][i : i + 1], alpha, rtol=1e-9, atol=1e-12)


def test_closed_cell_passes_its_input_unchanged_at_inference(make_network, images):
    net = make_network().eval()
    for node in net.nodes.values():
        pin_gate(node.gate, [True] * len(node.paths))
    captured = {}
    target = net.node((2, 1))
    pin_gate(target.gate, [False] * len(target.paths))
    after = net.node((3, 1))
    after.gate.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    # With only the closed cell's keep feeding (3, 1), its input must be exactly (2, 1)'s input.
    for node in ((2, 0), (2, 2)):
        n = net.node(node)
        pin_gate(n.gate, [p.target != (3, 1) for p in n.paths])
    target.gate.register_forward_pre_hook(lambda m, args: captured.update({"in": args[0]}))
    cell_calls = []
    target.cell.register_forward_hook(lambda *a: cell_calls.append(1) and None)
    with torch.no_grad():
        out = net(images)
    assert cell_calls == [], "a closed cell must not run"
    assert torch.equal(captured["x"], captured["in"])
    assert bool((out.gates[(2, 1)] == 0).all())


def test_closed_paths_are_not_computed_at_inference(make_network, images):
    net = make_network().eval()
    node = net.node((1, 1))
    pin_gate(node.gate, [True, False, False])  # keep only
    calls = {"up": 0, "down": 0}
    for d in calls:
        node.transforms[d].register_forward_hook(
            lambda *a, d=d: calls.__setitem__(d, calls[d] + 1))
    with torch.no_grad():
        net(images)
    assert calls == {"up": 0, "down": 0}
    net.train()
    net(images)
    assert calls == {"up": 1, "down": 1}, "training computes every path"


def test_decoder_survives_a_dropped_scale():
    torch.manual_seed(0)
    dec = Decoder(base_channels=4).eval()
    f = [torch.randn(2, 4 * 2**k, 16 >> k, 16 >> k) for k in range(4)]
    full = dec([Feature(v) for v in f])
    assert full.shape == (2, 4, 16, 16)
    for dropped in range(4):
        feats = [None if k == dropped else Feature(v) for k, v in enumerate(f)]
        assert dec(feats).shape == (2, 4, 16, 16)
    # Dropping the coarsest scale skips its conv: same as feeding only the finer ones from there.
    only_fine = dec([Feature(f[0]), Feature(f[1]), Feature(f[2]), None])
    partial = dec([Feature(f[0]), Feature(f[1]), Feature(f[2]),
                   Feature(torch.zeros_like(f[3]), (False, False))])
    torch.testing.assert_close(only_fine, partial)
    # a scale absent for one sample only: that sample matches the dropped-scale result
    mixed = dec([Feature(f[0]), Feature(f[1]), Feature(f[2]),
                 Feature(f[3] * torch.tensor([1.0, 0]).view(2, 1, 1, 1),
                         (True, False))])
    torch.testing.assert_close(mixed[1], only_fine[1])
    torch.testing.assert_close(mixed[0], full[0])


def test_static_route_network_contains_only_its_cells_and_paths(make_network):
    space = RoutingSpace(4)
    scales = [0, 1, 2, 2]
    paths = {Path(-1, 0, "keep"), Path(0, 0, "down"), Path(1, 1, "down"), Path(2, 2, "keep"),
             Path(3, 2, "keep")}
    route = Route(4, frozenset(paths), name="chain")
    assert sorted(route.cells) == [(-1, 0), (0, 0), (1, 1), (2, 2), (3, 2)]
    net = make_network(route=route, gate="fixed")
    assert set(net.nodes) == {"init", "r0s0", "r1s1", "r2s2", "r3s2"}
    assert [p.direction for p in net.node((0, 0)).paths] == ["down"]
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 3, 64, 64)
    assert scales == [k for _, k in sorted(route.cells)][1:]
    assert len(space.paths()) > len(route.paths)


def test_config_rejects_unknown_keys_and_mismatched_routes():
    with pytest.raises(ValueError, match="unknown keys"):
        NetworkConfig.from_dict({"layers": 4, "widht": 3})
    with pytest.raises(ValueError, match="rows"):
        NetworkConfig(layers=5, route=Route.full(4))
    with pytest.raises(ValueError, match="sep2"):
        NetworkConfig(cell="conv")
    build_network(NetworkConfig(layers=4, base_channels=2, num_classes=2))
