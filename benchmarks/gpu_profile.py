"""Where the device time of the dynamic routing network goes: one command, PyTorch only.

gpu_bench.py says how fast each case is; this script says why, for the cases worth speeding up:

    infer   batch-1 inference at every path open, for the eager baseline and the fast paths: wall
            time per forward, kernel time per forward and their ratio (the share of the wall time
            the device computes; the rest is the host launching work or waiting for routes), the
            top operators by device time, and the convolutions split into depthwise, 1x1 and
            dense kxk
    graph   the static soft forward captured as one CUDA graph against the same forward launched
            eagerly: what removing every launch gap gains (CUDA only)
    train   one training step (soft forward, losses, backward, clipping, SGD) likewise, with the
            backward's operators apart from the forward's

Sizes are gpu_bench.py's: the issue's (L=16, C0=64, 1024x2048 / batch 8 of 768x768) on CUDA, small
on CPU, tiny with --smoke. The profiler's operator names are ATen's; kernel time is attributed to
the operator that launched it. On a CPU there are no kernels, so "device time" is the operators'
own CPU time and the busy share is not printed.

    python benchmarks/gpu_profile.py                 # auto device
    python benchmarks/gpu_profile.py --smoke --device cpu --json /tmp/profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from speed import common, inference, training

SECTIONS = ("infer", "graph", "train")
TOP = 14  # operators listed per profile
PROFILED_CALLS = 3
TIMED_CALLS = 10


def _device_time(event) -> float:
    """Microseconds of device time of a profiler event (own kernels only), whatever the torch
    version calls it; on a CPU run, the event's own CPU time."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def conv_kind(weight_shape: list[int]) -> str:
    """'depthwise kxk', '1x1' or 'dense kxk' from a conv weight's shape (C_out, C_in/g, kh, kw)."""
    if len(weight_shape) != 4:
        return "conv ?"
    _, per_group, kh, kw = weight_shape
    if per_group == 1 and kh * kw > 1:
        return f"depthwise {kh}x{kw}"
    return "1x1" if kh == kw == 1 else f"dense {kh}x{kw}"


# ATen operators whose input list holds the conv weight at this index.
_CONV_WEIGHT_ARG = {"aten::convolution": 1, "aten::convolution_backward": 2}


def summarize(prof, calls: int, *, cuda: bool) -> dict:
    """Per-call device time by operator and the convolutions by kind, from a profile of
    `calls` calls."""
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kernels = 0.0
    for event in prof.key_averages():
        if cuda and event.device_type != torch.autograd.DeviceType.CPU:
            kernels += _device_time(event)  # the kernels themselves
            continue
        spent = _device_time(event) if cuda else float(event.self_cpu_time_total)
        if spent > 0:
            by_op[event.key][0] += spent
            by_op[event.key][1] += event.count
    convs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        index = _CONV_WEIGHT_ARG.get(event.name)
        if index is None or len(event.input_shapes) <= index:
            continue
        direction = "bwd" if event.name.endswith("backward") else "fwd"
        spent = (getattr(event, "device_time_total", None) or 0.0) if cuda \
            else float(event.cpu_time_total)
        key = f"{conv_kind(event.input_shapes[index])} {direction}"
        convs[key][0] += spent
        convs[key][1] += 1
    total = sum(v[0] for v in by_op.values())
    return {
        "device_ms_per_call": (kernels if cuda else total) / 1e3 / calls,
        "ops": sorted(([k, v[0] / 1e3 / calls, v[1] / calls] for k, v in by_op.items()),
                      key=lambda r: -r[1]),
        "convs": sorted(([k, v[0] / 1e3 / calls, v[1] / calls] for k, v in convs.items()),
                        key=lambda r: -r[1]),
    }


def profile_calls(fn: Callable[[], object], device, calls: int = PROFILED_CALLS) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda else [])
    device.sync()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        device.sync()
    return summarize(prof, calls, cuda=device.cuda)


def wall_ms(fn: Callable[[], object], device, calls: int = TIMED_CALLS) -> float:
    return common.median_time(fn, device, calls) * 1e3


def report(title: str, wall: float, summary: dict, cuda: bool) -> None:
    device_ms = summary["device_ms_per_call"]
    busy = f", device busy {device_ms / wall:.0%} of it" if cuda else ""
    print(f"\n{title}\n  wall {wall:.2f} ms per call; {'kernels' if cuda else 'operators'} "
          f"{device_ms:.2f} ms{busy}")
    print(f"  {'operator':44} {'ms/call':>8} {'share':>6} {'calls':>6}")
    for name, ms, count in summary["ops"][:TOP]:
        print(f"  {name[:44]:44} {ms:8.3f} {ms / max(device_ms, 1e-9):6.1%} {count:6.0f}")
    if summary["convs"]:
        print(f"  {'convolutions (incl. their layout copies)':44} {'ms/call':>8} {'share':>6} "
              f"{'calls':>6}")
        for name, ms, count in summary["convs"]:
            print(f"  {name[:44]:44} {ms:8.3f} {ms / max(device_ms, 1e-9):6.1%} {count:6.0f}")


