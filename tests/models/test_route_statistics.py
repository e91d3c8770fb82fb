"""Route statistics and Common-X extraction (docs/model.md §8)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest
import torch

from dynroute.models.route_statistics import RouteStatistics, common_x
from dynroute.models.routes import Route
from dynroute.models.routing_space import Path
from dynroute.models.static_routes import chain

LAYERS = 4
FULL = Route.full(LAYERS)
# Two per-sample routes through a 4-row space.
ROUTE_A = chain(LAYERS, [0, 0, 0, 0])
ROUTE_B = chain(LAYERS, [1, 1, 0, 0])  # shares rows 2-3 at 1/4 with A


def P(text: str) -> Path:
    return Path.parse(text)


def make_gates(samples: list[Iterable[Path]], *, route: Route = FULL, on: float = 0.7,
               off: float = 0.0) -> dict[tuple[int, int], torch.Tensor]:
    """Gates (B, g) per node with α = `on` for each sample's open paths and `off` elsewhere."""
    opened = [set(s) for s in samples]
    gates = {}
    for node in route.cells:
        columns = route.paths_of(node)
        gates[node] = torch.tensor([[on if p in s else off for p in columns] for s in opened])
    return gates


def test_frequencies_over_several_updates() -> None:
    stats = RouteStatistics(FULL)
    stats.update(make_gates([ROUTE_A, ROUTE_A, ROUTE_B]))
    stats.update(make_gates([ROUTE_A]))
    assert stats.samples == 4
    freq = stats.path_frequency()
    assert set(freq) == FULL.paths
    for path in FULL.paths:
        expected = 0.75 * (path in ROUTE_A) + 0.25 * (path in ROUTE_B)
        assert freq[path] == expected, path
    assert freq[P("2:0:keep")] == 1.0 and freq[P("0:0:keep")] == 0.75
    assert freq[P("-1:0:down")] == 0.25 and freq[P("3:3:keep")] == 0.0
    cells = stats.cell_frequency()
    assert set(cells) == FULL.cells
    assert cells[(-1, 0)] == 1.0 and cells[(0, 0)] == 0.75 and cells[(1, 1)] == 0.25
    assert cells[(2, 3)] == 0.0


def test_route_counts_count_identical_per_sample_routes() -> None:
    stats = RouteStatistics(FULL)
    stats.update(make_gates([ROUTE_A, ROUTE_B, ROUTE_A]))
    stats.update(make_gates([ROUTE_A, set()]))
    counts = stats.route_counts()
    assert counts == {ROUTE_A: 3, ROUTE_B: 1, frozenset(): 1}
    assert counts.most_common(1)[0] == (ROUTE_A, 3)


def test_open_threshold_is_strict_and_configurable() -> None:
    stats = RouteStatistics(FULL)
    stats.update(make_gates([ROUTE_A], on=2e-4, off=5e-5))
    assert stats.path_frequency()[P("0:0:keep")] == 1.0
    assert stats.path_frequency()[P("3:3:keep")] == 0.0
    strict = RouteStatistics(FULL, threshold=0.5)
    strict.update(make_gates([ROUTE_A], on=0.4))
    assert strict.route_counts() == {frozenset(): 1}


def test_missing_nodes_are_closed_and_bad_gates_are_rejected() -> None:
    gates = make_gates([ROUTE_A, ROUTE_A])
    del gates[(3, 0)]
    stats = RouteStatistics(FULL)
    stats.update(gates)
    assert stats.path_frequency()[P("3:0:keep")] == 0.0
    assert stats.cell_frequency()[(3, 0)] == 0.0
    with pytest.raises(ValueError, match=r"not cells of route"):
        stats.update({**make_gates([ROUTE_A]), (7, 0): torch.ones(1, 1)})
    bad = make_gates([ROUTE_A, ROUTE_A])
    bad[(1, 1)] = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"node \(1, 1\) have shape \(2, 2\); expected \(2, 3\)"):
        stats.update(bad)
    assert stats.samples == 2  # failed updates count nothing


def test_statistics_of_a_static_route_use_its_own_gate_columns() -> None:
    route = Route(LAYERS, ROUTE_A | ROUTE_B)
    assert len(route.paths_of((-1, 0))) == 2 and len(route.paths_of((0, 0))) == 1
    stats = RouteStatistics(route)
    stats.update(make_gates([ROUTE_B], route=route))
    assert set(stats.path_frequency()) == route.paths
    assert stats.cell_frequency()[(0, 0)] == 0.0 and stats.cell_frequency()[(0, 1)] == 1.0


def test_no_samples_yet_is_an_error() -> None:
    with pytest.raises(ValueError, match="call update"):
        RouteStatistics(FULL).path_frequency()


