"""Route statistics of a dynamic network and Common-X extraction (Fig. 4; docs/model.md §8).

At inference the network reports, for every node (row, scale) of its route, the init cell
included, the gate values α of shape (B, g) in the order `route.paths_of(node)` (keep, up, down).
A path is *open* for a sample when α > threshold (1e-4 by default, as for skipping at inference);
a node the sample never reached reports α = 0. `RouteStatistics` counts, over a split, how often
each path and cell was open and how often each whole per-sample route occurred.

"Common-X" (the paper's static Common-95 etc.) keeps the paths open in more than X of the forward
passes, then prunes what is no longer connected from the init cell to the decoder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from .routes import Route
from .routing_space import INIT_ROW, NUM_SCALES, NodeId, Path

DEFAULT_OPEN_THRESHOLD = 1e-4
DEFAULT_COMMON_THRESHOLD = 0.95
_DICT_KEYS = {"route", "threshold", "samples", "path_counts", "cell_counts", "route_counts"}


def _node_str(node: NodeId) -> str:
    return f"{node[0]}:{node[1]}"


def _parse_node(text: str) -> NodeId:
    row, _, scale = text.partition(":")
    try:
        return int(row), int(scale)
    except ValueError:
        raise ValueError(f"cell {text!r} is not of the form 'row:scale'") from None


class RouteStatistics:
    """Counts of open paths, open cells and whole per-sample routes over many forward passes.

    Args:
        route: the route whose gates are reported (`Route.full(L)` for a dynamic network).
        threshold: a path is open for a sample when its α exceeds this.
    """

    def __init__(self, route: Route, *, threshold: float = DEFAULT_OPEN_THRESHOLD) -> None:
        if threshold < 0:
            raise ValueError(f"RouteStatistics: threshold={threshold} must be >= 0")
        self.route = route
        self.threshold = threshold
        self._nodes: tuple[NodeId, ...] = tuple(sorted(route.cells))
        # Column order of the per-sample open matrix: node by node, gate order within a node.
        self._columns: tuple[Path, ...] = tuple(p for n in self._nodes for p in route.paths_of(n))
        self._path_counts: dict[Path, int] = dict.fromkeys(self._columns, 0)
        self._cell_counts: dict[NodeId, int] = dict.fromkeys(self._nodes, 0)
        self._route_counts: Counter[frozenset[Path]] = Counter()
        self._samples = 0

    @property
    def samples(self) -> int:
        """Forward passes (samples) counted so far."""
        return self._samples

    def update(self, gates: Mapping[NodeId, torch.Tensor]) -> None:
        """Add one batch of forward passes.

        Args:
            gates: node -> α of shape (B, g), columns in `route.paths_of(node)` order. A node
                missing from the mapping counts as closed for every sample.
        """
        unknown = sorted(set(gates) - set(self._nodes), key=str)
        if unknown:
            raise ValueError(f"gates for nodes {unknown} that are not cells of route "
                             f"{self.route.name!r}")
        if not gates:
            raise ValueError("update() got no gates; pass the network's per-node gate tensors")
        batch = next(iter(gates.values())).shape[0]
        masks = []
        for node in self._nodes:
            width = len(self.route.paths_of(node))
            alpha = gates.get(node)
            if alpha is None:
                masks.append(torch.zeros(batch, width, dtype=torch.bool))
                continue
            if alpha.shape != (batch, width):
                raise ValueError(f"gates of node {node} have shape {tuple(alpha.shape)}; expected "
                                 f"({batch}, {width}) = (batch, paths of the node on the route)")
            masks.append((alpha.detach() > self.threshold).cpu())  # (B, g)
        opened = torch.cat(masks, dim=1)  # (B, P)
        cell_open = torch.stack([m.any(dim=1) for m in masks], dim=1)  # (B, N)
        for path, count in zip(self._columns, opened.sum(dim=0).tolist(), strict=True):
            self._path_counts[path] += count
        for node, count in zip(self._nodes, cell_open.sum(dim=0).tolist(), strict=True):
            self._cell_counts[node] += count
        # Identical per-sample routes are counted once per batch, not once per sample.
        rows, counts = torch.unique(opened.to(torch.uint8), dim=0, return_counts=True)
        for row, count in zip(rows.tolist(), counts.tolist(), strict=True):
            key = frozenset(p for p, bit in zip(self._columns, row, strict=True) if bit)
            self._route_counts[key] += count
        self._samples += batch

    # -- summaries ---------------------------------------------------------------------------
    def _require_samples(self) -> None:
        if self._samples == 0:
            raise ValueError("no forward passes counted yet; call update() first")

    def path_frequency(self) -> dict[Path, float]:
        """Fraction of samples in which each path of the route was open."""
        self._require_samples()
        return {p: self._path_counts[p] / self._samples for p in sorted(self._columns)}

    def cell_frequency(self) -> dict[NodeId, float]:
        """Fraction of samples in which each cell had at least one open path."""
        self._require_samples()
        return {n: self._cell_counts[n] / self._samples for n in self._nodes}

    def route_counts(self) -> Counter[frozenset[Path]]:
        """How often each whole per-sample route (its set of open paths) occurred."""
        return Counter(self._route_counts)

    # -- combining and saving ----------------------------------------------------------------
    def merge(self, other: RouteStatistics) -> None:
        """Add the counts of `other` (e.g. from another worker) to these."""
        if (other.route.layers, other.route.paths) != (self.route.layers, self.route.paths):
            raise ValueError(f"cannot merge statistics of route {other.route.name!r} into route "
                             f"{self.route.name!r}: they differ in layers or paths")
        if other.threshold != self.threshold:
            raise ValueError(f"cannot merge statistics taken at open threshold {other.threshold} "
                             f"into ones taken at {self.threshold}")
        for path, count in other._path_counts.items():
            self._path_counts[path] += count
        for node, count in other._cell_counts.items():
            self._cell_counts[node] += count
        self._route_counts.update(other._route_counts)
        self._samples += other._samples

    def to_dict(self) -> dict:
        """JSON-safe form; paths as 'row:scale:direction', cells as 'row:scale'."""
        return {
            "route": self.route.to_dict(),
            "threshold": self.threshold,
            "samples": self._samples,
            "path_counts": {str(p): c for p, c in sorted(self._path_counts.items())},
            "cell_counts": {_node_str(n): c for n, c in sorted(self._cell_counts.items())},
            "route_counts": [
                {"paths": sorted(str(p) for p in paths), "count": count}
                for paths, count in self._route_counts.most_common()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "route statistics") -> RouteStatistics:
        """Inverse of `to_dict`."""
        if not isinstance(data, Mapping) or set(data) != _DICT_KEYS:
            found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{source}: expected keys {sorted(_DICT_KEYS)}, got {found}")
        stats = cls(Route.from_dict(data["route"], source=source),
                    threshold=float(data["threshold"]))
        for text, count in data["path_counts"].items():
            path = Path.parse(text)
            if path not in stats._path_counts:
                raise ValueError(f"{source}: path {text} is not on the route")
            stats._path_counts[path] = int(count)
        for text, count in data["cell_counts"].items():
            node = _parse_node(text)
            if node not in stats._cell_counts:
                raise ValueError(f"{source}: cell {text} is not on the route")
            stats._cell_counts[node] = int(count)
        for entry in data["route_counts"]:
            key = frozenset(Path.parse(text) for text in entry["paths"])
            stats._route_counts[key] += int(entry["count"])
        stats._samples = int(data["samples"])
        return stats


# -- Common-X ------------------------------------------------------------------------------------
def _connected(paths: set[Path], layers: int) -> set[Path]:
    """The paths on some chain of `paths` from the init cell to the decoder."""
    by_row = sorted(paths, key=lambda p: p.row)
    reached: set[NodeId] = {(INIT_ROW, 0)}
    forward = []
    for p in by_row:  # a path only feeds the next row, so one pass in row order suffices
        if p.source in reached:
            forward.append(p)
            reached.add(p.target)
    # The decoder's inputs are the targets (L, k) of the last row's keep paths.
    alive: set[NodeId] = {(layers, k) for k in range(NUM_SCALES)}
    kept = set()
    for p in reversed(forward):
        if p.target in alive:
            kept.add(p)
            alive.add(p.source)
    return kept


def common_x(
    stats_or_frequencies: RouteStatistics | Mapping[Path, float],
    *,
    threshold: float = DEFAULT_COMMON_THRESHOLD,
    name: str | None = None,
    layers: int | None = None,
) -> Route:
    """The static route of paths open in more than `threshold` of the forward passes.

    Args:
        stats_or_frequencies: statistics of a trained dynamic model over a split, or a mapping
            path -> frequency of being open (then `layers` is required).
        threshold: keep a path when its frequency is strictly above this (0.95 for Common-95).
        name: route name; default f"common-{X}" with X the threshold in percent.
        layers: rows of the routing space; only for a mapping.

    Returns:
        The kept paths that lie on a chain from the init cell to the decoder, as a valid route.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"common_x: threshold={threshold} must be in [0, 1)")
    if isinstance(stats_or_frequencies, RouteStatistics):
        stats = stats_or_frequencies
        if layers is not None and layers != stats.route.layers:
            raise ValueError(f"common_x: layers={layers} but the statistics are of a route "
                             f"with {stats.route.layers} rows; leave layers out")
        layers = stats.route.layers
        frequencies: Mapping[Path, float] = stats.path_frequency()
        origin = f"{stats.samples} forward passes of route {stats.route.name!r}"
    else:
        if layers is None:
            raise ValueError("common_x: pass layers=L together with a path -> frequency mapping")
        frequencies = stats_or_frequencies
        origin = "the given path frequencies"
    percent = round(threshold * 100)  # round, not int: int(0.29 * 100) == 28
    above = {p for p, f in frequencies.items() if f > threshold}
    kept = _connected(above, layers)
    if not kept:
        raise ValueError(f"common_x: no route from the init cell to the decoder remains at "
                         f"threshold {threshold} ({len(above)} paths passed it, none connected); "
                         f"try a lower threshold")
    return Route(layers, frozenset(kept), name=name or f"common-{percent}",
                 description=f"Common-{percent}: paths open in more than {percent}% of {origin}, "
                             f"pruned to those connecting the init cell to the decoder")
