"""Science check on the synthetic data: does the method behave as the paper says?

In one run, on a fresh synthetic Cityscapes set, it trains the same network twice in-process,
once without a budget (Dynamic-Raw) and once with a Dynamic-A-like budget (λ2 = 0.8, μ = 0.1 and
the small gate), evaluates both on the val split and prints:

  (a) mIoU against chance (a uniform guess over the classes present: 1 / K_present),
  (b) the real GFLOPs per image of both (the budget should lower it),
  (c) for the budgeted network: real GFLOPs and path-open frequencies of the images dominated by
      small objects vs by large regions (their routes should differ measurably).

How (c) is decided, fixed before the runs it reports: each val image's route is the vector of its
paths' open (1) / closed (0) decisions. A leave-one-out nearest-centroid classifier tells `small`
from `large` images by that vector; (c) holds when its accuracy beats the accuracies reached with
shuffled kind labels at p < 0.01 (2000 shuffles). The same classifier on the gates' values α
(the soft route), and the per-path |ΔP(open)| tests, are reported beside it.

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
from dynroute.pipelines.synth import synthesize
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_manifest
from dynroute.platform.evaluate.evaluation import evaluate
from dynroute.platform.files import write_json_atomic
from dynroute.platform.train.checkpoints import load as load_checkpoint
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.train.training import train


def run_training(name: str, data: Path, storage: Path, model: NetworkConfig,
                 recipe: TrainConfig) -> Path:
    spec = TrainSpec(data=str(data), model=model, train=recipe, name=name, storage=str(storage),
                     workers=0,
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
    routing: dict[str, list[float]] = {k: [] for k in stats}
    opened: dict[str, list[np.ndarray]] = {k: [] for k in stats}  # per image: paths open
    alpha: dict[str, list[np.ndarray]] = {k: [] for k in stats}  # per image: the gates' values
    with torch.inference_mode():
        for sample in ShardDataset(root=str(data), split="val", train=False, crop=None):
            kind = kinds[f"val/{sample['id']}"]
            out = network(sample["image"][None])
            stats[kind].update(out.gates)
            flops[kind].append(cost.real(out.gates).item() / 1e9)
            routing[kind].append(cost.real(out.gates, routing_only=True).item() / 1e9)
            values = np.concatenate([out.gates[n][0].float().numpy() for n in sorted(out.gates)])
            alpha[kind].append(values)
            opened[kind].append(values > network.closed_threshold)
    return {k: {"images": len(flops[k]), "gflops_mean": float(np.mean(flops[k])),
                "routing_gflops_mean": float(np.mean(routing[k])),
                "routing_all_open": cost.all_open_expected() / 1e9,
                "paths": stats[k].path_frequency(), "opened": np.array(opened[k], dtype=float),
                "alpha": np.array(alpha[k], dtype=float)}
            for k in stats if flops[k]}


def permutation_test(a: np.ndarray, b: np.ndarray, *, rounds: int = 2000,
                     seed: int = 0) -> dict[str, tuple[float, float]]:
    """Two statistics of |P_a(open) − P_b(open)| over paths, each with the chance of a value at
    least as large when the groups' labels are shuffled (a p-value):

    mean: the average over paths (a broad shift of many paths);
    max:  the largest over paths (a few paths that specialise); comparing it with the shuffled
          maxima makes its p-value family-wise, with no correction for the number of paths.
    """
    def diffs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.abs(x.mean(0) - y.mean(0))

    observed = diffs(a, b)
    pooled, n = np.concatenate([a, b]), len(a)
    rng = np.random.default_rng(seed)
    hits = {"mean": 0, "max": 0}
    for _ in range(rounds):
        order = rng.permutation(len(pooled))
        shuffled = diffs(pooled[order[:n]], pooled[order[n:]])
        hits["mean"] += shuffled.mean() >= observed.mean()
        hits["max"] += shuffled.max() >= observed.max()
    return {"mean": (float(observed.mean()), (hits["mean"] + 1) / (rounds + 1)),
            "max": (float(observed.max()), (hits["max"] + 1) / (rounds + 1))}


def centroid_test(a: np.ndarray, b: np.ndarray, *, rounds: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """Leave-one-out nearest-centroid accuracy telling rows of `a` from rows of `b`, and the chance
    of an accuracy at least as high when the labels are shuffled (a p-value).

    Features are standardised over both groups together (label-blind, so shuffling stays fair);
    constant features are dropped. Each row is classified by the nearer of the two group centroids
    computed without it.
    """
    x = np.concatenate([a, b]).astype(float)
    spread = x.std(0)
    x = (x[:, spread > 0] - x[:, spread > 0].mean(0)) / spread[spread > 0]
    labels = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
    if x.shape[1] == 0:
        return 0.5, 1.0

    def accuracy(y: np.ndarray) -> float:
        sums = {g: x[y == g].sum(0) for g in (False, True)}
        counts = {g: int((y == g).sum()) for g in (False, True)}
        distance = {}
        for g in (False, True):  # distance of every row to group g's centroid without that row
            own = y == g
            n = np.where(own, counts[g] - 1, counts[g])[:, None]
            centroid = (sums[g][None] - np.where(own[:, None], x, 0.0)) / np.maximum(n, 1)
            distance[g] = ((x - centroid) ** 2).sum(1)
        return float(((distance[True] < distance[False]) == y).mean())

    observed = accuracy(labels)
    rng = np.random.default_rng(seed)
    hits = sum(accuracy(rng.permutation(labels)) >= observed for _ in range(rounds))
    return observed, (hits + 1) / (rounds + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--size", default="128x256", help="synthetic image HxW")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic data")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
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
                   height=height, width=width, seed=args.seed)
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
          f"{args.iterations} iterations, batch 8, data seed {args.seed}, crop "
          f"{crop[0]}x{crop[1]}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':<14}{'mIoU':>8}{'chance':>8}{'GFLOPs mean':>13}{'min':>8}{'max':>8}"
          f"{'cells+paths':>13}{'of all-open':>13}")
    for name, r in results.items():
        g = r["gflops"]
        kinds_r = r["kinds"].values()
        images = sum(k["images"] for k in kinds_r)
        r["routing"] = sum(k["routing_gflops_mean"] * k["images"] for k in kinds_r) / images
        share = r["routing"] / next(iter(kinds_r))["routing_all_open"]
        print(f"{name:<14}{r['miou']:>8.3f}{r['chance']:>8.3f}{g.mean:>13.4f}{g.min:>8.4f}"
              f"{g.max:>8.4f}{r['routing']:>13.4f}{share:>13.3f}")
    raw_g, a_g = results["dynamic-raw"]["gflops"].mean, results["dynamic-a"]["gflops"].mean
    print(f"(b) budget / no budget real GFLOPs: {a_g / raw_g:.3f} (cells and paths only: "
          f"{results['dynamic-a']['routing'] / results['dynamic-raw']['routing']:.3f}; the rest "
          f"is the small gate's saving)")
    kinds_a = results["dynamic-a"]["kinds"]
    print("(c) dynamic-a by scene kind:")
    for kind, entry in kinds_a.items():
        print(f"    {kind:<6} {entry['images']:>3} images  GFLOPs mean {entry['gflops_mean']:.4f}"
              f"  cells+paths {entry['routing_gflops_mean']:.4f}")
    if "small" in kinds_a and "large" in kinds_a:
        small, large = kinds_a["small"]["paths"], kinds_a["large"]["paths"]
        diffs = sorted(((abs(small[p] - large[p]), p) for p in small), reverse=True)
        tests = permutation_test(kinds_a["small"]["opened"], kinds_a["large"]["opened"])
        print("    |P(open | small) - P(open | large)| over paths, permutation tests (2000 "
              "shuffles of the kind labels):")
        for name, (observed, p_value) in tests.items():
            print(f"      {name:<4} {observed:.3f}  p = {p_value:.4f}")
        print("    largest:")
        for d, p in diffs[:5]:
            print(f"      path {p}: small {small[p]:.2f}  large {large[p]:.2f}  (|diff| {d:.2f})")
        print("    leave-one-out nearest-centroid small vs large (chance 0.5; 2000 shuffles):")
        decided = {}
        for name, key in (("routes (open/closed)", "opened"), ("gate values α", "alpha")):
            acc, p_value = centroid_test(kinds_a["small"][key], kinds_a["large"][key])
            decided[key] = {"accuracy": acc, "p": p_value}
            print(f"      {name:<21} accuracy {acc:.3f}  p = {p_value:.4f}")
        verdict = "holds" if decided["opened"]["p"] < 0.01 else "not shown"
        print(f"    (c) {verdict} (routes classifier, p < 0.01)")
        results["dynamic-a"]["c"] = {"verdict": verdict, "classifier": decided,
                                     "permutation": tests}
    if args.out:
        write_json_atomic(args.out, _summary(results, args))
    return 0


def _summary(results: dict, args: argparse.Namespace) -> dict:
    """The printed figures as JSON (without the per-image arrays)."""
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "torch": torch.__version__, "threads": torch.get_num_threads(), "networks": {}}
    for name, r in results.items():
        g = r["gflops"]
        out["networks"][name] = {
            "miou": r["miou"], "chance": r["chance"], "gflops_mean": g.mean,
            "routing_gflops_mean": r["routing"], "c": r.get("c"),
            "kinds": {k: {"images": v["images"], "gflops_mean": v["gflops_mean"],
                          "routing_gflops_mean": v["routing_gflops_mean"],
                          "paths": {str(path): f for path, f in v["paths"].items()}}
                      for k, v in r["kinds"].items()}}
    return out


if __name__ == "__main__":
    sys.exit(main())
