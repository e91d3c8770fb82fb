"""One-command speed benchmark of the dynamic routing network: eager fp32 vs each optimisation.

Three sections, each printed as a table with ratios to our eager fp32 baseline:

    train    images/s of the full training step (soft forward, cross-entropy + budget loss,
             backward, clipping at total norm 5.0, SGD), peak memory, the activations kept for
             the backward pass (countable on a CPU too), and the numerics check
             against fp32 eager from a fixed seed and batch: the losses of the first steps and
             the first step's gradient
    infer    every path open (gates pinned): latency at batch 1, images/s at batch 8, peak memory,
             and the logits against fp32 eager
    dynamic  the scenarios of benchmarks/dynamic_inference.py: latency ratio vs real-FLOPs ratio,
             for the eager path and the fastest per-sample-routing path of `infer`

Sizes (the issue's setting on CUDA, small enough for two CPU cores otherwise):

    cuda     train L=16, C0=64, batch 8, 768x768;  infer/dynamic L=16, C0=64, 1024x2048
    cpu      train L=4,  C0=8,  batch 2, 128x128;  infer/dynamic L=4,  C0=8,  128x256
    --smoke  L=4, C0=4, batch 2, 64x64 / 64x128, one repeat, torch.compile with backend "eager"
             (Dynamo capture only: inductor's C++/Triton codegen takes minutes, too long for CI)

CUDA graphs: the training cases "CUDA graph ..." replay the whole step
(platform/device/cuda_graph.py, as `dynroute train` does on one GPU); "static soft, CUDA graph
..." replays the all-open forward; "row graphs (b1) ..." replay the per-sample routing forward
piece by piece between its per-row waits (models/graphed_routing.py; on a CPU the pieces run
eagerly).

Needs nothing but PyTorch (and numpy): the model code is loaded from ../models, the optimizer
recipe and the graph code from ../platform/train/recipe.py and ../platform/device/cuda_graph.py,
and the scenarios from ./dynamic_inference.py, without installing dynroute. The benchmark's own
parts are in ./speed/:
`common` (loading, device, time budget, checks), one module per section (`training`,
`inference`, `dynamic`) and `report` (the tables); this script runs them.

`--time-budget` (default 420 s) shrinks repeats and skips compile cases that would not fit, to
keep the whole run under 8 minutes on one GPU (measured: 188 s with --time-budget 290 on an
H100, 141 s with --time-budget 250 --no-compile on an H200; compiling the whole L=16 training
step took over 400 s, so those cases need --time-budget of about 1500). CPU runs use one thread
unless --threads says otherwise.

    python benchmarks/gpu_bench.py                               # auto device
    python benchmarks/gpu_bench.py --device cpu --only infer
    python benchmarks/gpu_bench.py --smoke --device cpu --json /tmp/gpu_bench.json

Exits 1 when a numerics check fails, 2 when the model code cannot be loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import torch

from speed.common import (
    MODELS_PACKAGE,
    ROOT,
    Clock,
    Device,
    Row,
    configure_torch,
    describe_error,
    load_models,
    select_device,
    sizes_for,
)
from speed.dynamic import run_dynamic
from speed.inference import InferRunner, run_infer
from speed.report import report_dynamic, report_infer, report_train
from speed.training import run_train

SECTIONS = ("train", "infer", "dynamic")
SECTION_SHARE = {"train": 0.5, "infer": 0.35, "dynamic": 0.15}


def environment(device: Device, models: ModuleType) -> dict:
    env = {"torch": torch.__version__, "device": str(device.torch),
           "threads": torch.get_num_threads(), "models": str(Path(models.__file__).parent),
           "pyyaml": importlib.util.find_spec("yaml") is not None}
    if device.cuda:
        env |= {"gpu": torch.cuda.get_device_name(device.torch), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "tf32_conv": torch.backends.cudnn.allow_tf32,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    else:
        env["cpu_memory"] = "peak memory per case is n/a on CPU"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat, Dynamo-only compilation (for CI)")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds for the whole run; repeats shrink and compile cases are "
                             "skipped to fit (default 420)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default 1 on CPU, torch's own with CUDA): "
                             "on a busy 2-core host two OpenMP threads made a 40 ms CPU step "
                             "take 10 s, and the CPU figures are checks, not speed claims")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--models", type=Path, default=ROOT / "models",
                        help="load the model code from this folder instead of ../models (to "
                             "compare two versions of it with the same script)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    clock = Clock(args.time_budget)
    device = select_device(args.device)
    threads = args.threads or (None if device.cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    models = load_models(args.models)
    configure_torch()
    sizes = sizes_for(device, args.smoke)
    reference_sizes = sizes == sizes_for(Device(torch.device("cuda")), False)
    env = environment(device, models)

    print(f"gpu_bench: torch {env['torch']} on {env.get('gpu', 'CPU')} ({device.torch}), "
          f"{env['threads']} CPU threads" + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
                                             f"TF32 conv {env['tf32_conv']} / matmul "
                                             f"{env['tf32_matmul']}" if device.cuda else ""))
    print(f"models loaded from {env['models']} (as {MODELS_PACKAGE}); PyYAML "
          f"{'present' if env['pyyaml'] else 'absent (not needed)'}")
    print(f"time budget {args.time_budget:.0f}s; compile backend {sizes.compile_backend}"
          + ("; smoke sizes" if args.smoke else ""))

    sections = [s for s in SECTIONS if not args.only or s in args.only]
    results: dict[str, list[Row]] = {}
    candidates: dict[str, InferRunner] = {}
    for i, section in enumerate(sections):
        clock.start_section(SECTION_SHARE[section] / sum(SECTION_SHARE[s]
                                                         for s in sections[i:]))
        if section == "train":
            results["train"] = run_train(sizes, device, clock, no_compile=args.no_compile)
            report_train(results["train"], sizes, device, reference_sizes)
        elif section == "infer":
            results["infer"], candidates = run_infer(sizes, device, clock,
                                                     no_compile=args.no_compile)
            report_infer(results["infer"], sizes, device, reference_sizes)
        else:
            try:
                results["dynamic"] = run_dynamic(sizes, device, clock, candidates,
                                                 results.get("infer", []))
            except Exception as err:  # e.g. out of memory: report it, keep the other sections
                results["dynamic"] = [Row("dynamic", "eager fp32 (baseline)",
                                          status=f"failed: {describe_error(err)}")]
            report_dynamic(results["dynamic"], sizes)
        sys.stdout.flush()

    failed = [f"{r.section}: {r.case}" for rows in results.values() for r in rows
              if any(c is not None and not c.ok for c in (r.check, r.grad_check))]
    runtime = time.perf_counter() - started
    print(f"\nruntime {runtime:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(
            {"environment": env, "sizes": asdict(sizes), "runtime_s": runtime,
             "results": {k: [asdict(r) for r in v] for k, v in results.items()}}, indent=1))
    if failed:
        print(f"FAIL: numerics outside tolerance for {', '.join(failed)}")
        return 1
    print("numerics: every check within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
