"""The piece-wise routing forward (what CUDA graphs replay) equals the hard forward.

A CPU captures no graph, but it runs every piece through the same fixed buffers, in the same
order, with the same keys: these tests compare that with `network(x, skip=True)` bit for bit,
over routes that open, close and pass nodes through, and that change from call to call.
"""

import random

import pytest
import torch

from dynroute.models import NetworkConfig, build_network
from dynroute.models.gate import pin_gate
from dynroute.models.graphed_routing import GraphedRouting


def _network(**config):
    torch.manual_seed(0)
    return build_network(NetworkConfig(layers=4, base_channels=4, num_classes=3,
                                       **config)).eval()


def _pin_random(net, rng: random.Random, p_open: float) -> None:
    for node in net.nodes.values():
        pin_gate(node.gate, [rng.random() < p_open for _ in node.paths])


def _same(graphed, net, image):
    with torch.inference_mode():
        want = net(image, skip=True)
    got = graphed(image)
    assert torch.equal(got.logits, want.logits)
    assert got.gates.keys() == want.gates.keys()
    for node, alpha in want.gates.items():
        assert torch.equal(got.gates[node], alpha), node


@pytest.mark.parametrize("p_open", [1.0, 0.6, 0.3])
def test_pieces_equal_the_hard_forward_over_changing_routes(p_open):
    net = _network()
    graphed = GraphedRouting(net, capture=False)
    rng = random.Random(int(p_open * 10))
    image = torch.randn(1, 3, 64, 96) * 50.0
    for _ in range(6):  # the routes change between calls: new pieces, and pieces met before
        _pin_random(net, rng, p_open)
        _same(graphed, net, image)
    assert not graphed.captured


def test_natural_gates_and_a_new_image_size():
    """Unpinned gates decide per image; a new size starts over with new buffers."""
    net = _network(psp=True)
    graphed = GraphedRouting(net, capture=False)
    for shape in ((1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 96, 128)):
        _same(graphed, net, torch.randn(*shape) * 50.0)


def test_outputs_are_the_fixed_buffers():
    net = _network()
    graphed = GraphedRouting(net, capture=False)
    first = graphed(torch.randn(1, 3, 64, 64) * 50.0).logits
    kept = first.clone()
    second = graphed(torch.randn(1, 3, 64, 64) * 50.0).logits
    assert second.data_ptr() == first.data_ptr() and not torch.equal(second, kept)


def test_rejects_batches_training_mode_and_capture_on_cpu():
    net = _network()
    graphed = GraphedRouting(net, capture=False)
    with pytest.raises(ValueError, match="one image"):
        graphed(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedRouting(net, capture=True)
    with pytest.raises(ValueError, match="eval mode"):
        GraphedRouting(net.train())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_pieces_equal_the_hard_forward_on_cuda():
    net = _network().cuda()
    graphed = GraphedRouting(net)
    rng = random.Random(3)
    image = torch.randn(1, 3, 64, 96, device="cuda") * 50.0
    for _ in range(8):  # new routes capture new pieces; repeated ones replay
        _pin_random(net, rng, 0.6)
        for _ in range(2):
            with torch.inference_mode():
                want = net(image, skip=True)
            got = graphed(image)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert graphed.captured > 0