# -- Common-X ------------------------------------------------------------------------------------
KEPT_BRANCH = {P("1:0:down"), P("2:1:keep"), P("3:1:keep")}  # rejoins the decoder at 1/8
AT_THRESHOLD = {P("2:1:up")}
DEAD_END = {P("0:0:down")}  # leads to (1, 1), which sends nothing frequent onwards
UNREACHABLE = {P("2:2:keep"), P("3:2:keep")}  # (2, 2) receives nothing frequent


def common_samples() -> list[set[Path]]:
    """100 samples: A always, KEPT_BRANCH in 96, AT_THRESHOLD in 95, the rest always."""
    return [set(ROUTE_A) | DEAD_END | UNREACHABLE
            | (KEPT_BRANCH if i < 96 else set()) | (AT_THRESHOLD if i < 95 else set())
            for i in range(100)]


def test_common_x_keeps_paths_above_the_threshold_and_prunes_the_disconnected() -> None:
    stats = RouteStatistics(FULL)
    samples = common_samples()
    stats.update(make_gates(samples[:60]))
    stats.update(make_gates(samples[60:]))
    route = common_x(stats)
    assert route.paths == ROUTE_A | KEPT_BRANCH
    assert route.name == "common-95"
    assert route.decoder_scales() == (0, 1)
    assert "100 forward passes" in route.description
    # At a lower threshold the 95% path is kept too.
    assert common_x(stats, threshold=0.9).paths == ROUTE_A | KEPT_BRANCH | AT_THRESHOLD


def test_common_x_from_a_frequency_mapping() -> None:
    freq = {p: 0.0 for p in FULL.paths}
    freq.update({p: 1.0 for p in ROUTE_A | DEAD_END | UNREACHABLE})
    freq.update({p: 0.96 for p in KEPT_BRANCH})
    freq.update({p: 0.95 for p in AT_THRESHOLD})
    route = common_x(freq, layers=LAYERS, threshold=0.95, name="common-test")
    assert route.paths == ROUTE_A | KEPT_BRANCH and route.name == "common-test"
    assert common_x(freq, layers=LAYERS, threshold=0.29).name == "common-29"
    with pytest.raises(ValueError, match="layers=L"):
        common_x(freq)


def test_common_x_with_nothing_connected_says_to_lower_the_threshold() -> None:
    freq = {p: 0.5 for p in FULL.paths}
    freq.update({p: 1.0 for p in DEAD_END | UNREACHABLE})  # above, but not connected
    with pytest.raises(ValueError, match=r"3 paths passed it, none connected.*lower threshold"):
        common_x(freq, layers=LAYERS)
    with pytest.raises(ValueError, match=r"threshold=1\.0 must be in \[0, 1\)"):
        common_x(freq, layers=LAYERS, threshold=1.0)


# -- merging and saving --------------------------------------------------------------------------
def test_merge_adds_counts() -> None:
    first, second = RouteStatistics(FULL), RouteStatistics(FULL)
    first.update(make_gates([ROUTE_A, ROUTE_A]))
    second.update(make_gates([ROUTE_B, ROUTE_A, ROUTE_B]))
    first.merge(second)
    assert first.samples == 5
    assert first.route_counts() == {ROUTE_A: 3, ROUTE_B: 2}
    assert first.path_frequency()[P("0:0:keep")] == 3 / 5
    assert first.cell_frequency()[(0, 1)] == 2 / 5
    assert second.samples == 3  # the other side is left alone


def test_merge_rejects_other_routes_and_thresholds() -> None:
    stats = RouteStatistics(FULL)
    with pytest.raises(ValueError, match="differ in layers or paths"):
        stats.merge(RouteStatistics(Route(LAYERS, ROUTE_A)))
    with pytest.raises(ValueError, match="open threshold"):
        stats.merge(RouteStatistics(FULL, threshold=0.1))


def test_to_dict_from_dict_round_trip_through_json() -> None:
    stats = RouteStatistics(FULL, threshold=1e-3)
    stats.update(make_gates([ROUTE_A, ROUTE_B, ROUTE_A, set()]))
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["path_counts"]["0:0:keep"] == 2 and data["cell_counts"]["1:1"] == 1
    loaded = RouteStatistics.from_dict(data)
    assert loaded.to_dict() == stats.to_dict()
    assert loaded.threshold == 1e-3 and loaded.samples == 4
    assert loaded.path_frequency() == stats.path_frequency()
    assert loaded.cell_frequency() == stats.cell_frequency()
    assert loaded.route_counts() == stats.route_counts()


def test_from_dict_rejects_unknown_keys_and_foreign_paths() -> None:
    stats = RouteStatistics(Route(LAYERS, ROUTE_A))
    stats.update(make_gates([ROUTE_A], route=stats.route))
    data = stats.to_dict()
    with pytest.raises(ValueError, match="expected keys"):
        RouteStatistics.from_dict({**data, "extra": 1})
    with pytest.raises(ValueError, match="path 3:3:keep is not on the route"):
        RouteStatistics.from_dict({**data, "path_counts": {"3:3:keep": 1}})
