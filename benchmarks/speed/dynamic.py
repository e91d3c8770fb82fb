"""(c) Dynamic savings: the scenarios of benchmarks/dynamic_inference.py pinned through the real
gates, their latency ratio against their real-FLOPs ratio, for the eager path and the fastest
per-sample-routing path of (b); and a check that mixed routes in one batch give what each image
gives alone."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .common import (
    BENCHMARKS,
    NUM_CLASSES,
    SEED,
    Clock,
    Device,
    Row,
    Sizes,
    compare,
    load_file,
    median_time,
)
from .inference import INFER_BASELINE, InferRunner, inference_images, open_network

DYNAMIC_TOLERANCE = 0.10  # latency ratio within 10% of the real-FLOPs ratio (the goal)


def count_host_waits(fn: Callable[[], object], device: Device) -> int | None:
    """How many times `fn` makes the host wait for the GPU (CUDA's sync debug mode flags each
    one); None on CPU, where nothing is asynchronous."""
    if not device.cuda:
        return None
    device.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def copy_pins(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the pinned gates of `source` (same architecture), so both take one route."""
    with torch.no_grad():
        for key, node in source.nodes.items():
            final_src = node.gate.features[-1]
            final_dst = target.nodes[key].gate.features[-1]
            final_dst.weight.copy_(final_src.weight)
            final_dst.bias.copy_(final_src.bias)

MIXED_CASE = "mixed routes in one batch vs each image alone (float64)"


def check_mixed_routes(device: Device) -> Row:
    """Per-sample routing on this device: a batch whose images take different routes must give
    each image what it gives alone (float64, so only a routing mistake can differ)."""
    from dynroute.models import NetworkConfig, build_network

    torch.manual_seed(SEED)
    net = build_network(NetworkConfig(layers=4, base_channels=8, num_classes=NUM_CLASSES))
    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for node in net.nodes.values():  # strong random gates, no bias: routes differ by image
            final = node.gate.features[-1]
            final.weight.copy_(torch.randn(final.weight.shape, generator=gen) * 3)
            final.bias.zero_()
    net = net.double().to(device.torch).eval()
    images = (torch.randn(6, 3, 64, 96, generator=gen) * 30
              + torch.randn(6, 3, 1, 1, generator=gen) * 60).double().to(device.torch)
    with torch.inference_mode():
        batched = net(images)
        alone = torch.cat([net(images[i:i + 1]).logits for i in range(len(images))])
    routes = {tuple(bool(v) for n in sorted(batched.gates) for v in batched.gates[n][i] > 1e-4)
              for i in range(len(images))}
    return Row("dynamic", MIXED_CASE, check=compare(batched.logits, alone, tol=1e-9),
               note=f"{len(routes)} distinct routes among {len(images)} images")


def run_dynamic(sizes: Sizes, device: Device, clock: Clock, candidates: dict[str, InferRunner],
                infer_rows: list[Row]) -> list[Row]:
    scenarios_mod = load_file("_gpu_bench_dynamic_inference", BENCHMARKS / "dynamic_inference.py")
    net = open_network(sizes, device)
    size = sizes.infer_size
    images = inference_images(sizes, device, 1)
    probe = images[:, :, : min(size[0], 64), : min(size[1], 128)]
    full = scenarios_mod.real_flops(net, scenarios_mod.all_open, images, size)
    random_pin, _ = scenarios_mod.find_random_route(net, probe, size, full, target=0.4)
    scenarios = {"all-open": scenarios_mod.all_open, "no-up-down": scenarios_mod.no_up_down,
                 "alternate-rows": scenarios_mod.alternate_rows, "random-40": random_pin}
    flops = {name: scenarios_mod.real_flops(net, pin, images, size)
             for name, pin in scenarios.items()}

    paths: dict[str, InferRunner] = {INFER_BASELINE.name: InferRunner(net, INFER_BASELINE)}
    best = _best_routing_path(infer_rows, candidates)
    if best is not None:
        paths[best] = candidates[best]
    cost = net.cost_model(*size)
    rows: list[Row] = [check_mixed_routes(device)]
    waits: dict[tuple[str, str], int | None] = {}
    for name, pin in scenarios.items():  # route check and warm-up (compiles new routes)
        pin(net)
        for path, runner in paths.items():
            copy_pins(net, runner.net)
            real = cost.real(runner(images).gates).mean().item()
            runner(images)
            waits[path, name] = count_host_waits(lambda r=runner: r(images), device)
            if abs(real - flops[name]) > 1e-6 * flops[name]:
                rows.append(Row("dynamic", f"{path} / {name}",
                                status=f"failed: took another route ({real:.3g} vs "
                                       f"{flops[name]:.3g} FLOPs)"))
    per_run = median_time(lambda: paths[INFER_BASELINE.name](images), device, 1)
    repeats = clock.repeats(sizes.infer_repeats, per_run * len(paths) * len(scenarios), 1)
    times: dict[tuple[str, str], list[float]] = {(p, s): [] for p in paths for s in scenarios}
    for _ in range(repeats):  # interleaved, so machine noise hits every scenario alike
        for name, pin in scenarios.items():
            pin(net)
            for path, runner in paths.items():
                copy_pins(net, runner.net)
                times[path, name].append(median_time(lambda r=runner: r(images), device, 1))
    for path in paths:
        base_ms = statistics.median(times[path, "all-open"]) * 1e3
        for name in scenarios:
            ms = statistics.median(times[path, name]) * 1e3
            flops_ratio = flops[name] / flops["all-open"]
            latency_ratio = ms / base_ms
            follows = latency_ratio / flops_ratio
            rows.append(Row("dynamic", f"{path} / {name}", ms=ms, repeats=repeats, extra={
                "path": path, "scenario": name, "gflops": flops[name] / 1e9,
                "flops_ratio": flops_ratio, "latency_ratio": latency_ratio,
                "latency_over_flops": follows, "host_waits": waits[path, name],
                "within_tolerance": abs(follows - 1) <= DYNAMIC_TOLERANCE}))
    return rows


def _best_routing_path(infer_rows: list[Row], candidates: dict[str, InferRunner]) -> str | None:
    """The fastest per-sample-routing inference path at batch 1 that passed its check."""
    fastest = [r for r in infer_rows if r.case in candidates and r.case != INFER_BASELINE.name
               and r.ms is not None and r.check is not None and r.check.ok]
    return min(fastest, key=lambda r: r.ms).case if fastest else None  # type: ignore[arg-type]
