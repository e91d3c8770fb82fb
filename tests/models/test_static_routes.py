"""Static architectures in the routing space (docs/model.md §8)."""

from __future__ import annotations

import pytest

from dynroute.models.builder import NetworkConfig, build_network
from dynroute.models.routes import Route
from dynroute.models.routing_space import INIT_ROW, Path
from dynroute.models.static_routes import (
    STATIC_ROUTES,
    chain,
    hrnet_paths,
    hrnet_spawn_rows,
    hrnet_v2,
    static_route,
    unet_paths,
)
from dynroute.models.summary import summarize

LAYERS = (4, 5, 8, 16, 33)
NAMES = sorted(STATIC_ROUTES)


def row_scales(route: Route) -> list[set[int]]:
    """Scales of the route's cells, per row 0..L-1."""
    return [{k for (r, k) in route.cells if r == row} for row in range(route.layers)]


def single_path_scales(route: Route) -> list[int]:
    per_row = row_scales(route)
    assert all(len(s) == 1 for s in per_row), f"{route.name} is not a single path: {per_row}"
    return [next(iter(s)) for s in per_row]


def expand(stages: list[int], levels: list[int] | None = None) -> list[int]:
    levels = levels if levels is not None else list(range(len(stages)))
    return [k for k, n in zip(levels, stages, strict=True) for _ in range(n)]


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("name", NAMES)
def test_every_named_route_is_valid(name: str, layers: int) -> None:
    route = static_route(name, layers)
    assert isinstance(route, Route)
    assert route.name == name
    assert route.layers == layers
    assert route.description
    # Rebuilding from the bare path set re-runs validation.
    assert Route(layers, route.paths).paths == route.paths
    assert (INIT_ROW, 0) in route.cells and route.decoder_scales()


def test_names_match_the_documented_set() -> None:
    assert set(STATIC_ROUTES) == {"network-fix", "fcn-32s", "deeplab-v3", "unet", "hrnet-v2",
                                  "hrnet-v2-table1", "auto-deeplab"}


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("name", NAMES)
def test_static_routes_are_strict_subsets_of_the_space(name: str, layers: int) -> None:
    full = Route.full(layers).paths
    paths = static_route(name, layers).paths
    if name == "network-fix":
        assert paths == full
    else:
        assert paths < full


@pytest.mark.parametrize(("layers", "stages"), [(16, [3, 4, 6, 3]), (33, [3, 4, 23, 3])])
def test_fcn_32s_has_resnet_stage_lengths(layers: int, stages: list[int]) -> None:
    route = static_route("fcn-32s", layers)
    assert single_path_scales(route) == expand(stages)
    assert route.decoder_scales() == (3,)


@pytest.mark.parametrize("layers", [4, 5, 8, 12])
def test_fcn_32s_other_depths_have_every_stage(layers: int) -> None:
    scales = single_path_scales(static_route("fcn-32s", layers))
    assert scales == sorted(scales)
    assert set(scales) == {0, 1, 2, 3}


def test_fcn_32s_proportional_split_at_8_rows() -> None:
    # 8·[3,4,6,3]/16 = [1.5, 2, 3, 1.5]; the spare row goes to the first tied stage.
    assert single_path_scales(static_route("fcn-32s", 8)) == expand([2, 2, 3, 1])


@pytest.mark.parametrize("layers", LAYERS)
def test_deeplab_v3_stays_at_one_sixteenth(layers: int) -> None:
    route = static_route("deeplab-v3", layers)
    scales = single_path_scales(route)
    assert max(scales) == 2
    assert route.decoder_scales() == (2,)


def test_deeplab_v3_shares_the_fcn_backbone_at_16_rows() -> None:
    assert single_path_scales(static_route("deeplab-v3", 16)) == expand([3, 4, 9])


