import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynroute.models import Flops
from dynroute.models.cell import CELL_OPS
from dynroute.models.cost import count_flops
from dynroute.models.gate import pin_gate
from dynroute.models.static_routes import STATIC_ROUTES


def _conv_macs_counted_by_torch(net, size):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(2, 3, *size))  # batch 2: BN in training needs more than one value
    return counter.get_total_flops() // 2 // 2  # a multiply-add is 2 FLOPs to torch


def _conv_macs_analytic(net, size):
    return sum(part.conv for part in net.cost_model(*size).all_open().values())


@pytest.mark.parametrize("cell", sorted(CELL_OPS))
def test_analytic_conv_macs_equal_torch_flop_counter_on_an_all_open_static_forward(
        make_network, cell):
    net = make_network(cell=cell, gate="fixed").eval()
    assert _conv_macs_analytic(net, (64, 96)) == _conv_macs_counted_by_torch(net, (64, 96))


@pytest.mark.parametrize("options", [{}, {"small_gate": True}, {"psp": True},
                                     {"gate": "sigmoid", "layers": 5}])
def test_analytic_conv_macs_include_gates_and_heads(make_network, options):
    # the training forward computes every cell, gate and path
    net = make_network(**options).train()
    assert _conv_macs_analytic(net, (96, 64)) == _conv_macs_counted_by_torch(net, (96, 64))


def test_cost_is_analytic_at_the_declared_resolution_not_the_fed_one(make_network):
    net = make_network()
    small, large = net.cost_model(64, 64), net.cost_model(128, 128)
    assert large.all_open().get("cells").conv == 4 * small.all_open()["cells"].conv
    # a size that is not a multiple of 32 is costed padded, as the forward pads it
    assert net.cost_model(60, 50).all_open_real() == small.all_open_real()


def test_flops_formulas_of_single_layers():
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
    flops, shape = count_flops(conv, (8, 10, 12))
    assert shape == (16, 5, 6)
    assert flops == Flops(conv=9 * 8 * 16 * 30, bias=16 * 30)
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_flops(dw, (8, 4, 4))[0] == Flops(conv=9 * 8 * 16)
    assert count_flops(torch.nn.BatchNorm2d(8), (8, 4, 4))[0] == Flops(norm=2 * 128)
    assert count_flops(torch.nn.ReLU(), (8, 4, 4))[0] == Flops(act=128)
    assert count_flops(torch.nn.AdaptiveAvgPool2d(1), (8, 4, 4)) == (Flops(pool=128), (8, 1, 1))
    with pytest.raises(TypeError, match="cost model"):
        count_flops(torch.nn.GELU(), (8, 4, 4))


def test_expected_cost_equals_real_cost_when_every_alpha_is_0_or_1(make_network, images):
    net = make_network().train()
    cost = net.cost_model(512, 1024)
    torch.manual_seed(0)
    for _ in range(5):
        gates = {node: (torch.rand(4, len(net.node(node).paths)) > 0.4).float()
                 for node in net.route.cells}
        expected = cost.expected(gates).double()
        real = cost.real(gates, routing_only=True)
        torch.testing.assert_close(expected, real, rtol=1e-6, atol=0)
    ones = {node: torch.ones(1, len(net.node(node).paths)) for node in net.route.cells}
    assert cost.expected(ones).item() == pytest.approx(cost.all_open_expected(), rel=1e-6)
    assert cost.real(ones).item() == cost.all_open_real()


def test_expected_cost_is_differentiable_and_weights_cells_by_their_largest_alpha(make_network):
    net = make_network()
    cost = net.cost_model(64, 64)
    node = (1, 1)
    base = {n: torch.zeros(1, len(net.node(n).paths)) for n in net.route.cells}
    alpha = torch.tensor([[0.0, 0.5, 0.25]], requires_grad=True)
    gates = base | {node: alpha}
    e = cost.expected(gates)
    c = cost.nodes[node]
    want = 0.5 * c.cell.total + 0.5 * c.paths[1].total + 0.25 * c.paths[2].total
    assert e.item() == pytest.approx(want, rel=1e-6)
    e.sum().backward()
    assert alpha.grad[0, 1] > alpha.grad[0, 2] > 0


def test_real_cost_counts_gates_of_skipped_cells_and_nothing_of_closed_paths(make_network, images):
    net = make_network().eval()
    for n in net.nodes.values():
        pin_gate(n.gate, [True] * len(n.paths))
    cost = net.cost_model(64, 96)
    with torch.no_grad():
        full = cost.real(net(images).gates)
    assert torch.all(full == cost.all_open_real())
    pin_gate(net.node((2, 1)).gate, [False, False, False])
    with torch.no_grad():
        out = net(images)
    closed = cost.nodes[(2, 1)]
    saved = closed.cell.total + sum(p.total for p in closed.paths)
    assert torch.all(cost.real(out.gates) == cost.all_open_real() - saved)


def test_last_row_keep_into_the_decoder_is_not_counted_but_the_init_cells_paths_are(make_network):
    net = make_network()
    cost = net.cost_model(64, 64)
    assert cost.nodes[(3, 0)].counted == (False,)
    assert cost.nodes[(-1, 0)].counted == (True, True)
    parts = cost.all_open()
    assert parts["init_cell"].total > 0
    assert cost.all_open_real() == sum(p.total for k, p in parts.items() if k != "init_cell")


@pytest.mark.parametrize("name", sorted(STATIC_ROUTES))
def test_static_routes_cost_exactly_their_cells_and_paths(make_network, name):
    layers = 6
    route = STATIC_ROUTES[name](layers)
    static = make_network(layers=layers, gate="fixed", route=route).eval()
    full = make_network(layers=layers, gate="fixed").eval()
    reference = full.cost_model(128, 64)
    want = reference.stem.total + reference.head.total
    want += sum(reference.decoder_levels[k].total
                for k in range(4) if any(s >= k for s in route.decoder_scales()))
    for node in route.cells:
        table = reference.nodes[node]
        if node[0] >= 0:
            want += table.cell.total
        paths = full.node(node).paths
        want += sum(f.total for p, f, counted in zip(paths, table.paths, table.counted, strict=True)
                    if counted and p in route.paths)
    assert static.cost_model(128, 64).all_open_real() == want
    with torch.no_grad():
        out = static(torch.randn(2, 3, 128, 64))
    assert torch.all(static.cost_model(128, 64).real(out.gates) == want)
    # parameters: only the route's cells and paths exist
    params = sum(p.numel() for p in static.parameters())
    shared = (full.stem, full.decoder, full.head)
    want_params = sum(p.numel() for m in shared for p in m.parameters())
    for node in route.cells:
        module = full.node(node)
        want_params += sum(p.numel() for p in module.cell.parameters())
        want_params += sum(p.numel() for path in route.paths_of(node)
                           for p in module.transforms[path.direction].parameters())
    assert params == want_params
