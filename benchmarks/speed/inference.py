"""(b) Inference with every path open (gates pinned): latency at batch 1 and images/s at the
throughput batch per case, timed in interleaved rounds, and the logits against fp32 eager."""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .common import (
    SEED,
    Clock,
    Device,
    Row,
    Sizes,
    compare,
    compile_blocks,
    compile_fn,
    count_ops,
    describe_error,
    dynamo_counts,
    graph_note,
    median_time,
    network_config,
    progress,
    skip_reason,
    tolerance,
)


@dataclass(frozen=True)
class InferCase:
    """How to run inference: precision, layout, compilation and which forward.

    compile: None, "whole" (torch.compile of the network's forward) or "blocks" (each stem,
    cell, gate, transform, decoder level and the head compiled; the routing stays eager).
    hard: the per-sample routing forward (`skip=True`); False runs the soft forward, a static
    graph that computes every path (equal to the hard one only while every path is open).
    """

    name: str
    autocast_bf16: bool = False
    bf16_weights: bool = False
    channels_last: bool = False
    compile: str | None = None
    mode: str | None = None
    hard: bool = True
    fold_bn: bool = False  # every BN folded into its conv (models/fusion.py)
    # then each folded conv → ReLU, and each cell's last conv + residual + ReLU, as one cuDNN
    # call (fusion.fuse_conv_relu)
    fuse_relu: bool = False
    cudnn_benchmark: bool = False
    graph: bool = False  # the (static) forward captured once per batch shape as a CUDA graph
    # Batch 1: the routing forward's pieces replayed as CUDA graphs (models/graphed_routing.py);
    # larger batches run the eager routing forward.
    row_graphs: bool = False
    cuda_only: bool = False
    optional: bool = False

    @property
    def bf16(self) -> bool:
        return self.autocast_bf16 or self.bf16_weights

INFER_BASELINE = InferCase("eager fp32 (baseline)")
INFER_CASES = (
    INFER_BASELINE,
    InferCase("bf16 autocast", autocast_bf16=True),
    InferCase("channels-last", channels_last=True),
    InferCase("bf16 autocast + channels-last", autocast_bf16=True, channels_last=True),
    InferCase("bf16 weights + channels-last", bf16_weights=True, channels_last=True),
    InferCase("bf16 w + CL + cudnn.benchmark", bf16_weights=True, channels_last=True,
              cudnn_benchmark=True, cuda_only=True),
    InferCase("folded BN + CL (default)", channels_last=True, fold_bn=True),
    # On the H200 channels-last alone was slower than NCHW at batch 1 (39.9 vs 35.8 ms), faster
    # on the H100 (52.9 vs 70.1): which layout the folded default should use is per card.
    InferCase("folded BN (NCHW)", fold_bn=True),
    InferCase("folded BN + bf16 w + CL + cudnn.bm", bf16_weights=True, channels_last=True,
              fold_bn=True, cudnn_benchmark=True, cuda_only=True),
    # (On a CPU nothing is captured: the pieces run eagerly, which checks their numerics.)
    InferCase("row graphs (b1) + folded BN + CL", channels_last=True, fold_bn=True,
              row_graphs=True),
    InferCase("row graphs (b1) + folded BN + bf16 w + CL", bf16_weights=True, channels_last=True,
              fold_bn=True, row_graphs=True),
    InferCase("row graphs (b1) + folded BN (NCHW)", fold_bn=True, row_graphs=True),
    InferCase("folded BN + conv·ReLU fused + CL", channels_last=True, fold_bn=True,
              fuse_relu=True),
    InferCase("row graphs (b1) + folded BN + conv·ReLU fused + CL", channels_last=True,
              fold_bn=True, fuse_relu=True, row_graphs=True),
    InferCase("compile blocks + bf16 w + CL", bf16_weights=True, channels_last=True,
              compile="blocks"),
    InferCase("static soft forward fp32", hard=False),
    # What removing every launch gap gives: the soft forward is static (every path computed),
    # so it replays as one graph; the per-sample routing forward waits for routes on the host.
    InferCase("static soft, CUDA graph, folded BN + bf16 w + CL", bf16_weights=True,
              channels_last=True, fold_bn=True, hard=False, graph=True, cuda_only=True),
    InferCase("static soft, compile + bf16 w + CL", bf16_weights=True, channels_last=True,
              compile="whole", hard=False),
    InferCase("static soft, compile reduce-overhead (CUDA graphs) + bf16 w + CL",
              bf16_weights=True, channels_last=True, compile="whole", mode="reduce-overhead",
              hard=False, cuda_only=True, optional=True),
    # Last: Dynamo breaks the graph at every routing decision (a host sync), so this compiles
    # many small graphs; it runs only when their estimated compile time fits.
    InferCase("compile whole forward fp32", compile="whole"),
)

