"""The training loop's step replayed as a CUDA graph against its eager step, on one GPU.

`platform/train/train_step.py`'s `TrainStep` (the step `dynroute train` runs) from the same seed,
three times: eagerly twice, and graphed (warm-up steps, capture, replays). Each step's figures
(L_seg, L_C, mean expected FLOPs, gradient norm) and the weights at the end must agree within
`--rtol`; the two eager runs show how far the eager step alone varies from run to run (on a GPU,
TF32 convs and the backward's atomic adds are not bit-reproducible). Measured on an NVIDIA H200
(torch 2.11, 12 steps at 384x384; benchmarks/results/graph_step_check-h200-2026-11-27.log): graph
vs eager 6.4e-3 on the gradient norm and 4.0e-4 on the weights, eager vs eager 2.7e-3 and 3.2e-4.
The batches come from pinned host memory as the DataLoader's do; the lr warm-up and the budget's
ramp change the learning rate and λ2·w(t) from step to step, which a capture that froze them would
miss.

Needs nothing but PyTorch: the model and platform code are loaded from this checkout, as
gpu_bench.py does. On a CPU the graphed step runs its body eagerly (a smoke check of the script).

    python benchmarks/graph_step_check.py            # auto device
    python benchmarks/graph_step_check.py --device cpu --steps 4
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import time

import torch

from speed.common import ROOT, load_models, select_device


def load_platform() -> None:
    """Register ../models as `dynroute.models` (as gpu_bench.py does) and ../platform as
    `dynroute.platform` (its step modules import torch and dynroute.models only)."""
    load_models()
    if "dynroute.platform" not in sys.modules:
        spec = importlib.machinery.ModuleSpec("dynroute.platform", None, is_package=True)
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [str(ROOT / "platform")]
        sys.modules["dynroute.platform"] = module


def run(device: torch.device, *, graphed: bool, steps: int, size: int):
    from dynroute.models import BudgetLoss, BudgetSchedule, NetworkConfig, build_network
    from dynroute.platform.device.fast_path import for_training
    from dynroute.platform.train.recipe import TrainConfig, build_optimizer, set_lr
    from dynroute.platform.train.train_step import TrainStep

    torch.manual_seed(0)
    layout = for_training(device)
    network = layout.network(build_network(NetworkConfig(layers=4, base_channels=16,
                                                         num_classes=19, small_gate=True)))
    network = network.to(device).train()
    recipe = TrainConfig(iterations=steps, batch_size=4, crop=(size, size),
                         warmup_iterations=steps // 2)
    cost = network.cost_model(size, size)
    budget = BudgetLoss(lambda2=2.0, mu=0.3, c_all=cost.all_open_expected(),
                        schedule=BudgetSchedule(start=0.25, ramp=0.25))
    optimizer = build_optimizer(network, recipe)
    step = TrainStep(network, network, cost, budget, optimizer, recipe, layout, device,
                     graphed=graphed)
    gen = torch.Generator().manual_seed(1)
    pin = device.type == "cuda"
    figures = []
    for i in range(steps):
        images = torch.randn(4, 3, size, size, generator=gen) * 50.0
        labels = torch.randint(0, 19, (4, size, size), generator=gen)
        labels[torch.rand(4, size, size, generator=gen) < 0.05] = 255
        batch = {"image": images.pin_memory() if pin else images,
                 "label": labels.pin_memory() if pin else labels}
        set_lr(optimizer, i, recipe)
        figures.append(step(batch, i / steps).clone())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    weights = torch.cat([p.detach().float().flatten() for p in network.parameters()]).cpu()
    return torch.stack(figures).cpu(), weights, step


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="square crop (default 256)")
    parser.add_argument("--rtol", type=float, default=1e-2,
                        help="max |Δ| / max |eager| allowed for figures and weights")
    args = parser.parse_args(argv)
    device = select_device(args.device).torch
    if device.type == "cpu":
        torch.set_num_threads(1)
    load_platform()
    started = time.perf_counter()
    eager_figures, eager_weights, _ = run(device, graphed=False, steps=args.steps,
                                          size=args.size)
    again_figures, again_weights, _ = run(device, graphed=False, steps=args.steps,
                                          size=args.size)
    graph_figures, graph_weights, step = run(device, graphed=True, steps=args.steps,
                                             size=args.size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"graph_step_check: torch {torch.__version__} on {name}, {args.steps} steps of batch 4 "
          f"at {args.size}x{args.size}; captured: {step.graph.captured}"
          + (f" (fell back: {step.fallback})" if step.fallback else ""))
    names = ("loss_seg", "loss_budget", "expected FLOPs", "grad norm")
    worst = 0.0
    for k, label in enumerate(names):
        rel = relative(graph_figures[:, k], eager_figures[:, k])
        spread = relative(again_figures[:, k], eager_figures[:, k])
        worst = max(worst, rel)
        print(f"  {label:15} eager {eager_figures[-1, k].item():12.6g}  graph "
              f"{graph_figures[-1, k].item():12.6g}  max rel Δ over steps {rel:.2e} "
              f"(eager vs eager {spread:.2e})")
    rel = relative(graph_weights, eager_weights)
    spread = relative(again_weights, eager_weights)
    worst = max(worst, rel)
    print(f"  {'weights':15} max rel Δ after {args.steps} steps {rel:.2e} "
          f"(eager vs eager {spread:.2e})")
    budget_on = bool((eager_figures[:, 1] != 0).any())
    ok = worst <= args.rtol and budget_on and (device.type != "cuda" or step.graph.captured)
    print(f"{'OK' if ok else 'FAIL'}: worst {worst:.2e} (rtol {args.rtol:.0e}); budget term on "
          f"in some steps: {budget_on}; runtime {time.perf_counter() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