@pytest.mark.parametrize("layers", [8, 16, 33])
def test_unet_goes_down_to_one_32nd_and_back_with_skips(layers: int) -> None:
    route = static_route("unet", layers)
    main = [max(s) for s in row_scales(route)]  # skips run at finer scales than the main path
    assert max(main) == 3
    assert main[-1] == 0 and route.decoder_scales() == (0,)
    bottom = main.index(3)
    top = len(main) - 1 - main[::-1].index(3)
    for k in range(3):
        last_encoder = max(r for r in range(bottom) if main[r] == k)
        first_decoder = min(r for r in range(top + 1, layers) if main[r] == k)
        for r in range(last_encoder, first_decoder):
            assert Path(r, k, "keep") in route.paths, f"skip at scale {k} broken in row {r}"


@pytest.mark.parametrize(("layers", "lengths"), [
    (16, [3, 2, 2, 2, 2, 2, 3]),  # spare rows in pairs to the outer levels
    (8, [1, 1, 1, 2, 1, 1, 1]),  # an odd spare row goes to the bottleneck
])
def test_unet_path_lengths(layers: int, lengths: list[int]) -> None:
    main = [max(s) for s in row_scales(static_route("unet", layers))]
    assert main == expand(lengths, [0, 1, 2, 3, 2, 1, 0])


@pytest.mark.parametrize("layers", LAYERS)
def test_unet_always_ends_at_one_quarter(layers: int) -> None:
    assert static_route("unet", layers).decoder_scales() == (0,)


@pytest.mark.parametrize("layers", LAYERS)
def test_hrnet_v2_streams_exchange_only_in_exchange_rows(layers: int) -> None:
    route = static_route("hrnet-v2", layers)
    assert route.decoder_scales() == (0, 1, 2, 3)
    exchange = {r for r in range(layers - 1) if (r + 1) % 4 == 0}
    spawn = {r - 1 for r in hrnet_spawn_rows(layers)[1:]}
    ups = {p.row for p in route.paths if p.direction == "up"}
    downs = {p.row for p in route.paths if p.direction == "down"}
    assert ups <= exchange
    assert downs <= exchange | spawn
    if layers >= 8:
        assert ups, "no exchange happened"


