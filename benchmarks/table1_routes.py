"""Table 1's static networks in our routing space: the closest route of each connection pattern.

The paper (Table 1) gives parameters and GFLOPs of five static networks modelled in its routing
space, for L = 16 at 1024×2048 (C₀ = 64, 19 classes), but draws their routes only as pictures
(Fig. 3). For each network this script enumerates every route of the network's connection pattern
(the free choices are listed per network below), prices each with the unit costs of the analytic
cost model (docs/model.md §7: the same modules and the same counting as `dynroute model summary`,
no forward pass), and prints the paper's figures, those of our named route today, the closest
route of the pattern with its relative errors, and whether both errors are within 5%. Where none
is, it prints the bound that shows why: the pattern's cheapest or dearest route, or the GFLOPs of
the routes whose parameters are within 5%.

Patterns and their free choices (L = 16 rows; the init cell is at 1/4; gates fixed, so a route
costs only its cells, its paths, the stem, the decoder levels it feeds and the head):

- FCN-32s: one path down to 1/32 that stays there; rows at 1/4 (0 or more: the init cell is at
  1/4), 1/8, 1/16, 1/32 (at least one each).
- DeepLabV3: one path down to 1/16 that stays there; rows at 1/4 (0 or more), 1/8, 1/16.
- U-Net: one path down to 1/32 and back up, with a skip connection (a chain of keep paths) at every
  level it passes on the way down; rows of each encoder level (1/4 may be 0) and of each decoder
  level; the path comes back up to 1/4, 1/8 or 1/16, and a level it does not come back to reaches
  the decoder through its skip chain (the naive decoder then does U-Net's last up-steps).
- HRNetV2: four streams that run to the last row and all feed the decoder; the rows where streams
  1, 2, 3 start (each spawned by a down path from the next finer one), the interval between
  exchanges (a down and an up path between every pair of neighbouring streams that both run) and
  the row of the first exchange.
- Auto-DeepLab: one searched-style path, down through 1/8 and 1/16 to 1/32 and then up late (its
  first up in the second half of the rows) to 1/16, 1/8 or 1/4; rows of each segment.

For the three single-path networks the script also prices the dearest single path of the whole
space (any shape, by dynamic programming over the rows): a bound for any reading of the pattern.
For U-Net, which has no route within 5%, it also searches the routes with one of the three skip
chains left out: outside the pattern, printed only to show where the excess comes from.

    python benchmarks/table1_routes.py                  # 16 s of one core
    python benchmarks/table1_routes.py --smoke          # every 10th route only, a few seconds
    python benchmarks/table1_routes.py --json out.json  # also write the results as JSON

Measured figures and the table are in benchmarks/README.md ("Table 1's static networks") and
docs/model.md §8.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path as FilePath

from torch import nn

from dynroute.models.builder import NetworkConfig, build_network
from dynroute.models.cell import Cell
from dynroute.models.cost import count_flops
from dynroute.models.decoder import Decoder, SegmentationHead
from dynroute.models.routes import Route
from dynroute.models.routing_space import (
    DIRECTIONS,
    INIT_ROW,
    NUM_SCALES,
    Path,
    RoutingSpace,
    channels,
)
from dynroute.models.static_routes import STATIC_ROUTES, chain, hrnet_paths, unet_paths
from dynroute.models.stem import Stem
from dynroute.models.summary import summarize
from dynroute.models.transforms import build_transform

LAYERS = 16
HEIGHT, WIDTH = 1024, 2048
BASE_CHANNELS = 64
NUM_CLASSES = 19
TOLERANCE = 0.05
SMOKE_EVERY = 10
SCALE_NAMES = ("1/4", "1/8", "1/16", "1/32")


@dataclass(frozen=True)
class Paper:
    """One row of the paper's Table 1 and the named route we had for it."""

    network: str
    params: float  # M
    gflops: float
    route_name: str


TABLE1 = (
    Paper("FCN-32s", 2.9, 35.1, "fcn-32s"),
    Paper("DeepLabV3", 3.7, 42.5, "deeplab-v3"),
    Paper("U-Net", 6.1, 53.9, "unet"),
    Paper("HRNetV2", 5.4, 62.5, "hrnet-v2"),
    Paper("Auto-DeepLab", 2.5, 33.1, "auto-deeplab"),
)


