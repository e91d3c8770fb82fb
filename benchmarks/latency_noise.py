"""Latency and its noise: what another job on the CPU does to a measured latency, and whether
`dynroute profile`'s rule (platform/evaluate/disturbance.py) notices it.

One network (the embedded default's size, L=8, C0=16, at 256x512), one set of images, timed in
one run with `profile_latency` (warm-up, interleaved repeats, the median per image) under three
conditions, in turn:

    quiet      nothing else running (start it on an idle machine)
    one-hog    one other process spinning on one core
    all-hogs   one spinning process per core

For each it prints p50 / p90 over the images, the spread of the repeats, the cores other
processes kept busy, the two drifts, the verdict, and p50 as a multiple of the quiet p50. A
single attempt is taken (no re-measuring), and disturbed figures are kept, so that the table shows
what the rule would have recorded. The thread count is torch's default unless --threads.

    python benchmarks/latency_noise.py                  # a minute or two on a 2-core CPU
    python benchmarks/latency_noise.py --smoke          # seconds, for CI: runs, checks nothing
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from dynroute.models import NetworkConfig, build_network
from dynroute.platform.evaluate.disturbance import calibration_ms
from dynroute.platform.evaluate.latency import device_key, profile_latency

SPIN = "while True: pass"


def hogs(count: int) -> list[subprocess.Popen]:
    """`count` processes spinning on a core each (stopped by the caller, by process id)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def measure(network, images, *, repeats: int, warmup: int) -> dict:
    profile = profile_latency(network, images, warmup=warmup, repeats=repeats, attempts=1,
                              accept_disturbed=True)
    return {"p50": profile.p50_ms, "p90": profile.p90_ms, "spread": profile.spread,
            "busy": profile.busy_elsewhere, "calibration": profile.calibration_drift,
            "repeats": profile.repeat_drift, "disturbed": profile.disturbed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256x512", help="image HxW")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, channels = (8, 16)
    if args.smoke:
        args.size, args.images, args.repeats, args.warmup = "64x128", 2, 3, 1
        layers, channels = 4, 4
    height, width = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    network = build_network(NetworkConfig(layers=layers, base_channels=channels)).eval()
    images = [torch.randn(3, height, width) for _ in range(args.images)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"latency noise: L={layers}, C0={channels}, {args.images} images at {height}x{width}, "
          f"{args.warmup} warm-up, {args.repeats} interleaved repeats, one attempt; "
          f"{device_key('cpu')}, {cores} cores, torch {torch.__version__}")
    print(f"calibration workload before the hogs: {calibration_ms(torch.device('cpu')):.3f} ms")
    rows = {}
    for name, count in (("quiet", 0), ("one-hog", 1), ("all-hogs", cores)):
        started = hogs(count)
        try:
            time.sleep(0.5 if count else 0)  # let them reach full speed
            rows[name] = measure(network, images, repeats=args.repeats, warmup=args.warmup)
        finally:
            for process in started:
                process.kill()
                process.wait()
    quiet = rows["quiet"]["p50"]
    print(f"{'condition':<10}{'p50 ms':>10}{'p90 ms':>10}{'× quiet':>9}{'spread':>9}"
          f"{'busy cores':>12}{'calib drift':>13}{'repeat drift':>14}  verdict")
    for name, r in rows.items():
        print(f"{name:<10}{r['p50']:>10.2f}{r['p90']:>10.2f}{r['p50'] / quiet:>9.2f}"
              f"{r['spread']:>9.1%}{r['busy']:>12.2f}{r['calibration']:>13.2f}"
              f"{r['repeats']:>14.2f}  {'DISTURBED' if r['disturbed'] else 'undisturbed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