# Seconds inductor needs per small graph (a guess for the skip decision, not a measurement).
SECONDS_PER_GRAPH = {"cuda": 1.0, "cpu": 2.5}


class InferRunner:
    """A copy of `net` converted and compiled as `case` says; calling it runs inference.

    The copy keeps the source's (pinned) gates; `self.net` is the copy, for pinning routes.
    """

    def __init__(self, net: nn.Module, case: InferCase, *, backend: str = "inductor") -> None:
        from dynroute.models.fusion import fold_batchnorm, fuse_conv_relu

        self.case = case
        if case.fuse_relu and not case.fold_bn:
            raise ValueError("conv·ReLU fusion works on a network with its BN folded")
        self.net = fold_batchnorm(net) if case.fold_bn else copy.deepcopy(net).eval()
        if case.fuse_relu:
            self.net = fuse_conv_relu(self.net)
        if case.bf16_weights:
            self.net = self.net.to(torch.bfloat16)
        if case.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device_type = next(self.net.parameters()).device.type
        self.forward: Callable = self.net
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}
        if case.graph and (case.hard or case.compile or case.autocast_bf16):
            raise ValueError("a CUDA graph case runs the static soft forward, eagerly built")
        self.row_graphs = None
        if case.row_graphs:
            from dynroute.models.graphed_routing import GraphedRouting

            if not case.hard or case.compile or case.autocast_bf16:
                raise ValueError("row graphs run the routing forward, eagerly built")
            self.row_graphs = GraphedRouting(self.net)
        if case.compile == "blocks":
            compile_blocks(self.net, backend=backend, mode=case.mode)
        elif case.compile == "whole":
            self.forward = compile_fn(self.net, backend=backend, mode=case.mode)

    def __call__(self, images: torch.Tensor):
        """RoutingOutput of the images (B, 3, H, W) float32."""
        x = images.to(torch.bfloat16) if self.case.bf16_weights else images
        if self.case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.case.graph:
            return self._replay(x)
        if self.row_graphs is not None and x.shape[0] == 1:
            return self.row_graphs(x)
        with torch.inference_mode(), torch.autocast(
                device_type=self.device_type, dtype=torch.bfloat16,
                enabled=self.case.autocast_bf16):
            return self.forward(x, skip=self.case.hard)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).logits.float().clone()  # clone: CUDA-graph outputs get overwritten

    def _replay(self, x: torch.Tensor):
        """The forward of `x` replayed from the graph captured for its shape (captured on the
        first call with that shape, after two warm-up calls on a side stream)."""
        key = tuple(x.shape)
        if key not in self.graphs:
            static = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    self.forward(static, skip=False)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                out = self.forward(static, skip=False)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        static.copy_(x)
        graph.replay()
        return out


def count_graphs(net: nn.Module, images: torch.Tensor, *, hard: bool) -> tuple[int, Counter]:
    """Graphs and graph-break reasons of one forward under Dynamo, without code generation."""
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    before = dynamo_counts()[1]
    traced = torch.compile(copy.deepcopy(net), backend=backend, dynamic=False)
    with torch.inference_mode():
        traced(images, skip=hard)
    return len(graphs), dynamo_counts()[1] - before


def _compile_estimate_skip(case: InferCase, net: nn.Module, images: torch.Tensor, sizes: Sizes,
                           device: Device, clock: Clock) -> str:
    """Why not to compile a graph-breaking forward now ("" to go ahead)."""
    if case.compile != "whole" or not case.hard or sizes.compile_backend != "inductor":
        return ""
    graphs, breaks = count_graphs(net, images, hard=case.hard)
    estimate = 2 * graphs * SECONDS_PER_GRAPH[device.torch.type]  # two batch sizes
    if estimate <= clock.section_left():
        return ""
    most = breaks.most_common(1)[0][0].splitlines()[0][:70] if breaks else "-"
    return (f"{graphs} graphs per forward ({sum(breaks.values())} graph breaks, most: {most}); "
            f"compiling ~{estimate:.0f}s > {max(0.0, clock.section_left()):.0f}s left")


def open_network(sizes: Sizes, device: Device) -> nn.Module:
    """The inference network from the fixed seed, every gate pinned open."""
    from dynroute.models import build_network
    from dynroute.models.gate import pin_gate

    torch.manual_seed(SEED)
    net = build_network(network_config(sizes, small_gate=False)).to(device.torch).eval()
    for node in net.nodes.values():
        pin_gate(node.gate, [True] * len(node.paths))
    return net