# -- prices ----------------------------------------------------------------------------------------
def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class UnitCosts:
    """Params and multi-adds of each part of a static network, from the network's own modules.

    A route's price is the sum over its parts, counted as `models/cost.py` counts them: the init
    cell's parameters count but not its FLOPs; a path's transform counts unless it is a last-row
    keep into the decoder; decoder level k runs when the route feeds scale k or a coarser one,
    while the decoder's parameters are all built whatever it is fed.
    """

    def __init__(self, *, base_channels: int = BASE_CHANNELS, num_classes: int = NUM_CLASSES,
                 height: int = HEIGHT, width: int = WIDTH) -> None:
        stem = Stem(channels=base_channels)
        stem_flops, (_, h, w) = count_flops(stem, (3, height, width))
        head = SegmentationHead(base_channels=base_channels, num_classes=num_classes)
        decoder = Decoder(base_channels=base_channels)

        def shape(k: int) -> tuple[int, int, int]:
            return channels(k, base_channels), h >> k, w >> k

        self.fixed_params = _params(stem) + _params(head) + _params(decoder)
        self.fixed_flops = stem_flops.total + count_flops(head.classifier, shape(0))[0].total
        self.decoder_flops = [count_flops(decoder.levels[k], shape(k))[0].total
                              for k in range(NUM_SCALES)]
        self.cell: list[tuple[int, int]] = []
        for k in range(NUM_SCALES):
            cell = Cell(channels=channels(k, base_channels))
            self.cell.append((_params(cell), count_flops(cell.op, shape(k))[0].total))
        self.transform = {(k, d): (_params(block), count_flops(block, shape(k))[0].total)
                          for k in range(NUM_SCALES) for d in DIRECTIONS
                          for block in [build_transform(d, channels(k, base_channels))]}

    def price(self, paths: frozenset[Path], layers: int) -> tuple[int, int]:
        """(params, multi-adds) of the static network made of `paths`."""
        cells = {p.source for p in paths}
        params = self.fixed_params + sum(self.cell[k][0] for _, k in cells)
        flops = self.fixed_flops + sum(self.cell[k][1] for row, k in cells if row != INIT_ROW)
        for p in paths:
            p_params, p_flops = self.transform[(p.scale, p.direction)]
            params += p_params
            if p.target[0] < layers:  # not a last-row keep into the decoder
                flops += p_flops
        coarsest = max(p.scale for p in paths if p.row == layers - 1)
        flops += sum(self.decoder_flops[: coarsest + 1])
        return params, flops


# -- the patterns' routes -------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A route of a pattern: what was chosen, and its paths."""

    label: str
    paths: frozenset[Path]


