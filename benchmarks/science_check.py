"""Science check on the synthetic data: does the method behave as the paper says?

For each data seed, on a fresh synthetic Cityscapes set, it trains the same network twice
in-process, once without a budget (Dynamic-Raw) and once with a Dynamic-A-like budget (λ2 = 0.8,
μ = 0.1 and the small gate), and a third, static network for (d); it evaluates them on the val
split and prints:

  (a) mIoU against chance (a uniform guess over the classes present: 1 / K_present),
  (b) the real GFLOPs per image of both (the budget should lower it),
  (c) for the budgeted network: real GFLOPs and path-open frequencies of the images dominated by
      small objects vs by large regions (their routes should differ measurably).

How (c) is decided, fixed before the runs it reports: each val image's route is the vector of its
paths' open (1) / closed (0) decisions. A leave-one-out nearest-centroid classifier tells `small`
from `large` images by that vector; (c) holds when its accuracy beats the accuracies reached with
shuffled kind labels at p < 0.01 (2000 shuffles). The same classifier on the gates' values α
(the soft route), and the per-path |ΔP(open)| tests, are reported beside it.

(d) The paper's comparison with static networks of the same routing space (docs/model.md §8): the
Common-X route of the budgeted network (the paths open in more than X = `--threshold` of its val
forward passes, pruned to those connecting the init cell to the decoder) is trained from scratch
as a static network (fixed gates, α ≡ 1 on the route) with the same recipe, data order and
iterations, evaluated on the same val split, and its mIoU at its real GFLOPs set beside the
dynamic network's. The paper finds the dynamic network more accurate at similar cost. `dynroute
train` trains the whole routing space only (TrainSpec refuses a route), so the static network
runs the platform's own step (TrainStep, build_optimizer, set_lr, step_seed) in a short loop
here. A Common-X route that is empty or never reaches the decoder is a row saying so, not a crash.

Each seed of `--seeds` is a fresh synthetic set and its three trainings; (a)–(c) are printed per
seed, (d) as one table over the seeds with their means and the difference dynamic − static.

    python benchmarks/science_check.py            # 2 seeds × 3 trainings at a small size
    python benchmarks/science_check.py --smoke    # seconds, for CI: runs, checks nothing

Run time at the size benchmarks/README.md reports (L=8, C0=16, 3000 iterations): an estimate of
about 2 h for two seeds on an idle 2-core CPU, from trainings measured there; the figures are in
benchmarks/README.md, "Dynamic vs static (Common-X)".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dynroute.models import BudgetLoss, BudgetSchedule, NetworkConfig, Route, build_network
from dynroute.models.route_statistics import DEFAULT_COMMON_THRESHOLD, RouteStatistics, common_x
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.synth import synthesize
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_manifest
from dynroute.platform.device import fast_path
from dynroute.platform.evaluate.evaluation import evaluate
from dynroute.platform.files import write_json_atomic
from dynroute.platform.train.checkpoints import load as load_checkpoint
from dynroute.platform.train.recipe import (
    TrainConfig,
    build_optimizer,
    check_finite,
    network_for_budget,
    set_lr,
    steps_per_epoch,
)
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.train.train_step import TrainStep
from dynroute.platform.train.training import step_seed, train


def run_training(name: str, data: Path, storage: Path, model: NetworkConfig,
                 recipe: TrainConfig) -> tuple[Path, float]:
    """Train with `dynroute train`'s own function, in this process; (checkpoint, seconds)."""
    spec = TrainSpec(data=str(data), model=model, train=recipe, name=name, storage=str(storage),
                     workers=0,
                     checkpoint_every=recipe.iterations, log_every=max(1, recipe.iterations // 5))
    started = time.monotonic()
    result = train(spec)
    seconds = time.monotonic() - started
    print(f"  {name}: {recipe.iterations} steps in {seconds:.0f}s", file=sys.stderr)
    return Path(result.checkpoint), seconds


def train_static(name: str, data: Path, model: NetworkConfig, route: Route,
                 recipe: TrainConfig) -> tuple[torch.nn.Module, float]:
    """Train the static network of `route` (fixed gates) from scratch; (network, seconds).

    The step is `train_loop`'s for one CPU worker (platform/train/training.py) with the recipe's
    "network-fix" budget (no budget loss, fixed gates): the same initial seed, optimizer, lr
    schedule, clipping, data order and augmentation, on the train split.
    """
    recipe = replace(recipe, budget="network-fix")
    device = torch.device("cpu")
    layout = fast_path.for_training(device)  # what `train` uses by default (run.fast)
    torch.manual_seed(recipe.seed)
    network = layout.network(build_network(network_for_budget(replace(model, route=route),
                                                              recipe.budget)))
    cost = network.cost_model(*recipe.crop)
    lambda2, mu = recipe.budget_weights  # (0, 0) for network-fix
    budget = BudgetLoss(lambda2=lambda2, mu=mu, c_all=cost.all_open_expected(),
                        schedule=BudgetSchedule(recipe.budget_start, recipe.budget_ramp))
    optimizer = build_optimizer(network, recipe)
    step_fn = TrainStep(network, network, cost, budget, optimizer, recipe, layout, device)
    dataset = ShardDataset(root=str(data), split="train", train=True, crop=recipe.crop,
                           seed=recipe.seed, rank=0, world_size=1)
    per_epoch = steps_per_epoch(len(dataset), recipe.batch_size)
    started, step = time.monotonic(), 0
    sums = torch.zeros(4, dtype=torch.float64)
    while step < recipe.iterations:
        dataset.set_epoch(step // per_epoch)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, drop_last=True,
                            num_workers=fast_path.loader_workers(device))
        for i, batch in enumerate(loader):
            if step >= recipe.iterations or i >= per_epoch:
                break
            set_lr(optimizer, step, recipe)
            torch.manual_seed(step_seed(recipe.seed, 0, step))
            sums += step_fn(batch, step / recipe.iterations)
            step += 1
    seg, _, _, norm = (sums / step).tolist()
    check_finite({"loss_seg": seg, "grad_norm": norm}, f"training {name}")
    seconds = time.monotonic() - started
    print(f"  {name}: {recipe.iterations} steps in {seconds:.0f}s (mean loss_seg {seg:.3f})",
          file=sys.stderr)
    return network, seconds


def common_route(stats: RouteStatistics, threshold: float) -> tuple[Route | None, str]:
    """The Common-X route of `stats` and how it reads in the table, or (None, why not)."""
    try:
        route = common_x(stats, threshold=threshold)
    except ValueError:  # nothing above the threshold reaches the decoder
        above = sum(f > threshold for f in stats.path_frequency().values())
        return None, (f"no route above {threshold:g} ({above} paths above it, none reaching "
                      f"the decoder): lower --threshold")
    total = len(stats.route.paths)
    label = f"{len(route.paths)} of {total} paths"
    if route.paths == stats.route.paths:
        label += " (all: Network-Fix)"
    return route, label


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


def run_seed(seed: int, work: Path, args: argparse.Namespace) -> dict:
    """Synthesize the data of one seed, train and evaluate the three networks on it."""
    height, width = args.height, args.width
    raw, data = work / "raw", work / "prepared"
    print(f"seed {seed}: synthesizing and preparing ...", file=sys.stderr)
    synthesize("cityscapes", raw, train=args.train_images, val=args.val_images,
               height=height, width=width, seed=seed)
    prepare("cityscapes", raw, data)
    kinds = {key: v["kind"] for key, v in
             json.loads((raw / "synth_meta.json").read_text())["images"].items()}
    manifest = read_manifest(str(data))
    model = NetworkConfig(layers=args.layers, base_channels=args.base_channels)
    recipe = TrainConfig(iterations=args.iterations, batch_size=8, crop=args.crop,
                         warmup_iterations=max(1, args.iterations // 10))
    budgeted = TrainConfig(**{**asdict(recipe), "budget": "dynamic-a"})

    def evaluated(network):
        dataset = ShardDataset(root=str(data), split="val", train=False, crop=None)
        evaluation = evaluate(network, dataset, num_classes=manifest.num_classes,
                              class_names=manifest.class_names, cost_resolution=(height, width))
        present = sum(v is not None for v in evaluation.per_class_iou.values())
        return evaluation, {"miou": evaluation.miou, "chance": 1 / max(present, 1),
                            "gflops": evaluation.gflops}

    results, statistics = {}, None
    trainings = (("dynamic-raw", recipe), ("dynamic-a", budgeted))
    for name, r in trainings[1:] if args.skip_raw else trainings:
        checkpoint, seconds = run_training(name, data, work / "runs", model, r)
        network, _ = load_checkpoint(checkpoint)
        evaluation, figures = evaluated(network)
        statistics = evaluation.route_statistics  # the last one is dynamic-a's
        results[name] = figures | {"train_seconds": seconds,
                                   "all_open_gflops": network.cost_model(height, width)
                                   .all_open_real() / 1e9,
                                   "kinds": per_kind(network, data, kinds, (height, width))}
    route, label = common_route(statistics, args.threshold)
    common = {"name": f"common-{round(args.threshold * 100)}", "route": route, "label": label}
    if route is not None:
        network, seconds = train_static(common["name"], data, model, route, recipe)
        _, figures = evaluated(network)
        common |= figures | {"train_seconds": seconds,
                             "route_gflops": network.cost_model(height, width)
                             .all_open_real() / 1e9}
    return {"networks": results, "common": common}


def report_seed(seed: int, results: dict, args: argparse.Namespace) -> None:
    """Print (a)–(c) for one seed; adds the routing figures and (c)'s verdict to `results`."""
    print(f"\nscience check: synthetic Cityscapes {args.height}x{args.width}, "
          f"{args.train_images} train / {args.val_images} val images, L={args.layers}, "
          f"C0={args.base_channels}, {args.iterations} iterations, batch 8, data seed {seed}, "
          f"crop {args.crop[0]}x{args.crop[1]}, torch {torch.__version__}, "
          f"{_training_threads(args)} threads per training, {args.jobs} at once")
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
    if "dynamic-raw" in results:
        raw, budgeted = results["dynamic-raw"], results["dynamic-a"]
        print(f"(b) budget / no budget real GFLOPs: "
              f"{budgeted['gflops'].mean / raw['gflops'].mean:.3f} (cells and paths only: "
              f"{budgeted['routing'] / raw['routing']:.3f}; the rest is the small gate's saving)")
    else:
        print("(b) not measured: --skip-raw")
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


def compare(per_seed: dict[int, dict], args: argparse.Namespace) -> dict:
    """Print (d), dynamic-a against its Common-X static network, and return it as plain data."""
    name = next(iter(per_seed.values()))["common"]["name"]
    rows = []
    for seed, result in per_seed.items():
        dynamic, common = result["networks"]["dynamic-a"], result["common"]
        rows.append({"seed": seed, "network": "dynamic-a", "route": "dynamic, per image",
                     "paths": None, "gflops_mean": dynamic["gflops"].mean,
                     "route_gflops": dynamic["all_open_gflops"], "miou": dynamic["miou"],
                     "chance": dynamic["chance"], "train_seconds": dynamic["train_seconds"]})
        route, trained = common["route"], "gflops" in common  # not trained: no route
        rows.append({"seed": seed, "network": name, "route": common["label"],
                     "paths": route.to_dict()["paths"] if trained else None,
                     "gflops_mean": common["gflops"].mean if trained else None,
                     **{k: common.get(k) for k in ("route_gflops", "miou", "chance",
                                                   "train_seconds")}})
    paired = [(d, s) for d, s in zip(rows[::2], rows[1::2], strict=True) if s["miou"] is not None]
    differences = [{"seed": d["seed"], "gflops_mean": d["gflops_mean"] - s["gflops_mean"],
                    "gflops_ratio": d["gflops_mean"] / s["gflops_mean"],
                    "miou": d["miou"] - s["miou"]} for d, s in paired]

    def mean(entries: list[dict], key: str) -> float | None:
        return float(np.mean([e[key] for e in entries])) if entries else None

    means = {}
    for net in ("dynamic-a", name):
        group = [r for r in rows if r["network"] == net and r["miou"] is not None]
        means[net] = {"seeds": len(group), "gflops_mean": mean(group, "gflops_mean"),
                      "miou": mean(group, "miou")}
    difference = ({"seeds": len(differences), "gflops_mean": mean(differences, "gflops_mean"),
                   "gflops_ratio": mean(differences, "gflops_ratio"),
                   "miou": mean(differences, "miou")} if differences else None)

    print(f"\n(d) dynamic vs static: {name} of dynamic-a (paths open in more than "
          f"{args.threshold:.0%} of its val forward passes, pruned to a connected route), "
          f"trained from scratch with fixed gates, the same recipe and {args.iterations} "
          f"iterations")
    print(f"{'seed':<6}{'network':<12}{'route':<36}{'GFLOPs mean':>12}{'route all-open':>16}"
          f"{'mIoU':>8}{'chance':>8}")
    for row in rows:
        if row["miou"] is None:
            print(f"{row['seed']:<6}{row['network']:<12}{row['route']}")
            continue
        print(f"{row['seed']:<6}{row['network']:<12}{row['route']:<36}{row['gflops_mean']:>12.4f}"
              f"{row['route_gflops']:>16.4f}{row['miou']:>8.3f}{row['chance']:>8.3f}")
    for net, m in means.items():
        if m["seeds"]:
            over = f"over {m['seeds']} seed(s)"
            print(f"{'mean':<6}{net:<12}{over:<36}{m['gflops_mean']:>12.4f}{'':>16}"
                  f"{m['miou']:>8.3f}")
    for d in differences:
        print(f"{d['seed']:<6}dynamic − static: GFLOPs {d['gflops_mean']:+.4f} "
              f"({d['gflops_ratio']:.3f}× the static's), mIoU {d['miou']:+.3f}")
    if difference is None:
        print(f"dynamic − static: no seed has a {name} route; lower --threshold")
    else:
        print(f"mean  dynamic − static over {difference['seeds']} seed(s): GFLOPs "
              f"{difference['gflops_mean']:+.4f} ({difference['gflops_ratio']:.3f}× the "
              f"static's), mIoU {difference['miou']:+.3f}  (the paper: the dynamic network is "
              f"more accurate at similar cost)")
    print("route all-open: the route's analytic cost with every path of it open (for dynamic-a "
          "the whole space, its small gates included); a static network always costs that")
    return {"threshold": args.threshold, "static": name, "iterations": args.iterations,
            "rows": rows, "mean": means, "differences": differences, "difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--size", default="128x256", help="synthetic image HxW")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 11],
                        help="data seeds; each is a fresh synthetic set with its own trainings")
    parser.add_argument("--threshold", type=float, default=DEFAULT_COMMON_THRESHOLD,
                        help="Common-X: keep the paths of dynamic-a open in more than this "
                             "fraction of its val forward passes (default %(default)s)")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--skip-raw", action="store_true",
                        help="do not train Dynamic-Raw, which only (b) uses; (c) and (d) need "
                             "Dynamic-A and its static network alone")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train the seeds in this many processes at once, each with an "
                             "equal share of torch's threads (default %(default)s: one by one)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold < 1:
        parser.error(f"--threshold {args.threshold}: give a fraction in [0, 1), e.g. 0.95")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: give each seed once")
    if args.smoke:
        args.train_images, args.val_images, args.size, args.iterations = 8, 6, "64x128", 4
        args.layers, args.base_channels = 4, 4
    args.height, args.width = (int(v) for v in args.size.split("x"))
    args.crop = (min(args.height, 128), min(args.width, 128))
    torch.set_num_threads(torch.get_num_threads())

    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least 1")
    per_seed = {}
    with tempfile.TemporaryDirectory(prefix="dynroute-science-") as tmp:
        work = args.work or Path(tmp)
        for seed, result in _run_seeds(work, args):
            per_seed[seed] = result
            report_seed(seed, per_seed[seed]["networks"], args)
    comparison = compare(per_seed, args)
    if args.out:
        write_json_atomic(args.out, _summary(per_seed, comparison, args))
    return 0


def _training_threads(args: argparse.Namespace) -> int:
    """torch threads of each training: all of this process's, shared out among --jobs."""
    return max(1, torch.get_num_threads() // args.jobs)


def _threads(count: int) -> None:
    torch.set_num_threads(count)


def _run_seeds(work: Path, args: argparse.Namespace):
    """(seed, run_seed's result) for every seed, in order: one by one in this process, or with
    --jobs N in N processes at once. With several jobs each gets torch's threads / N: OpenMP
    threads that outnumber the free cores wait on each other, which measured 30 times slower for
    a 2-thread matrix product beside another busy process on 2 cores."""
    if args.jobs == 1:
        for seed in args.seeds:
            yield seed, run_seed(seed, work / f"seed-{seed}", args)
        return
    threads = _training_threads(args)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn, initializer=_threads,
                             initargs=(threads,)) as pool:
        futures = [(seed, pool.submit(run_seed, seed, work / f"seed-{seed}", args))
                   for seed in args.seeds]
        for seed, future in futures:
            yield seed, future.result()


def _summary(per_seed: dict[int, dict], comparison: dict, args: argparse.Namespace) -> dict:
    """The printed figures as JSON (without the per-image arrays)."""
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "torch": torch.__version__, "threads": _training_threads(args), "seeds": {},
           "dynamic_vs_static": comparison}
    for seed, result in per_seed.items():
        networks = out["seeds"][str(seed)] = {}
        for name, r in result["networks"].items():
            networks[name] = {
                "miou": r["miou"], "chance": r["chance"], "gflops_mean": r["gflops"].mean,
                "routing_gflops_mean": r["routing"], "train_seconds": r["train_seconds"],
                "c": r.get("c"),
                "kinds": {k: {"images": v["images"], "gflops_mean": v["gflops_mean"],
                              "routing_gflops_mean": v["routing_gflops_mean"],
                              "paths": {str(path): f for path, f in v["paths"].items()}}
                          for k, v in r["kinds"].items()}}
    return out


if __name__ == "__main__":
    sys.exit(main())