def inference_images(sizes: Sizes, device: Device, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return (torch.randn(batch, 3, *sizes.infer_size, generator=gen) * 50.0).to(device.torch)


def run_infer_case(case: InferCase, net: nn.Module, sizes: Sizes, device: Device, clock: Clock,
                   reference: torch.Tensor | None
                   ) -> tuple[Row, InferRunner | None, torch.Tensor | None]:
    """Build, warm up and check one case (its timing is `time_infer_cases`'s)."""
    row = Row("infer", case.name, note="" if case.hard else "static: every path computed")
    before = dynamo_counts()
    saved_benchmark = torch.backends.cudnn.benchmark
    device.reset_peak()
    one = inference_images(sizes, device, 1)
    batch = inference_images(sizes, device, sizes.infer_batch)
    try:
        skip = _compile_estimate_skip(case, net, one, sizes, device, clock)
        if skip:
            row.status = f"skipped: {skip}"
            return row, None, None
        torch.backends.cudnn.benchmark = case.cudnn_benchmark or saved_benchmark
        runner = InferRunner(net, case, backend=sizes.compile_backend)
        device.sync()
        start = time.perf_counter()
        logits = runner.logits(one)
        device.sync()
        row.first_s = time.perf_counter() - start
        runner(one)  # warm-up
        runner(batch)  # warm-up (and compile) at the throughput batch
        runner(batch)
        row.peak_mib = device.peak_mib()
        row.extra["ops"] = None if case.compile else count_ops(lambda: runner(one))
        ref = logits if reference is None else reference
        row.check = compare(logits, ref, tol=tolerance(case.bf16, device))
        if case.compile:
            row.note = "; ".join(filter(None, [row.note, graph_note(before)]))
        return row, runner, logits
    except Exception as err:
        row.status = f"failed: {describe_error(err)}"
        if case.compile:
            row.note = "; ".join(filter(None, [row.note, graph_note(before)]))
        return row, None, None
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark


def run_infer(sizes: Sizes, device: Device, clock: Clock, *, no_compile: bool
              ) -> tuple[list[Row], dict[str, InferRunner]]:
    net = open_network(sizes, device)
    cases = [c for c in INFER_CASES if device.cuda or not c.cuda_only]
    rows, runners, reference = [], {}, None
    timed: dict[str, tuple[Row, InferRunner]] = {}
    compile_estimate = sizes.compile_floor_s
    for i, case in enumerate(cases):
        skip = skip_reason(case.compile is not None, case.optional, i, clock, compile_estimate,
                            no_compile)
        if i > 0 and reference is None:
            skip = "the baseline failed"
        if skip:
            rows.append(Row("infer", case.name, status=f"skipped: {skip}"))
            continue
        progress(f"infer: {case.name}")
        row, runner, logits = run_infer_case(case, net, sizes, device, clock, reference)
        if i == 0:
            reference = logits
        if case.compile and row.first_s is not None:
            compile_estimate = max(compile_estimate, row.first_s)
        if runner is not None:
            timed[case.name] = (row, runner)
            if case.hard:
                runners[case.name] = runner  # candidates for the dynamic section
        rows.append(row)
    time_infer_cases(list(timed.values()), sizes, device, clock)
    return rows, runners


def time_infer_cases(timed: list[tuple[Row, InferRunner]], sizes: Sizes, device: Device,
                     clock: Clock) -> None:
    """Latency at batch 1 and throughput at the batch, in interleaved rounds over the cases:
    noise on the machine then hits every case alike (measured on a busy 2-core VM, back-to-back
    blocks of repeats ranked the same two cases differently from one run to the next)."""
    if not timed:
        return
    one = inference_images(sizes, device, 1)
    batch = inference_images(sizes, device, sizes.infer_batch)
    saved_benchmark = torch.backends.cudnn.benchmark
    ones: dict[str, list[float]] = {row.case: [] for row, _ in timed}
    batches: dict[str, list[float]] = {row.case: [] for row, _ in timed}
    try:
        def one_round() -> None:
            for row, runner in timed:
                torch.backends.cudnn.benchmark = runner.case.cudnn_benchmark or saved_benchmark
                ones[row.case].append(median_time(lambda r=runner: r(one), device, 1))
                batches[row.case].append(median_time(lambda r=runner: r(batch), device, 1))

        start = time.perf_counter()
        one_round()
        repeats = clock.repeats(sizes.infer_repeats, time.perf_counter() - start, 1)
        for _ in range(repeats - 1):
            one_round()
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    for row, _ in timed:
        row.repeats = len(ones[row.case])
        row.ms = statistics.median(ones[row.case]) * 1e3
        row.images_per_s = sizes.infer_batch / statistics.median(batches[row.case])