def compositions(total: int, minimums: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every split of `total` rows into len(minimums) segments of at least minimums[i] rows."""
    if len(minimums) == 1:
        if total >= minimums[0]:
            yield (total,)
        return
    for first in range(minimums[0], total - sum(minimums[1:]) + 1):
        for rest in compositions(total - first, minimums[1:]):
            yield (first, *rest)


def rows_per_scale(levels: Sequence[int], lengths: Sequence[int]) -> str:
    """'1/4×3 → 1/8×4 → ...', leaving out empty segments."""
    return " → ".join(f"{SCALE_NAMES[k]}×{n}" for k, n in zip(levels, lengths, strict=True) if n)


def _single_path(levels: Sequence[int], lengths: Sequence[int], layers: int) -> Candidate:
    scales = [k for k, n in zip(levels, lengths, strict=True) for _ in range(n)]
    return Candidate(f"rows per scale {rows_per_scale(levels, lengths)}", chain(layers, scales))


def fcn_32s_routes(layers: int) -> Iterator[Candidate]:
    for lengths in compositions(layers, (0, 1, 1, 1)):
        yield _single_path(range(4), lengths, layers)


def deeplab_v3_routes(layers: int) -> Iterator[Candidate]:
    for lengths in compositions(layers, (0, 1, 1)):
        yield _single_path(range(3), lengths, layers)


def auto_deeplab_routes(layers: int) -> Iterator[Candidate]:
    for end in (2, 1, 0):
        levels = [0, 1, 2, 3, *range(2, end - 1, -1)]
        for lengths in compositions(layers, (0,) + (1,) * (len(levels) - 1)):
            if sum(lengths[:4]) >= layers // 2:  # the first up comes in the second half
                yield _single_path(levels, lengths, layers)


def unet_routes(layers: int, skips: Sequence[int] = (0, 1, 2)) -> Iterator[Candidate]:
    names = ", ".join(SCALE_NAMES[k] for k in skips)
    for back in (3, 2, 1):  # decoder levels: back up to 1/4, 1/8 or 1/16
        levels = [0, 1, 2, 3, *range(2, 2 - back, -1)]
        to_decoder = [SCALE_NAMES[k] for k in skips if k < 3 - back]
        label = f"skip chains at {names}"
        if to_decoder:
            label += f" ({', '.join(to_decoder)} on to the decoder)"
        for lengths in compositions(layers, (0,) + (1,) * (3 + back)):
            yield Candidate(f"rows per scale {rows_per_scale(levels, lengths)}; {label}",
                            unet_paths(layers, lengths[:4], lengths[4:], skips=skips))


def unet_two_skip_routes(layers: int) -> Iterator[Candidate]:
    """Outside U-Net's pattern: one of the three skip chains left out."""
    for left_out in (2, 1, 0):
        yield from unet_routes(layers, [k for k in range(3) if k != left_out])


def hrnet_v2_routes(layers: int) -> Iterator[Candidate]:
    seen: set[tuple[int, ...]] = set()
    for s1 in range(layers):
        for s2 in range(s1 + 1, layers):
            for s3 in range(s2 + 1, layers):
                for every in range(1, layers - 1):
                    for first in range(every):
                        # an exchange row before stream 1 runs exchanges nothing
                        rows = [r for r in range(first, layers - 1, every) if r >= s1]
                        if (key := (s1, s2, s3, *rows)) in seen:
                            continue
                        seen.add(key)
                        yield Candidate(f"streams start at rows [0, {s1}, {s2}, {s3}], exchange "
                                        f"every {every} rows from row {first}: rows {rows}",
                                        hrnet_paths(layers, (0, s1, s2, s3), rows))


PATTERNS: dict[str, Callable[[int], Iterator[Candidate]]] = {
    "FCN-32s": fcn_32s_routes,
    "DeepLabV3": deeplab_v3_routes,
    "U-Net": unet_routes,
    "HRNetV2": hrnet_v2_routes,
    "Auto-DeepLab": auto_deeplab_routes,
}
SINGLE_PATH = {"FCN-32s", "DeepLabV3", "Auto-DeepLab"}
# Searched only to show what the pattern's bound comes from; never offered as the network.
RELAXED: dict[str, tuple[str, Callable[[int], Iterator[Candidate]]]] = {
    "U-Net": ("one of the three skip chains left out", unet_two_skip_routes),
}


def dearest_single_path(costs: UnitCosts, layers: int) -> Candidate:
    """The single path of the whole space (any shape) with the most FLOPs, by DP over the rows."""
    space = RoutingSpace(layers)
    # best[k]: (FLOPs so far, scales so far) of the dearest path ending at scale k of the row
    best = {0: (0, [])}  # the init cell at 1/4; its own cell is not counted
    for row in range(layers):
        step: dict[int, tuple[int, list[int]]] = {}
        for k, (flops, scales) in best.items():
            for direction, dk in (("keep", 0), ("up", -1), ("down", 1)):
                j = k + dk
                if j not in space.scales(row) or (row == 0 and direction == "up"):
                    continue
                value = flops + costs.transform[(k, direction)][1] + costs.cell[j][1]
                if j not in step or value > step[j][0]:
                    step[j] = (value, [*scales, j])
        best = step
    k, (_, scales) = max(best.items(),
                         key=lambda kv: kv[1][0] + sum(costs.decoder_flops[: kv[0] + 1]))
    return Candidate("dearest single path of the space", chain(layers, scales))


# -- search and report ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Priced:
    label: str
    paths: frozenset[Path]
    params: int
    flops: int

    def errors(self, paper: Paper) -> tuple[float, float]:
        """Relative errors of params and GFLOPs against the paper's."""
        return self.params / (paper.params * 1e6) - 1, self.flops / (paper.gflops * 1e9) - 1

    def error(self, paper: Paper) -> float:
        return max(abs(e) for e in self.errors(paper))

    def to_dict(self, paper: Paper, name: str) -> dict:
        dp, df = self.errors(paper)
        return {"label": self.label, "params": self.params, "gflops": self.flops / 1e9,
                "params_error": dp, "gflops_error": df, "within": self.error(paper) <= TOLERANCE,
                "route": Route(LAYERS, self.paths, name=name, description=self.label).to_dict()}


def search(paper: Paper, costs: UnitCosts, routes: Callable[[int], Iterator[Candidate]], *,
           every: int = 1) -> tuple[Priced, list[Priced]]:
    """The route closest to the paper (largest relative error smallest), and all those priced:
    every route, or every `every`-th of the enumeration (smoke)."""
    priced = [Priced(c.label, c.paths, *costs.price(c.paths, LAYERS))
              for c in islice(routes(LAYERS), 0, None, every)]
    return min(priced, key=lambda p: p.error(paper)), priced  # ties: the first enumerated


def reasons(paper: Paper, priced: list[Priced]) -> list[str]:
    """Why no route of the pattern is within the tolerance of both figures (the bounds)."""
    lo, hi = 1 - TOLERANCE, 1 + TOLERANCE
    target_p, target_f = paper.params * 1e6, paper.gflops * 1e9
    params = [p.params for p in priced]
    flops = [p.flops for p in priced]
    out = []
    for values, target, published, bound in (
            (flops, target_f, paper.gflops, ("dearest", "cheapest", "costs {:.1f} GFLOPs", 1e9)),
            (params, target_p, paper.params, ("largest", "smallest", "holds {:.2f} M params",
                                              1e6))):
        above, below, amount, unit = bound
        if max(values) < lo * target:
            out.append(f"the {above} route of the pattern {amount.format(max(values) / unit)}, "
                       f"{max(values) / target - 1:+.1%} from {published}")
        if min(values) > hi * target:
            out.append(f"the {below} route of the pattern {amount.format(min(values) / unit)}, "
                       f"{min(values) / target - 1:+.1%} from {published}")
    if not out:
        near = [p.flops for p in priced if lo * target_p <= p.params <= hi * target_p]
        if near:
            out.append(f"the {len(near)} routes with params within {TOLERANCE:.0%} cost "
                       f"{min(near) / 1e9:.1f}–{max(near) / 1e9:.1f} GFLOPs "
                       f"({min(near) / target_f - 1:+.1%} to {max(near) / target_f - 1:+.1%})")
    return out


def checked(route: Route, costs: UnitCosts) -> tuple[int, int]:
    """Params and FLOPs of `route` from the built network (`dynroute model summary`), checked
    against the unit costs the search used."""
    network = build_network(NetworkConfig(layers=route.layers, gate="fixed", route=route,
                                          base_channels=BASE_CHANNELS, num_classes=NUM_CLASSES))
    report = summarize(network, HEIGHT, WIDTH)
    built = (report["params"], round(report["gflops"] * 1e9))
    if built != costs.price(route.paths, route.layers):
        raise AssertionError(f"route {route.name}: the unit costs give "
                             f"{costs.price(route.paths, route.layers)}, the built network "
                             f"{built}; benchmarks/table1_routes.py:UnitCosts is out of date")
    return built


def _figures(params: int, flops: int, paper: Paper) -> str:
    dp, df = params / (paper.params * 1e6) - 1, flops / (paper.gflops * 1e9) - 1
    return f"{params / 1e6:5.2f} M ({dp:+6.1%})  {flops / 1e9:5.1f} GFLOPs ({df:+6.1%})"


def run(costs: UnitCosts, *, every: int = 1) -> list[dict]:
    results = []
    dearest = dearest_single_path(costs, LAYERS)
    dearest_route = Route(LAYERS, dearest.paths, name="dearest-single-path",
                          description=dearest.label)
    dearest_params, dearest_flops = checked(dearest_route, costs)
    for paper in TABLE1:
        start = time.perf_counter()
        best, priced = search(paper, costs, PATTERNS[paper.network], every=every)
        name = f"{paper.route_name}-table1"
        best_route = Route(LAYERS, best.paths, name=name, description=best.label)  # validates
        checked(best_route, costs)
        today = STATIC_ROUTES[paper.route_name](LAYERS)
        today_params, today_flops = checked(today, costs)
        within = [p for p in priced if p.error(paper) <= TOLERANCE]
        result = {
            "network": paper.network,
            "paper": {"params_m": paper.params, "gflops": paper.gflops},
            "today": {"route": paper.route_name, "params": today_params,
                      "gflops": today_flops / 1e9},
            "candidates": len(priced),
            "within_count": len(within),
            "best": best.to_dict(paper, name),
            "bounds": {"params": [min(p.params for p in priced), max(p.params for p in priced)],
                       "gflops": [min(p.flops for p in priced) / 1e9,
                                  max(p.flops for p in priced) / 1e9]},
            "reasons": [] if within else reasons(paper, priced),
            "seconds": time.perf_counter() - start,
        }
        if paper.network in SINGLE_PATH:
            result["single_path_bound"] = {"params": dearest_params,
                                           "gflops": dearest_flops / 1e9,
                                           "route": dearest_route.to_dict()}
            if dearest_flops < (1 - TOLERANCE) * paper.gflops * 1e9:
                gap = dearest_flops / (paper.gflops * 1e9) - 1
                result["reasons"].append(f"no single path of the space reaches it: the dearest "
                                         f"(any shape) costs {dearest_flops / 1e9:.1f} GFLOPs, "
                                         f"{gap:+.1%}")
        if not within and paper.network in RELAXED:
            what, routes = RELAXED[paper.network]
            relaxed, _ = search(paper, costs, routes, every=every)
            checked(Route(LAYERS, relaxed.paths, name=f"{name}-relaxed"), costs)
            result["outside_pattern"] = {"what": what, **relaxed.to_dict(paper, f"{name}-relaxed")}
        results.append(result)
        print(f"\n{paper.network}: {len(priced)} routes of the pattern searched "
              f"in {result['seconds']:.1f} s; {len(within)} within {TOLERANCE:.0%} of both")
        print(f"  paper          {paper.params:5.2f} M            {paper.gflops:5.1f} GFLOPs")
        print(f"  ours today     {_figures(today_params, today_flops, paper)}  "
              f"[{paper.route_name}]")
        print(f"  closest route  {_figures(best.params, best.flops, paper)}  "
              f"within {TOLERANCE:.0%}: {'yes' if result['best']['within'] else 'no'}")
        print(f"                 {best.label}")
        b = result["bounds"]
        print(f"  pattern spans  {b['params'][0] / 1e6:.2f}–{b['params'][1] / 1e6:.2f} M, "
              f"{b['gflops'][0]:.1f}–{b['gflops'][1]:.1f} GFLOPs")
        for reason in result["reasons"]:
            print(f"  no route: {reason}")
        if "outside_pattern" in result:
            o = result["outside_pattern"]
            print(f"  outside the pattern ({o['what']}): "
                  f"{_figures(o['params'], round(o['gflops'] * 1e9), paper)}  "
                  f"within {TOLERANCE:.0%}: {'yes' if o['within'] else 'no'}")
            print(f"                 {o['label']}")
    return results


def print_table(results: list[dict]) -> None:
    print("\n| network | paper params / GFLOPs | ours before | closest route of the pattern "
          "| within 5% |")
    print("|---|---|---|---|---|")
    for r in results:
        b, t = r["best"], r["today"]
        print(f"| {r['network']} | {r['paper']['params_m']} M / {r['paper']['gflops']} "
              f"| {t['params'] / 1e6:.2f} M / {t['gflops']:.1f} "
              f"| {b['params'] / 1e6:.2f} M ({b['params_error']:+.1%}) / {b['gflops']:.1f} "
              f"({b['gflops_error']:+.1%}) | {'yes' if b['within'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=FilePath, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help=f"price every {SMOKE_EVERY}th route of each pattern only (for CI)")
    args = parser.parse_args()
    every = SMOKE_EVERY if args.smoke else 1
    start = time.perf_counter()
    costs = UnitCosts()
    print(f"Table 1's static networks, L={LAYERS} at {HEIGHT}x{WIDTH}, C0={BASE_CHANNELS}; "
          f"each printed route checked against the built network's summary"
          + (f"\nsmoke: every {every}th route of each pattern only" if args.smoke else ""))
    results = run(costs, every=every)
    print_table(results)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"layers": LAYERS, "resolution": [HEIGHT, WIDTH],
                                         "tolerance": TOLERANCE, "smoke": args.smoke,
                                         "networks": results}, indent=2))


if __name__ == "__main__":
    main()
