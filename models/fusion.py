"""Batch-norm folding for inference: each conv → BN pair becomes one conv with a bias.

In eval mode a BN layer is a fixed affine map per channel, so a conv followed by it is one conv:

    s  = γ / √(σ² + ε)                    # (C_out,), from the running statistics
    W' = s · W                            # scaled per output channel
    b' = s · (b − μ) + β                  # b = 0 for our bias-free convs

Every BN of the network follows a conv (`layers.conv_bn`), so folding removes them all: one
kernel and one pass over the activations fewer each. The folded copy serves inference only; it
has no batch statistics left to train.

The cost model keeps counting the network the paper describes: a `FoldedConv2d` counts as its conv
plus the BN it absorbed, and the `nn.Identity` left in the BN's place counts nothing, so cost
tables (and the real GFLOPs users see) do not change with folding. The Sequentials keep their
length, so indexing into them (`gate.features[-1]`, `levels[k][0]`) still finds the same layers.

`fuse_conv_relu` goes one step further on a folded copy, with cuDNN's fused kernels on CUDA:

    folded conv → ReLU                  one `FusedConvReLU`: conv + bias + ReLU, one launch and one
                                        pass over the output instead of two
    cell: ReLU(last conv(·) + X)        one conv + bias + residual + ReLU (`ResidualReLUCell`),
                                        what every node's transforms read: one launch and one pass
                                        instead of three (`cudnn_convolution_add_relu`)

On other devices both run the conv, the sum and the ReLU as before, so a CPU checks the rewrite,
not the fused kernels. Not a default: their GPU speed is unmeasured.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .cell import Cell


class FoldedConv2d(nn.Conv2d):
    """A conv with the BN that followed it folded into its weight and bias."""


class FusedConvReLU(FoldedConv2d):
    """ReLU(folded conv(x)): one cuDNN conv + bias + ReLU call on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.padding_mode == "zeros":
            return torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride,
                                                self.padding, self.dilation, self.groups)
        return F.relu(super().forward(x))


class ResidualReLUCell(Cell):
    """A folded cell whose ReLU(H) = ReLU(last conv(·) + X) is one cuDNN call on CUDA; H alone
    (`relu=False`) is computed as by `Cell`. Inference only: no drop path."""

    def forward(self, x: torch.Tensor, progress: float = 0.0, *,
                relu: bool = False) -> torch.Tensor:
        *body, last, _ = self.op  # the last folded conv, then the identity its BN left
        if not (relu and x.is_cuda and last.padding_mode == "zeros"):
            return super().forward(x, progress, relu=relu)  # elsewhere: conv, sum, ReLU
        y = x
        for layer in body:
            y = layer(y)
        return torch.cudnn_convolution_add_relu(y, last.weight, x, 1.0, last.bias, last.stride,
                                                last.padding, last.dilation, last.groups)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> FoldedConv2d:
    """One conv equal to `bn(conv(x))` with `bn` in eval mode (computed in float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BN layer without running statistics "
                         "(track_running_stats=False)")
    weight = conv.weight
    folded = FoldedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                          device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()  # (C_out,)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - bn.running_mean.double()) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        folded.weight.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
        folded.bias.copy_(bias)
    return folded


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """An inference copy of `network` (in eval mode) with every conv → BN pair folded.

    The pairs are found inside `nn.Sequential`s, where all of ours are built; `network` itself is
    not changed. BN layers that do not directly follow a conv stay.
    """
    folded = copy.deepcopy(network).eval()
    for block in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(block)):
            conv, bn = block[i - 1], block[i]
            if (isinstance(conv, nn.Conv2d) and not isinstance(conv, FoldedConv2d)
                    and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
                block[i - 1] = fold_conv_bn(conv, bn)
                block[i] = nn.Identity()
    return folded


def has_batchnorm(network: nn.Module) -> bool:
    """Whether any BN layer is left (a folded network has none)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


def fuse_conv_relu(folded: nn.Module) -> nn.Module:
    """An inference copy of a folded network (`fold_batchnorm`) with every folded conv →
    (identity left by its BN) → ReLU run as one `FusedConvReLU`, and every cell ending in a
    folded conv run as a `ResidualReLUCell`. The ReLU's place becomes an identity and the cells
    keep their layers, so the Sequentials keep their length and the cost model counts the same."""
    if has_batchnorm(folded):
        raise ValueError("fuse_conv_relu needs a network with its BN folded (fold_batchnorm)")
    fused = copy.deepcopy(folded).eval()
    for cell in [m for m in fused.modules() if type(m) is Cell]:
        if (len(cell.op) >= 2 and type(cell.op[-2]) is FoldedConv2d
                and type(cell.op[-1]) is nn.Identity):
            cell.__class__ = ResidualReLUCell  # same layers and state, fused forward (a copy)
    for block in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        for i in range(2, len(block)):
            conv, gap, relu = block[i - 2], block[i - 1], block[i]
            if (type(conv) is FoldedConv2d and type(gap) is nn.Identity
                    and type(relu) is nn.ReLU):
                block[i - 2] = _fused(conv)
                block[i] = nn.Identity()
    return fused


def _fused(conv: FoldedConv2d) -> FusedConvReLU:
    fused = FusedConvReLU(conv.in_channels, conv.out_channels, conv.kernel_size,
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                          device="meta")
    # the conv's own tensors, copied with their device, dtype and memory format (channels-last)
    fused.weight = nn.Parameter(conv.weight.detach().clone(), conv.weight.requires_grad)
    fused.bias = nn.Parameter(conv.bias.detach().clone(), conv.bias.requires_grad)
    return fused
