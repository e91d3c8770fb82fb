"""Routes as data: the paths a network uses in the routing space (paper Fig. 3; docs/model.md §8).

A route is a set of `Path`s. Its cells are the sources of its paths (the init cell included), so a
route needs no separate list of cells. A valid route is connected both ways: every routing cell on
it receives at least one of its paths, and every cell on it sends at least one path onwards (a
last-row cell sends its keep path to the decoder).

On disk a route is JSON or YAML:

    name: fcn-32s
    layers: 16
    description: ...
    paths: ["-1:0:keep", "0:0:keep", ...]      # row:scale:direction
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FilePath

from .routing_space import INIT_ROW, NodeId, Path, RoutingSpace


class RouteError(ValueError):
    """A route that does not fit the routing space or is not connected."""


@dataclass(frozen=True)
class Route:
    """A connected set of paths in a routing space of `layers` rows."""

    layers: int
    paths: frozenset[Path]
    name: str = "custom"
    description: str = ""
    _space: RoutingSpace = field(init=False, repr=False, compare=False)
    _cells: frozenset[NodeId] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", frozenset(self.paths))
        object.__setattr__(self, "_space", RoutingSpace(self.layers))
        # derived once: the hard forward asks for it per row of every image
        object.__setattr__(self, "_cells", frozenset(p.source for p in self.paths))
        self._validate()

    @classmethod
    def full(cls, layers: int) -> Route:
        """Every cell and path of the space ("Network-Fix" when the gates are fixed)."""
        return cls(layers, frozenset(RoutingSpace(layers).paths()), name="network-fix",
                   description="every cell and every path of the routing space")

    @property
    def space(self) -> RoutingSpace:
        return self._space

    # -- derived structure -------------------------------------------------------------------
    @property
    def cells(self) -> frozenset[NodeId]:
        """Nodes on the route (the init cell included)."""
        return self._cells

    def paths_of(self, node: NodeId) -> tuple[Path, ...]:
        """The route's paths leaving `node`, in gate column order."""
        return tuple(p for p in self.space.paths_of(node) if p in self.paths)

    def incoming(self, node: NodeId) -> tuple[Path, ...]:
        return tuple(p for p in self.space.incoming(node) if p in self.paths)

    def decoder_scales(self) -> tuple[int, ...]:
        """Scales whose last-row keep output reaches the decoder."""
        last = self.space.last_row
        return tuple(sorted(p.scale for p in self.paths if p.row == last))

    # -- validation --------------------------------------------------------------------------
    def _validate(self) -> None:
        space = self.space
        if not self.paths:
            raise RouteError(f"route {self.name!r} has no paths")
        for p in sorted(self.paths):
            if not space.has_node(p.source) or p not in space.paths_of(p.source):
                raise RouteError(f"route {self.name!r}: path {p} does not exist in a routing "
                                 f"space of {self.layers} rows")
        cells = self.cells
        if (INIT_ROW, 0) not in cells:
            raise RouteError(f"route {self.name!r} does not leave the init cell "
                             f"(add '-1:0:keep' or '-1:0:down')")
        for node in sorted(cells):
            if node[0] != INIT_ROW and not self.incoming(node):
                raise RouteError(f"route {self.name!r}: cell {node} has paths out but none in; "
                                 f"add a path into it or remove its paths")
        for p in sorted(self.paths):
            target = p.target
            if target[0] < self.layers and target not in cells:
                raise RouteError(f"route {self.name!r}: path {p} leads to cell {target}, which "
                                 f"has no path out; add one or remove {p}")

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layers": self.layers,
            "description": self.description,
            "paths": [str(p) for p in sorted(self.paths)],
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "route") -> Route:
        if not isinstance(data, dict):
            raise RouteError(f"{source}: expected a mapping with 'layers' and 'paths'")
        unknown = set(data) - {"name", "layers", "description", "paths"}
        if unknown:
            raise RouteError(f"{source}: unknown keys {sorted(unknown)}; "
                             f"allowed: name, layers, description, paths")
        for key in ("layers", "paths"):
            if key not in data:
                raise RouteError(f"{source}: missing key {key!r}")
        if not isinstance(data["layers"], int):
            raise RouteError(f"{source}: 'layers' must be an integer, got {data['layers']!r}")
        if not isinstance(data["paths"], list):
            raise RouteError(f"{source}: 'paths' must be a list of 'row:scale:direction'")
        try:
            paths = frozenset(Path.parse(str(p)) for p in data["paths"])
            return cls(data["layers"], paths, name=str(data.get("name", "custom")),
                       description=str(data.get("description", "")))
        except ValueError as err:  # RouteError is a ValueError too
            raise RouteError(f"{source}: {err}") from None

    def save(self, path: str | FilePath) -> None:
        """Write JSON (`.json`) or YAML (anything else) atomically."""
        import yaml  # only for files: the network itself needs nothing beyond torch

        path = FilePath(path)
        data = self.to_dict()
        text = (json.dumps(data, indent=2) + "\n" if path.suffix == ".json"
                else yaml.safe_dump(data, sort_keys=False))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | FilePath) -> Route:
        import yaml

        path = FilePath(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise RouteError(f"cannot read route file {path}: {err.strerror}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise RouteError(f"route file {path} is not valid JSON/YAML: {err}") from None
        return cls.from_dict(data, source=f"route file {path}")

    # -- display -----------------------------------------------------------------------------
    def render(self) -> str:
        """The route on the lattice as text: one line per row, one column per scale.

        `#` is a cell on the route, `.` a cell of the space off it; after each row the paths
        leaving it: `/` up, `|` keep, `\\` down (to the coarser scale on the right).
        """
        lines = ["row   1/4  1/8  1/16 1/32"]
        glyph = {"up": "/", "keep": "|", "down": "\\"}
        for row in range(INIT_ROW, self.layers):
            marks = []
            for k in range(4):
                if not self.space.has_node((row, k)):
                    marks.append("     ")
                else:
                    marks.append("  #  " if (row, k) in self.cells else "  .  ")
            lines.append(f"{row:>3} " + "".join(marks).rstrip())
            moves = ["".join(glyph[d] for d in ("up", "keep", "down")
                             if Path(row, k, d) in self.paths).center(5) for k in range(4)]
            if any(m.strip() for m in moves):
                lines.append("    " + "".join(moves).rstrip())
        return "\n".join(lines)


def union(name: str, layers: int, parts: Iterable[Iterable[Path]], description: str = "") -> Route:
    """A route made of the union of several path sets."""
    paths: set[Path] = set()
    for part in parts:
        paths.update(part)
    return Route(layers, frozenset(paths), name=name, description=description)
