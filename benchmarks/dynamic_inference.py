"""Does inference time follow the real FLOPs of the route taken? (docs/model.md §5, paper Eq. 5–6)

Forces routes through the real gates of one dynamic network (`pin_gate`) and measures, in one run,
each scenario's real-FLOPs ratio and latency ratio against every path open:

    all-open            every cell and path open
    no-up-down          every up/down path closed (cells still run, keep only)
    alternate-rows      every other row closed entirely (its cells skipped, inputs passed on)
    random-40           a random route near 40% of the all-open cost

Timings interleave the scenarios repeat by repeat and report medians, so machine noise hits all
of them alike. Exits 1 when a latency ratio is off its FLOPs ratio by more than --tolerance.

    python benchmarks/dynamic_inference.py                 # 512x1024, L=16, C0=64, CPU
    python benchmarks/dynamic_inference.py --smoke         # tiny, for CI
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from dynroute.models import DynamicRoutingNetwork, NetworkConfig, build_network
from dynroute.models.gate import pin_gate

Pinning = Callable[[DynamicRoutingNetwork], None]


def _pin_all(net: DynamicRoutingNetwork, decide: Callable[[tuple[int, int], str], bool]) -> None:
    for node in net.nodes.values():
        pin_gate(node.gate, [decide(node.node, p.direction) for p in node.paths])


def all_open(net: DynamicRoutingNetwork) -> None:
    _pin_all(net, lambda node, d: True)


def no_up_down(net: DynamicRoutingNetwork) -> None:
    _pin_all(net, lambda node, d: d == "keep")


def alternate_rows(net: DynamicRoutingNetwork) -> None:
    # Odd rows close every path; the last row stays open so every scale reaches the decoder.
    last = net.layers - 1
    _pin_all(net, lambda node, d: node[0] % 2 == 0 or node[0] == last)


def random_route(seed: int, p_open: float) -> Pinning:
    def pin(net: DynamicRoutingNetwork) -> None:
        rng = random.Random(seed)
        closed_cells = {n for n in net.route.cells if n[0] >= 0 and rng.random() > p_open}
        _pin_all(net, lambda node, d: node not in closed_cells and rng.random() < p_open)
    return pin


def real_flops(net: DynamicRoutingNetwork, pin: Pinning, images: torch.Tensor,
               size: tuple[int, int]) -> float:
    """Mean real FLOPs per image of the route `pin` forces, at the declared `size`."""
    pin(net)
    with torch.inference_mode():
        gates = net(images).gates
    return net.cost_model(*size).real(gates).mean().item()


def find_random_route(net: DynamicRoutingNetwork, probe: torch.Tensor, size: tuple[int, int],
                      full: float, target: float, tries: int = 40) -> tuple[Pinning, float]:
    """The random route (over seeds and open probabilities) whose cost is nearest target·full."""
    best: tuple[float, Pinning, float] | None = None
    for seed in range(tries):
        pin = random_route(seed, p_open=0.45 + 0.3 * (seed % 5) / 4)
        ratio = real_flops(net, pin, probe, size) / full
        if best is None or abs(ratio - target) < best[0]:
            best = (abs(ratio - target), pin, ratio)
    assert best is not None
    return best[1], best[2]


def time_forward(net: DynamicRoutingNetwork, images: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        net(images)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x1024", help="input HxW (default 512x1024)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="allowed |latency ratio / FLOPs ratio - 1| (default 0.15)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes to check the script runs (no tolerance check)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.layers, args.base_channels, args.repeats = "64x128", 4, 8, 1
    height, width = (int(v) for v in args.size.lower().split("x"))
    size = (height, width)
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = build_network(NetworkConfig(layers=args.layers, base_channels=args.base_channels))
    net = net.eval().to(device)
    images = torch.randn(args.batch, 3, height, width, device=device) * 50
    probe = images[:1, :, : min(height, 64), : min(width, 128)]

    full = real_flops(net, all_open, images, size)
    random_pin, _ = find_random_route(net, probe, size, full, target=0.4)
    scenarios: dict[str, Pinning] = {"all-open": all_open, "no-up-down": no_up_down,
                                     "alternate-rows": alternate_rows, "random-40": random_pin}
    flops = {name: real_flops(net, pin, images, size) for name, pin in scenarios.items()}

    times: dict[str, list[float]] = {name: [] for name in scenarios}
    for pin in scenarios.values():  # warm-up, one each
        pin(net)
        time_forward(net, images)
    total = args.repeats * len(scenarios)
    started = time.perf_counter()
    for r in range(args.repeats):
        for name, pin in scenarios.items():
            pin(net)
            times[name].append(time_forward(net, images))
        done = (r + 1) * len(scenarios)
        eta = (time.perf_counter() - started) / done * (total - done)
        print(f"  repeat {r + 1}/{args.repeats} done, ETA {eta:.0f}s", file=sys.stderr)

    latency = {name: statistics.median(t) for name, t in times.items()}
    print(f"dynamic inference on {device} ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}: {height}x{width}, batch {args.batch}, L={args.layers}, "
          f"C0={args.base_channels}, median of {args.repeats}")
    print(f"{'scenario':<16}{'GFLOPs':>9}{'FLOPs ratio':>13}{'ms':>10}{'latency ratio':>15}"
          f"{'lat/FLOPs':>11}")
    failed = []
    for name in scenarios:
        fr = flops[name] / flops["all-open"]
        lr = latency[name] / latency["all-open"]
        off = lr / fr - 1
        if abs(off) > args.tolerance:
            failed.append(name)
        print(f"{name:<16}{flops[name] / 1e9:>9.2f}{fr:>13.3f}{latency[name] * 1e3:>10.1f}"
              f"{lr:>15.3f}{lr / fr:>11.3f}")
    if args.smoke:
        print("smoke run: ratios not checked")
        return 0
    if failed:
        print(f"FAIL: latency does not follow FLOPs within {args.tolerance:.0%} for "
              f"{', '.join(failed)}")
        return 1
    print(f"PASS: every latency ratio is within {args.tolerance:.0%} of its FLOPs ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
