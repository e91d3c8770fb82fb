"""Pictures of the routing lattice: how often each path opened (paper Fig. 5), single routes, and
the way one image went through the network (read off its gates).

The lattice is drawn with rows left to right (the init cell first, at x = -1) and scales top to
bottom (1/4 at the top, 1/32 at the bottom); a path is a segment from its cell to the cell it feeds
in the next row, and the last row's keep paths end at the decoder (squares at x = L). Figures are
made with matplotlib's Agg canvas directly (no pyplot, no display, no global figure state) and
written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path as FilePath

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from dynroute.models.routes import Route, RouteError
from dynroute.models.routing_space import INIT_ROW, NUM_SCALES, NodeId, Path, RoutingSpace

SCALE_NAMES = ("1/4", "1/8", "1/16", "1/32")
PROBABILITY_CMAP = "plasma_r"
MIN_WIDTH, MAX_WIDTH = 0.6, 4.5  # line width of a path opened never / always
FAINT = "#c8c8c8"
DPI = 120


def _xy(node: NodeId) -> tuple[float, float]:
    """Plot coordinates of a node: x = row, y = -scale (finest on top)."""
    return float(node[0]), -float(node[1])


def _figure(layers: int) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(max(6.0, 0.32 * (layers + 4)), 3.4), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(INIT_ROW - 0.7, layers + 0.7)
    ax.set_ylim(-(NUM_SCALES - 1) - 0.5, 0.5)
    ax.set_yticks([-k for k in range(NUM_SCALES)], SCALE_NAMES)
    step = 1 if layers <= 16 else 4
    rows = [r for r in range(0, layers, step) if r == 0 or r < layers - 1]  # room for "dec"
    ax.set_xticks([INIT_ROW, *rows, layers], ["init", *map(str, rows), "dec"])
    ax.set_xlabel("row")
    ax.set_ylabel("scale")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _segment(path: Path) -> tuple[list[float], list[float]]:
    (x0, y0), (x1, y1) = _xy(path.source), _xy(path.target)
    return [x0, x1], [y0, y1]


def _save(fig: Figure, out: FilePath) -> FilePath:
    out = FilePath(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save leaves no part behind
    return out


def plot_gate_probability(probability: Mapping[Path, float], layers: int,
                          out: FilePath) -> FilePath:
    """The lattice with every path drawn by how often it was open.

    Args:
        probability: path → fraction of forward passes in which it was open (e.g.
            `EvaluationResult.gate_probability`); a path missing from it counts as never open.
        layers: L, the rows of the routing space.
        out: the PNG to write.

    Returns:
        `out`.
    """
    space = RoutingSpace(layers)
    paths = set(space.paths())
    unknown = sorted(set(probability) - paths)
    if unknown:
        raise ValueError(f"paths {[str(p) for p in unknown[:5]]} are not in a routing space of "
                         f"{layers} rows; pass the layers of the network they came from")
    bad = {str(p): f for p, f in probability.items() if not 0.0 <= f <= 1.0}
    if bad:
        raise ValueError(f"probabilities must lie in [0, 1]; got {bad}")
    fig, ax = _figure(layers)
    cmap, norm = colormaps[PROBABILITY_CMAP], Normalize(0.0, 1.0)
    # Draw rarely open paths first so that the frequent ones stay visible where lines cross.
    for path in sorted(paths, key=lambda p: (probability.get(p, 0.0), p)):
        f = float(probability.get(path, 0.0))
        xs, ys = _segment(path)
        ax.plot(xs, ys, color=cmap(norm(f)), linewidth=MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * f,
                solid_capstyle="round", zorder=1 + f)
    nodes = space.nodes(include_init=True)
    ax.scatter([_xy(n)[0] for n in nodes], [_xy(n)[1] for n in nodes], s=14, color="black",
               zorder=3)
    ax.scatter([layers] * NUM_SCALES, [-k for k in range(NUM_SCALES)], marker="s", s=30,
               color="dimgray", zorder=3)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.03, pad=0.01,
                 label="P(open)")
    ax.set_title(f"Gate probability, L = {layers}")
    return _save(fig, out)


def _draw_open_paths(ax, paths) -> None:
    """Open paths as solid lines between their cells."""
    for path in sorted(paths):
        xs, ys = _segment(path)
        ax.plot(xs, ys, color="tab:blue", linewidth=2.2, solid_capstyle="round", zorder=1)


def plot_route(route: Route, out: FilePath, *, title: str = "") -> FilePath:
    """One route on the lattice: its cells filled, its paths as lines, other cells faint.

    Args:
        route: the route to draw.
        out: the PNG to write.
        title: figure title; default the route's name.

    Returns:
        `out`.
    """
    layers = route.layers
    fig, ax = _figure(layers)
    _draw_open_paths(ax, route.paths)
    off = [n for n in route.space.nodes(include_init=True) if n not in route.cells]
    ax.scatter([_xy(n)[0] for n in off], [_xy(n)[1] for n in off], s=10, color=FAINT, zorder=2)
    on = sorted(route.cells)
    ax.scatter([_xy(n)[0] for n in on], [_xy(n)[1] for n in on], s=40, color="tab:orange",
               edgecolors="black", linewidths=0.6, zorder=3)
    fed = route.decoder_scales()
    ax.scatter([layers] * len(fed), [-k for k in fed], marker="s", s=40, color="dimgray",
               zorder=3)
    ax.set_title(title or f"Route {route.name} ({len(route.paths)} paths, "
                          f"{len(route.cells)} cells)")
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# The route one image took


@dataclass(frozen=True)
class TakenRoute:
    """Where one image went through a routing network, read off its gates.

    A cell whose paths all closed passes its input on unchanged along its keep path (Eq. 5–6);
    such a *skipped* cell makes the set of open paths an invalid `Route` (an open path then leads
    to a cell with no path out), so the taken route is kept as plain sets.

    Attributes:
        layers: L, the rows of the routing space.
        open_paths: paths whose gate α exceeded the closed threshold at a reached cell.
        reached: cells that received the image's features (the init cell included).
        skipped: reached cells with every path closed.
        passed_on: keep paths along which skipped cells handed their input on unchanged.
        decoder_scales: scales whose features reached the decoder.
    """

    layers: int
    open_paths: frozenset[Path]
    reached: frozenset[NodeId]
    skipped: frozenset[NodeId]
    passed_on: frozenset[Path]
    decoder_scales: tuple[int, ...]

    def as_route(self, name: str = "taken") -> Route | None:
        """The open paths as a `Route`, or None when they do not form a valid one."""
        if not self.open_paths:
            return None
        try:
            return Route(self.layers, self.open_paths, name=name)
        except RouteError:
            return None


def taken_route(route: Route, gates: Mapping[NodeId, Sequence], *, threshold: float,
                sample: int = 0) -> TakenRoute:
    """The route sample `sample` of a batch took, from the network's hard-routing gates.

    Args:
        route: the network's route (`network.route`): which paths each cell has.
        gates: `RoutingOutput.gates`, node → α (B, g) in `route.paths_of(node)` order; cells the
            sample never reached hold zeros.
        threshold: a path is open when α > threshold (`network.closed_threshold`).
        sample: which row of the batch.

    Returns:
        Open paths, reached and skipped cells and the decoder inputs, found by following the
        features from the init cell row by row (α alone cannot tell an unreached cell from a
        skipped one: both have every α at zero).
    """
    reached = {(INIT_ROW, 0)}
    opened: set[Path] = set()
    skipped: set[NodeId] = set()
    passed: set[Path] = set()
    for node in route.space.nodes(include_init=True):  # row by row: targets come later
        if node not in reached:
            continue
        paths = route.paths_of(node)
        if not paths:
            continue
        if node not in gates:
            raise ValueError(f"no gates for cell {node}, which the features reached; pass the "
                             f"gates of the network whose route this is")
        alpha = [float(a) for a in gates[node][sample]]
        if len(alpha) != len(paths):
            raise ValueError(f"gates of cell {node} have {len(alpha)} columns; its route has "
                             f"{len(paths)} paths ({', '.join(map(str, paths))})")
        out = [p for p, a in zip(paths, alpha, strict=True) if a > threshold]
        if not out:
            skipped.add(node)
            out = [p for p in paths if p.direction == "keep"]
            passed.update(out)
        else:
            opened.update(out)
        reached.update(p.target for p in out)
    decoder = tuple(sorted(k for row, k in reached if row == route.layers))
    return TakenRoute(layers=route.layers, open_paths=frozenset(opened),
                      reached=frozenset(n for n in reached if n[0] < route.layers),
                      skipped=frozenset(skipped), passed_on=frozenset(passed),
                      decoder_scales=decoder)


def plot_taken_route(taken: TakenRoute, out: FilePath, *, title: str = "") -> FilePath:
    """The route one image took: open paths as lines, input passed on by skipped cells dashed,
    reached cells filled, skipped cells hollow, unreached cells faint.

    Works for any set of open paths, including ones that are not a valid `Route`.

    Args:
        taken: from `taken_route`.
        out: the PNG to write.
        title: figure title; default a count of paths and cells.

    Returns:
        `out`.
    """
    layers = taken.layers
    fig, ax = _figure(layers)
    _draw_open_paths(ax, taken.open_paths)
    for path in sorted(taken.passed_on):
        xs, ys = _segment(path)
        ax.plot(xs, ys, color="gray", linewidth=1.4, linestyle=(0, (2, 2)), zorder=1)
    space = RoutingSpace(layers)
    off = [n for n in space.nodes(include_init=True) if n not in taken.reached]
    ax.scatter([_xy(n)[0] for n in off], [_xy(n)[1] for n in off], s=10, color=FAINT, zorder=2)
    ran = sorted(taken.reached - taken.skipped)
    ax.scatter([_xy(n)[0] for n in ran], [_xy(n)[1] for n in ran], s=40, color="tab:orange",
               edgecolors="black", linewidths=0.6, zorder=3, label="cell ran")
    if taken.skipped:
        hollow = sorted(taken.skipped)
        ax.scatter([_xy(n)[0] for n in hollow], [_xy(n)[1] for n in hollow], s=40,
                   facecolors="white", edgecolors="tab:orange", linewidths=1.4, zorder=3,
                   label="cell skipped")
    fed = taken.decoder_scales
    ax.scatter([layers] * len(fed), [-k for k in fed], marker="s", s=40, color="dimgray",
               zorder=3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    ax.set_title(title or f"Route taken ({len(taken.open_paths)} open paths, "
                          f"{len(taken.reached) - len(taken.skipped)} cells ran, "
                          f"{len(taken.skipped)} skipped)")
    return _save(fig, out)
