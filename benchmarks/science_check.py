"""Science check on the synthetic data: does the method behave as the paper says? (issue 4)

In one run, on a fresh synthetic Cityscapes set, it trains the same network twice in-process,
once without a budget (Dynamic-Raw) and once with a Dynamic-A-like budget (λ2 = 0.8, μ = 0.1 and
the small gate), evaluates both on the val split and prints:

  (a) mIoU against chance (a uniform guess over the classes present: 1 / K_present),
  (b) the real GFLOPs per image of both (the budget should lower it),
  (c) for the budgeted network: real GFLOPs and path-open frequencies of the images dominated by
      small objects vs by large regions (their routes should differ measurably).

    python benchmarks/science_check.py            # minutes on a 2-core CPU
    python benchmarks/science_check.py --smoke    # seconds, for CI: runs, checks nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dynroute.models import NetworkConfig
from dynroute.models.route_statistics import RouteStatistics
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.run import load_checkpoint
from dynroute.pipelines.synth import synthesize
from dynroute.platform.dataset import ShardDataset
from dynroute.platform.evaluation import evaluate
from dynroute.platform.recipe import TrainConfig
from dynroute.platform.shards import read_manifest
from dynroute.platform.training import TrainSpec, train


def run_training(name: str, data: Path, storage: Path, model: NetworkConfig,
                 recipe: TrainConfig) -> Path:
    spec = TrainSpec(data=str(data), model={k: v for k, v in asdict(model).items()
                                            if k != "route"},
                     train=asdict(recipe), name=name, storage=str(storage), workers=0,
                     checkpoint_every=recipe.iterations, log_every=max(1, recipe.iterations // 5))
    started = time.monotonic()
    result = train(spec)
    print(f"  {name}: {recipe.iterations} steps in {time.monotonic() - started:.0f}s",
          file=sys.stderr)
    return Path(result.checkpoint)


def per_kind(network, data: Path, kinds: dict[str, str], resolution) -> dict:
    """Real GFLOPs and path-open frequencies per scene kind, on the val split."""
    network.eval()
    cost = network.cost_model(*resolution)
    stats = {k: RouteStatistics(network.route) for k in ("small", "large", "mixed")}
    flops: dict[str, list[float]] = {k: [] for k in stats}
    with torch.inference_mode():
        for sample in ShardDataset(root=str(data), split="val", train=False, crop=None):
            kind = kinds[f"val/{sample['id']}"]
            out = network(sample["image"][None])
            stats[kind].update(out.gates)
            flops[kind].append(cost.real(out.gates).item() / 1e9)
    return {k: {"images": len(flops[k]), "gflops_mean": float(np.mean(flops[k])),
                "paths": stats[k].path_frequency()} for k in stats if flops[k]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--val-images", type=int, default=30)
    parser.add_argument("--size", default="128x256", help="synthetic image HxW")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_images, args.val_images, args.size, args.iterations = 8, 6, "64x128", 4
        args.layers, args.base_channels = 4, 4
    height, width = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory(prefix="dynroute-science-") as tmp:
        work = args.work or Path(tmp)
        raw, data = work / "raw", work / "prepared"
        print("synthesizing and preparing ...", file=sys.stderr)
        synthesize("cityscapes", raw, train=args.train_images, val=args.val_images,
                   height=height, width=width, seed=7)
        prepare("cityscapes", raw, data)
        kinds = {key: v["kind"] for key, v in
                 json.loads((raw / "synth_meta.json").read_text())["images"].items()}
        manifest = read_manifest(str(data))
        model = NetworkConfig(layers=args.layers, base_channels=args.base_channels)
        crop = (min(height, 128), min(width, 128))
        recipe = TrainConfig(iterations=args.iterations, batch_size=8, crop=crop,
                             warmup_iterations=max(1, args.iterations // 10))
        budgeted = TrainConfig(**{**asdict(recipe), "budget": "dynamic-a"})
        results = {}
        for name, r in (("dynamic-raw", recipe), ("dynamic-a", budgeted)):
            checkpoint = run_training(name, data, work / "runs", model, r)
            network, _ = load_checkpoint(checkpoint)
            dataset = ShardDataset(root=str(data), split="val", train=False, crop=None)
            evaluation = evaluate(network, dataset, num_classes=manifest.num_classes,
                                  class_names=manifest.class_names,
                                  cost_resolution=(height, width))
            present = sum(v is not None for v in evaluation.per_class_iou.values())
            results[name] = {"miou": evaluation.miou, "chance": 1 / max(present, 1),
                             "gflops": evaluation.gflops,
                             "kinds": per_kind(network, data, kinds, (height, width))}

    print(f"\nscience check: synthetic Cityscapes {height}x{width}, {args.train_images} train / "
          f"{args.val_images} val images, L={args.layers}, C0={args.base_channels}, "
          f"{args.iterations} iterations, batch 8, crop {crop[0]}x{crop[1]}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':<14}{'mIoU':>8}{'chance':>8}{'GFLOPs mean':>13}{'min':>8}{'max':>8}")
    for name, r in results.items():
        g = r["gflops"]
        print(f"{name:<14}{r['miou']:>8.3f}{r['chance']:>8.3f}{g.mean:>13.4f}{g.min:>8.4f}"
              f"{g.max:>8.4f}")
    raw_g, a_g = results["dynamic-raw"]["gflops"].mean, results["dynamic-a"]["gflops"].mean
    print(f"(b) budget / no budget real GFLOPs: {a_g / raw_g:.3f}")
    kinds_a = results["dynamic-a"]["kinds"]
    print("(c) dynamic-a by scene kind:")
    for kind, entry in kinds_a.items():
        print(f"    {kind:<6} {entry['images']:>3} images  GFLOPs mean {entry['gflops_mean']:.4f}")
    if "small" in kinds_a and "large" in kinds_a:
        small, large = kinds_a["small"]["paths"], kinds_a["large"]["paths"]
        diffs = sorted(((abs(small[p] - large[p]), p) for p in small), reverse=True)
        print(f"    mean |P(open | small) - P(open | large)| over paths: "
              f"{np.mean([d for d, _ in diffs]):.3f}; largest:")
        for d, p in diffs[:5]:
            print(f"      path {p}: small {small[p]:.2f}  large {large[p]:.2f}  (|diff| {d:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
