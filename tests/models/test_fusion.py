"""BN folding computes what the network with its BN layers computes, and costs what it costs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dynroute.models.cell import CELL_OPS, Cell
from dynroute.models.fusion import (
    FoldedConv2d,
    FusedConvReLU,
    ResidualReLUCell,
    fold_batchnorm,
    fold_conv_bn,
    fuse_conv_relu,
    has_batchnorm,
)

from .conftest import tiny_network


def trained_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN running statistics and affine values far from their initial ones."""
    g = torch.Generator().manual_seed(seed)
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            trained_statistics_bn(bn, g)
    with torch.no_grad():
        for node in net.nodes.values():  # gates that close some paths, per image
            final = getattr(node.gate, "features", [None])[-1]
            if isinstance(final, nn.Conv2d):
                final.weight.copy_(torch.randn(final.weight.shape, generator=g) * 3)
                final.bias.zero_()
    return net


@pytest.mark.parametrize("kernel,groups,bias", [(1, 1, False), (3, 4, False), (3, 1, True)])
def test_a_folded_conv_equals_conv_then_bn(kernel, groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, padding=kernel // 2, groups=groups, bias=bias)
    bn = trained_statistics_bn(nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 8, 9, 11)
    folded = fold_conv_bn(conv, bn)
    assert isinstance(folded, FoldedConv2d) and folded.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def trained_statistics_bn(bn: nn.BatchNorm2d,
                          generator: torch.Generator | None = None) -> nn.BatchNorm2d:
    """One BN with running statistics and affine values far from their initial ones."""
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5, generator=generator)
        bn.running_var.uniform_(0.3, 3.0, generator=generator)
        bn.weight.uniform_(0.5, 1.5, generator=generator)
        bn.bias.normal_(0.0, 0.3, generator=generator)
    return bn


def test_a_bn_without_running_statistics_is_refused():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(4, 4, 1, bias=False), bn)


@pytest.mark.parametrize("cell", sorted(CELL_OPS))
@pytest.mark.parametrize("psp", [False, True])
def test_the_folded_network_computes_the_same_logits_gates_and_routes(cell, psp, images):
    net = trained_statistics(tiny_network(cell=cell, psp=psp, small_gate=True)).eval()
    before = copy.deepcopy(net.state_dict())
    folded = fold_batchnorm(net)
    assert has_batchnorm(net) and not has_batchnorm(folded)
    assert not folded.training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items()), \
        "folding works on a copy"
    with torch.inference_mode():
        for skip in (False, True):  # soft (every path) and hard (per-sample routing) forwards
            plain, fast = net(images, skip=skip), folded(images, skip=skip)
            scale = plain.logits.abs().max()
            torch.testing.assert_close(fast.logits / scale, plain.logits / scale,
                                       rtol=0, atol=1e-5)
            for node, alpha in plain.gates.items():
                torch.testing.assert_close(fast.gates[node], alpha, rtol=1e-3, atol=1e-5)
                assert torch.equal(fast.gates[node] > 1e-4, alpha > 1e-4), f"route at {node}"
    closed = sum(int((a <= 1e-4).sum()) for a in plain.gates.values())
    assert closed > 0, "the check needs closed paths"


def test_folding_leaves_the_cost_tables_as_they_were():
    net = trained_statistics(tiny_network(psp=True, small_gate=True)).eval()
    folded = fold_batchnorm(net)
    assert any(isinstance(m, FoldedConv2d) for m in folded.modules())
    for height, width in ((64, 96), (1024, 2048)):
        assert folded.cost_model(height, width) == net.cost_model(height, width)


def test_a_fixed_route_network_folds_too(make_network, images):
    net = trained_statistics(make_network(gate="fixed")).eval()
    folded = fold_batchnorm(net)
    assert not has_batchnorm(folded)
    with torch.inference_mode():
        plain, fast = net(images).logits, folded(images).logits
    assert (fast - plain).abs().max() / plain.abs().max() < 1e-5


def _relu_after_folded_conv(net: nn.Module) -> int:
    """Folded conv → identity → ReLU triples left unfused."""
    count = 0
    for block in (m for m in net.modules() if isinstance(m, nn.Sequential)):
        for i in range(2, len(block)):
            count += (type(block[i - 2]) is FoldedConv2d and type(block[i - 1]) is nn.Identity
                      and type(block[i]) is nn.ReLU)
    return count


@pytest.mark.parametrize("cell", sorted(CELL_OPS))
def test_conv_relu_fusion_computes_and_costs_what_the_folded_network_does(cell, images):
    folded = fold_batchnorm(trained_statistics(tiny_network(cell=cell, psp=True,
                                                            small_gate=True)).eval())
    fused = fuse_conv_relu(folded)
    assert _relu_after_folded_conv(folded) > 0
    assert _relu_after_folded_conv(fused) == 0, "every conv → BN → ReLU is fused"
    relus = sum(type(m) is nn.ReLU for m in folded.modules())
    fused_convs = sum(type(m) is FusedConvReLU for m in fused.modules())
    assert sum(type(m) is nn.ReLU for m in fused.modules()) == relus - fused_convs
    assert sum(type(m) is FoldedConv2d for m in folded.modules()) == fused_convs + sum(
        type(m) is FoldedConv2d for m in fused.modules()), "the other folded convs stay"
    cells = sum(type(m) is Cell for m in folded.modules())
    assert cells > 0 and sum(type(m) is Cell for m in fused.modules()) == 0
    assert sum(type(m) is ResidualReLUCell for m in fused.modules()) == cells
    with torch.inference_mode():
        for skip in (False, True):
            plain, fast = folded(images, skip=skip), fused(images, skip=skip)
            assert torch.equal(fast.logits, plain.logits)  # on a CPU: the same conv, then ReLU
    for height, width in ((64, 96), (1024, 2048)):
        assert fused.cost_model(height, width) == folded.cost_model(height, width)


@pytest.mark.parametrize("cell", sorted(CELL_OPS))
def test_a_fused_cell_computes_h_and_relu_h(cell):
    net = fold_batchnorm(trained_statistics(tiny_network(cell=cell)).eval())
    plain = net.node((0, 0)).cell
    fused = fuse_conv_relu(net).node((0, 0)).cell
    assert type(fused) is ResidualReLUCell
    x = torch.randn(2, plain.op[0].in_channels, 16, 16)
    with torch.inference_mode():
        h = plain(x)
        assert torch.equal(fused(x), h)
        assert torch.equal(fused(x, relu=True), torch.relu(h))
        assert (h < 0).any(), "the ReLU has something to do"


def test_conv_relu_fusion_keeps_the_weights_layout():
    folded = fold_batchnorm(tiny_network().eval()).to(memory_format=torch.channels_last)
    fused = fuse_conv_relu(folded)
    convs = [m for m in fused.modules() if type(m) is FusedConvReLU]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         for m in convs if m.weight.shape[-1] > 1 or m.weight.shape[1] > 1)


def test_conv_relu_fusion_needs_folded_batchnorm():
    with pytest.raises(ValueError, match="fold_batchnorm"):
        fuse_conv_relu(tiny_network())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cudnn_fused_conv_relu_equals_conv_then_relu_on_a_gpu(images):
    folded = fold_batchnorm(trained_statistics(tiny_network(small_gate=True)).eval()).cuda()
    fused = fuse_conv_relu(folded)
    x = images.cuda()
    with torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):
            a = folded.to(memory_format=layout)(x.to(memory_format=layout)).logits
            b = fused.to(memory_format=layout)(x.to(memory_format=layout)).logits
            assert ((b - a).abs().max() / a.abs().max()).item() < 1e-3
