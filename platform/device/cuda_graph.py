"""A training step replayed as one CUDA graph, and the SGD update such a graph can hold.

Why: profiled (`benchmarks/gpu_profile.py`; benchmarks/README.md, "On an H200"), the eager step
keeps the GPU busy for less than half its time: the rest of the time the GPU waits for the host,
which launches thousands of operators a step. Replaying the captured step launches them all at
once.

A capture records the kernels a call launches, with the addresses they read and write, and runs
nothing; each replay runs them again on whatever those addresses hold. So the step must:

- read its inputs from fixed tensors (the caller copies each batch into them);
- never read a device value on the host (no `.item()`, no `if tensor:`), which a capture refuses;
- take every number that changes between steps from a device tensor: a Python number is frozen
  into the captured kernels. torch's SGD takes the learning rate as a Python number, hence
  `sgd_update`, the same update reading each group's lr from a 0-d tensor;
- launch the same work every step (true of the soft training forward: every path computed).

This module needs nothing but torch, so `benchmarks/gpu_bench.py` measures the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_CALLS = 3  # eager calls before the capture: cuDNN, autograd and momentum buffers set up


class GraphedStep:
    """Calls `body` (no arguments; it returns a tensor) eagerly for the first `warmup` calls,
    then captures it once and replays the capture on every later call.

    The capture runs nothing, so the call that captures replays right after: every call runs
    `body`'s work exactly once. The returned tensor is the graph's output, overwritten by the
    next replay: use or copy it before calling again. On a CPU `body` runs eagerly every call.
    If the capture fails, `fallback` holds the reason and every later call runs eagerly.
    """

    def __init__(self, body: Callable[[], torch.Tensor], device: torch.device, *,
                 warmup: int = WARMUP_CALLS) -> None:
        self.body = body
        self.device = device
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.fallback: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.output
        if self.device.type != "cuda" or self.fallback is not None:
            return self.body()
        if self.calls <= self.warmup:
            return self._side_stream_call()
        try:
            self._capture()
        except Exception as err:  # a capture that fails leaves the step to run eagerly
            self.graph, self.output = None, None
            self.fallback = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
            torch.cuda.synchronize(self.device)
            return self.body()
        self.graph.replay()
        return self.output

    def _side_stream_call(self) -> torch.Tensor:
        """One eager call on a side stream, as capture requires of the calls before it (so that
        lazily created state, like cuDNN's handles, lives outside the capture)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = self.body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)  # a few warm-up calls: safety over overlap
        return out

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        # The eager calls' cached blocks would sit beside the graph's own pool: hand them back.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.body()
        self.graph, self.output = graph, output


def sgd_unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why `sgd_update` cannot stand in for `optimizer.step()` (None when it can)."""
    if type(optimizer) is not torch.optim.SGD:
        return f"the optimizer is {type(optimizer).__name__}, not SGD"
    for i, group in enumerate(optimizer.param_groups):
        if group.get("nesterov") or group.get("maximize") or group.get("dampening", 0.0):
            return f"parameter group {i} uses nesterov, maximize or dampening"
        if group["momentum"] <= 0:
            return f"parameter group {i} has no momentum"
    return None


def sgd_update(optimizer: torch.optim.SGD, lrs: list[torch.Tensor]) -> None:
    """`optimizer.step()` for SGD with momentum (no dampening or Nesterov), each group's lr read
    from `lrs` (0-d tensors on the parameters' device) instead of `group["lr"]`.

    The momentum buffers are the optimizer's own state, so checkpoints and a later eager
    `optimizer.step()` see the same optimizer. The first call creates them as torch does
    (buffer = gradient + decay); a capture must come after it.
    """
    with torch.no_grad():
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in buffers):
                buffers = []
                for p, g in zip(params, grads, strict=True):
                    state = optimizer.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = g.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    buffers.append(state["momentum_buffer"])
            else:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
            torch._foreach_sub_(params, torch._foreach_mul(buffers, lr))