INFER_CASES = ("eager fp32 (baseline)", "folded BN + CL (default)",
               "folded BN + bf16 w + CL + cudnn.bm")


def run_infer(sizes, device) -> dict:
    net = inference.open_network(sizes, device)
    one = inference.inference_images(sizes, device, 1)
    results = {}
    for case in inference.INFER_CASES:
        if case.name not in INFER_CASES or (case.cuda_only and not device.cuda):
            continue
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = case.cudnn_benchmark or saved
        try:
            runner = inference.InferRunner(net, case, backend=sizes.compile_backend)
            for _ in range(3):
                runner(one)  # warm-up (cuDNN's algorithm search with cudnn.benchmark)
            wall = wall_ms(lambda r=runner: r(one), device)
            summary = profile_calls(lambda r=runner: r(one), device)
        finally:
            torch.backends.cudnn.benchmark = saved
        report(f"(infer) {case.name}: batch 1, {sizes.infer_size[0]}x{sizes.infer_size[1]}, "
               "every path open", wall, summary, device.cuda)
        results[case.name] = {"wall_ms": wall, **summary}
        del runner
        device.reset_peak()
    return results


def run_graph(sizes, device) -> dict:
    """The static soft forward (folded BN, channels-last, fp32) eager vs replayed as one CUDA
    graph: the gap is what the host's launches cost at batch 1."""
    if not device.cuda:
        print("\n(graph) skipped: CUDA graphs need a CUDA device")
        return {}
    net = inference.open_network(sizes, device)
    one = inference.inference_images(sizes, device, 1)
    runners = {}
    for graph in (False, True):
        case = inference.InferCase("static soft, folded BN + CL", channels_last=True, fold_bn=True,
                               hard=False, graph=graph)
        runners[graph] = inference.InferRunner(net, case)
    eager_logits, graph_logits = (runners[g].logits(one) for g in (False, True))
    diff = ((graph_logits - eager_logits).abs().max() / eager_logits.abs().max()).item()
    eager = wall_ms(lambda: runners[False](one), device)
    replay = wall_ms(lambda: runners[True](one), device)
    print(f"\n(graph) static soft forward, folded BN + CL fp32, batch 1: eager {eager:.2f} ms, "
          f"one CUDA graph {replay:.2f} ms ({eager / replay:.2f}x); logits max |Δ| / max |ref| "
          f"{diff:.1e}")
    return {"eager_ms": eager, "graph_ms": replay, "rel_diff": diff}


TRAIN_CASES = ("channels-last", "bf16 autocast + channels-last")


def run_train(sizes, device) -> dict:
    from dynroute.models import build_network

    setup = training.make_train_setup(sizes, device)
    results = {}
    for case in training.TRAIN_CASES:
        if case.name not in TRAIN_CASES:
            continue
        torch.manual_seed(common.SEED)
        net = build_network(common.network_config(sizes, small_gate=sizes.small_gate))
        net = net.to(device.torch).train().to(memory_format=torch.channels_last)
        step = training.TrainStep(net, case, setup)
        for _ in range(3):
            step()
        wall = wall_ms(step, device, calls=5)
        summary = profile_calls(step, device, calls=2)
        report(f"(train) {case.name}: batch {sizes.train_batch} of "
               f"{sizes.crop[0]}x{sizes.crop[1]}, {sizes.train_batch / wall * 1e3:.1f} images/s",
               wall, summary, device.cuda)
        results[case.name] = {"wall_ms": wall, **summary}
        del step, net
        device.reset_peak()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (for CI)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = common.select_device(args.device)
    if not device.cuda:
        torch.set_num_threads(1)
    common.load_models()
    common.configure_torch()
    sizes = common.sizes_for(device, args.smoke)
    name = torch.cuda.get_device_name(device.torch) if device.cuda else "CPU"
    print(f"gpu_profile: torch {torch.__version__} on {name}; L={sizes.layers}, "
          f"C0={sizes.base_channels}")
    started = time.perf_counter()
    runs = {"infer": run_infer, "graph": run_graph, "train": run_train}
    results = {}
    for section in SECTIONS:
        if args.only and section not in args.only:
            continue
        try:
            results[section] = runs[section](sizes, device)
        except Exception as err:  # report it, keep the other sections
            print(f"\n({section}) failed: {common.describe_error(err)}")
            results[section] = {"failed": common.describe_error(err)}
        sys.stdout.flush()
    print(f"\nruntime {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "device": name,
                                         "results": results}, indent=1))
    failed = [s for s, r in results.items() if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