def test_hrnet_v2_at_16_rows() -> None:
    route = static_route("hrnet-v2", 16)
    assert hrnet_spawn_rows(16) == [0, 2, 4, 6]
    assert [len(s) for s in row_scales(route)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
    # Row 3: streams 0 and 1 exchange; row 7 and 11: all three neighbour pairs.
    assert {p for p in route.paths if p.row == 3 and p.direction == "up"} == {Path(3, 1, "up")}
    for row in (7, 11):
        assert {p for p in route.paths if p.row == row and p.direction != "keep"} == {
            Path(row, k, "down") for k in range(3)} | {Path(row, k, "up") for k in (1, 2, 3)}


def test_hrnet_v2_exchange_every_is_a_keyword() -> None:
    route = hrnet_v2(16, exchange_every=8)
    assert {p.row for p in route.paths if p.direction == "up"} == {7}
    with pytest.raises(ValueError, match="exchange_every"):
        hrnet_v2(16, exchange_every=0)


def test_hrnet_v2_spawns_from_the_init_cell_when_a_stream_starts_at_row_0() -> None:
    assert hrnet_spawn_rows(4)[1] == 0
    assert Path(INIT_ROW, 0, "down") in static_route("hrnet-v2", 4).paths


def test_hrnet_v2_stream_starts_and_first_exchange_are_keywords() -> None:
    route = hrnet_v2(16, starts=[0, 4, 7, 11], exchange_every=3, first_exchange=1)
    # Row 1 is an exchange row, but only stream 0 runs there: nothing to exchange.
    assert sorted({p.row for p in route.paths if p.direction == "up"}) == [4, 7, 10, 13]
    assert [min(r for r, k in route.cells if k == s) for s in range(4)] == [-1, 4, 7, 11]
    with pytest.raises(ValueError, match="rise strictly"):
        hrnet_v2(16, starts=[0, 4, 4, 11])


def test_hrnet_paths_lets_stream_1_start_at_row_0_from_the_init_cell() -> None:
    paths = hrnet_paths(8, [0, 0, 1, 2], [])
    assert Path(INIT_ROW, 0, "down") in paths and Path(1, 2, "down") in paths
    assert Route(8, paths).decoder_scales() == (0, 1, 2, 3)


# Paper Table 1 at L = 16, 1024×2048 (params, GFLOPs) of the routes sized to it
# (benchmarks/table1_routes.py; the other four networks have no route within 5%).
TABLE1 = {"hrnet-v2-table1": (5.4e6, 62.5)}


@pytest.mark.parametrize(("name", "paper"), TABLE1.items())
def test_table1_routes_are_within_5_percent_of_the_paper(name: str, paper: tuple) -> None:
    params, gflops = paper
    route = static_route(name, 16)
    network = build_network(NetworkConfig(layers=16, gate="fixed", route=route))
    report = summarize(network, 1024, 2048)
    assert report["params"] == pytest.approx(params, rel=0.05)
    assert report["gflops"] == pytest.approx(gflops, rel=0.05)


def test_hrnet_v2_table1_at_16_rows() -> None:
    route = static_route("hrnet-v2-table1", 16)
    assert [min(r for r, k in route.cells if k == s) for s in range(1, 4)] == [4, 7, 11]
    assert sorted({p.row for p in route.paths if p.direction == "up"}) == [4, 7, 10, 13]
    assert route.decoder_scales() == (0, 1, 2, 3)


def test_unet_paths_skip_from_the_init_cell_and_on_to_the_decoder() -> None:
    # No 1/4 encoder row: the 1/4 skip leaves the init cell. The path comes back to 1/16 only,
    # so the 1/4 and 1/8 skips run to the last row and the decoder fuses them.
    route = Route(16, unet_paths(16, [0, 5, 1, 7], [3]))
    assert {Path(r, 0, "keep") for r in range(INIT_ROW, 16)} <= route.paths
    assert {Path(r, 1, "keep") for r in range(4, 16)} <= route.paths
    assert {Path(r, 2, "keep") for r in range(5, 13)} <= route.paths  # 1/16 row 5 → row 13
    assert route.decoder_scales() == (0, 1, 2)


@pytest.mark.parametrize("layers", LAYERS)
def test_auto_deeplab_is_a_single_path_with_a_late_up(layers: int) -> None:
    route = static_route("auto-deeplab", layers)
    scales = single_path_scales(route)
    assert max(scales) == 3
    ups = [p for p in route.paths if p.direction == "up"]
    assert ups
    assert min(p.row for p in ups) >= scales.index(3)  # the up comes after 1/32


def test_auto_deeplab_at_16_rows() -> None:
    scales = single_path_scales(static_route("auto-deeplab", 16))
    assert scales == expand([2, 2, 4, 4, 3, 1], [0, 1, 2, 3, 2, 1])


def test_chain_builds_the_exact_path() -> None:
    assert chain(4, [1, 2, 3, 3]) == {Path(-1, 0, "down"), Path(0, 1, "down"), Path(1, 2, "down"),
                                      Path(2, 3, "keep"), Path(3, 3, "keep")}
    assert chain(4, [0, 0, 1, 0]) == {Path(-1, 0, "keep"), Path(0, 0, "keep"), Path(1, 0, "down"),
                                      Path(2, 1, "up"), Path(3, 0, "keep")}


def test_chain_rejects_a_jump_of_two() -> None:
    with pytest.raises(ValueError, match="jumps from 0 to 2 into row 2"):
        chain(5, [0, 0, 2, 2, 2])


def test_chain_rejects_a_scale_missing_from_its_row() -> None:
    with pytest.raises(ValueError, match=r"scale 2 does not exist in row 0 .*\[0, 1\]"):
        chain(4, [2, 2, 2, 2])
    with pytest.raises(ValueError, match="scale 4 does not exist in row 3"):
        chain(4, [1, 2, 3, 4])


def test_chain_rejects_a_wrong_number_of_scales() -> None:
    with pytest.raises(ValueError, match="3 scales for 4 rows"):
        chain(4, [0, 0, 0])


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown route 'x'") as err:
        static_route("x", 16)
    for name in STATIC_ROUTES:
        assert name in str(err.value)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, suffix: str, tmp_path) -> None:
    route = static_route(name, 16)
    file = tmp_path / f"{name}{suffix}"
    route.save(file)
    assert Route.load(file) == route
