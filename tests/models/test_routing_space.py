import json

import pytest

from dynroute.models import Path, Route, RouteError, RoutingSpace


def test_row_sizes_are_2_3_4_then_4():
    space = RoutingSpace(6)
    assert [len(space.scales(r)) for r in range(6)] == [2, 3, 4, 4, 4, 4]
    assert list(space.scales(-1)) == [0]
    assert len(RoutingSpace(16).nodes()) == 2 + 3 + 4 * 14


def test_paths_per_node_in_gate_column_order():
    space = RoutingSpace(5)
    assert [p.direction for p in space.paths_of((-1, 0))] == ["keep", "down"]
    assert [p.direction for p in space.paths_of((2, 0))] == ["keep", "down"]
    assert [p.direction for p in space.paths_of((2, 1))] == ["keep", "up", "down"]
    assert [p.direction for p in space.paths_of((2, 3))] == ["keep", "up"]
    assert [p.direction for p in space.paths_of((4, 2))] == ["keep"]  # last row: decoder only


def test_inputs_are_down_keep_up_of_the_previous_row():
    space = RoutingSpace(5)
    assert {p.source for p in space.incoming((2, 1))} == {(1, 0), (1, 1), (1, 2)}
    # the newest coarsest cell of rows 0–2 has only the down input
    assert space.incoming((0, 1)) == (Path(-1, 0, "down"),)
    assert space.incoming((1, 2)) == (Path(0, 1, "down"),)
    assert space.incoming((2, 3)) == (Path(1, 2, "down"),)
    assert {p.source for p in space.incoming((3, 3))} == {(2, 2), (2, 3)}


def test_space_needs_four_rows():
    with pytest.raises(ValueError, match="at least 4"):
        RoutingSpace(3)


def test_path_text_round_trip_and_errors():
    assert Path.parse("3:2:down") == Path(3, 2, "down")
    assert str(Path(-1, 0, "keep")) == "-1:0:keep"
    with pytest.raises(ValueError, match="row:scale:"):
        Path.parse("3:2:sideways")


@pytest.mark.parametrize("paths, message", [
    ({"0:0:keep"}, "init cell"),
    ({"-1:0:keep", "0:0:keep", "1:0:keep", "2:0:keep", "3:0:keep", "1:1:keep"}, "none in"),
    ({"-1:0:keep", "0:0:keep", "1:0:down"}, "no path out"),
    ({"-1:0:keep", "0:0:up"}, "does not exist"),
    (set(), "no paths"),
])
def test_invalid_routes_are_refused_with_a_reason(paths, message):
    with pytest.raises(RouteError, match=message):
        Route(4, frozenset(Path.parse(p) for p in paths), name="bad")


def test_route_files_give_clear_errors(tmp_path):
    good = Route.full(4)
    good.save(tmp_path / "r.json")
    assert Route.load(tmp_path / "r.json").paths == good.paths
    (tmp_path / "bad.yaml").write_text("layers: 4\npaths: [1, 2\n")
    with pytest.raises(RouteError, match=r"bad\.yaml"):
        Route.load(tmp_path / "bad.yaml")
    (tmp_path / "extra.json").write_text(json.dumps({"layers": 4, "paths": [], "colour": 1}))
    with pytest.raises(RouteError, match="unknown keys"):
        Route.load(tmp_path / "extra.json")
    with pytest.raises(RouteError, match="cannot read"):
        Route.load(tmp_path / "missing.yaml")


def test_render_marks_the_route_on_the_lattice():
    route = Route(4, frozenset(Path.parse(p) for p in
                               ["-1:0:down", "0:1:down", "1:2:keep", "2:2:keep", "3:2:keep"]))
    lines = route.render().splitlines()
    assert lines[0].startswith("row")
    row1 = next(line for line in lines if line.startswith("  1"))
    assert row1.split() == ["1", ".", ".", "#"]
