import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynroute.models.layers import add_scaled


class _CountOps(TorchDispatchMode):
    """Counts the aten operators run inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _inputs(dtype=torch.float32):
    torch.manual_seed(0)
    into = torch.randn(3, 4, 5, 6, requires_grad=True)
    a = torch.rand(3, 1, 1, 1, requires_grad=True)
    t = torch.randn(3, 4, 5, 6, dtype=dtype, requires_grad=True)
    return into, a, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_scaled_has_the_values_and_gradients_of_the_plain_formula(dtype):
    into, a, t = _inputs(dtype)
    weight = torch.randn(3, 4, 5, 6)
    fused = add_scaled(into, a, t)
    grads = torch.autograd.grad((fused * weight).sum(), (into, a, t))
    plain = into + a * t
    expected = torch.autograd.grad((plain * weight).sum(), (into, a, t))
    torch.testing.assert_close(fused, plain)
    for g, e in zip(grads, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e)
    assert torch.equal(add_scaled(None, a, t), a * t)
    with torch.no_grad():  # inference: the same sum without an autograd Function
        torch.testing.assert_close(add_scaled(into, a, t), plain)


def test_add_scaled_is_one_pass_forward_and_no_more_backward_than_the_plain_formula():
    into, a, t = _inputs()
    counts = {}
    for name, fn in (("fused", add_scaled), ("plain", lambda i, s, x: i + s * x)):
        with _CountOps() as forward:
            y = fn(into, a, t)
        with _CountOps() as backward:
            y.sum().backward()
        counts[name] = (forward.ops, backward.ops.count("mul"))
    assert counts["fused"][0] == ["addcmul"] and counts["plain"][0] == ["mul", "add"]
    assert counts["fused"][1] <= counts["plain"][1]  # torch's addcmul backward has one more
