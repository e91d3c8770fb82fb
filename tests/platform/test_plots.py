"""Lattice plots: they write PNGs that Pillow opens, and the pictures encode the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynroute.models import Route
from dynroute.models.routing_space import Path as RoutePath
from dynroute.models.routing_space import RoutingSpace
from dynroute.models.static_routes import static_route
from dynroute.platform.evaluate.plots import plot_gate_probability, plot_route


def pixels(path: Path) -> np.ndarray:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("layers", [4, 16])
def test_gate_probability_plot_encodes_the_probabilities(layers, tmp_path) -> None:
    paths = RoutingSpace(layers).paths()
    target = RoutePath(1, 1, "down")
    closed = {p: 0.0 for p in paths}
    opened = closed | {target: 1.0}
    a = plot_gate_probability(closed, layers, tmp_path / "closed.png")
    b = plot_gate_probability(opened, layers, tmp_path / "opened.png")
    assert a == tmp_path / "closed.png"
    image_a, image_b = pixels(a), pixels(b)
    assert image_a.shape == image_b.shape
    changed = np.any(image_a != image_b, axis=-1).sum()
    assert changed > 50  # a thick coloured segment, not a stray pixel
    # A mapping with a few paths only is fine: the rest count as never open.
    c = plot_gate_probability({target: 1.0}, layers, tmp_path / "sparse.png")
    assert np.array_equal(pixels(c), image_b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed.png", "opened.png",
                                                         "sparse.png"]


def test_gate_probability_plot_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="not in a routing space of 4 rows"):
        plot_gate_probability({RoutePath(10, 0, "keep"): 0.5}, 4, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_gate_probability({RoutePath(0, 0, "keep"): 1.5}, 4, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layers", [4, 16])
def test_route_plot_encodes_the_route(layers, tmp_path) -> None:
    full = plot_route(Route.full(layers), tmp_path / "full.png", title="all")
    fcn = plot_route(static_route("fcn-32s", layers), tmp_path / "fcn.png", title="all")
    image_full, image_fcn = pixels(full), pixels(fcn)
    assert image_full.shape == image_fcn.shape
    assert np.any(image_full != image_fcn, axis=-1).sum() > 500
    # Same cells, one path fewer: the lines are drawn from the route's paths.
    full = Route.full(layers)
    fewer = Route(layers, full.paths - {RoutePath(1, 1, "up")}, name=full.name)
    assert fewer.cells == full.cells
    one_less = plot_route(fewer, tmp_path / "fewer.png", title="all")
    assert np.any(pixels(one_less) != image_full, axis=-1).sum() > 50
    one_less.unlink()
    # The default title names the route; the file is replaced in place, no temp left.
    plot_route(static_route("fcn-32s", layers), tmp_path / "fcn.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.png", "full.png"]
