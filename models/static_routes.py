"""Static architectures modelled in the routing space (paper Fig. 3, Table 1; docs/model.md §8).

With every gate fixed (α ≡ 1 on the route, absent elsewhere) the dynamic network becomes a static
one that costs only its route. The paper compares its dynamic routes with such hand-designed
networks; its drawings of them are images we do not have, so the routes below are our own reading
of each architecture. Stage lengths are given for L = 16 and scale with L:

- ``network-fix``: every cell and every path of the space.
- ``fcn-32s``: one ResNet-like path down to 1/32 that stays there. Rows per stage (1/4, 1/8, 1/16,
  1/32) are [3, 4, 6, 3] for L = 16 (ResNet-50), [3, 4, 23, 3] for L = 33 (ResNet-101), otherwise
  proportional to [3, 4, 6, 3] with at least one row per stage.
- ``deeplab-v3``: the same backbone at output stride 16: the 1/32 stage stays at 1/16.
- ``unet``: one path down through 1/4, 1/8, 1/16, 1/32 and back up to 1/4 (seven segments of about
  L/7 rows; spare rows go to the outer levels in pairs, an odd one to the bottleneck), plus skip
  connections: a chain of keep paths at 1/4, 1/8 and 1/16 from the last encoder row at that scale
  to the first decoder row at that scale. Skip cells are routing cells, so unlike U-Net's identity
  skips they compute. Below 7 rows the deepest levels are dropped (L = 4: down to 1/8 only).
- ``hrnet-v2``: parallel streams. Stream 0 (1/4) starts at row 0; stream k starts at row
  r_k = max(k-1, k·L//8) (made strictly increasing) from a down path out of stream k-1; all streams
  keep to the last row, exchange up and down between adjacent streams every `exchange_every` rows,
  and all four reach the decoder. Stream starts and the first exchange row are keywords too.
- ``hrnet-v2-table1``: the same pattern sized to the paper's Table 1 (5.4 M params, 62.5 GFLOPs at
  L = 16, 1024×2048): streams start at rows 0, 4, 7, 11 and exchange every 3 rows from row 4, the
  closest of the pattern's routes that benchmarks/table1_routes.py enumerates (5.40 M, 62.4
  GFLOPs). The other four Table 1 networks have no route of their pattern within 5% of both
  figures (docs/model.md §8). Other depths scale the rows.
- ``auto-deeplab``: a searched-style single path with a late up: 1/4, 1/8, 1/16, 1/32, 1/16, 1/8 for
  2, 2, 4, 4, 3 and 1 sixteenths of the rows (at least one each). Below 6 rows the leading 1/4
  segment is dropped (the init cell already is at 1/4), and at 4 rows the final up to 1/8 too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

from .routes import Route
from .routing_space import INIT_ROW, NUM_SCALES, Direction, Path, RoutingSpace

_SCALE_NAMES = ("1/4", "1/8", "1/16", "1/32")
# Rows per stage (1/4, 1/8, 1/16, 1/32) of the ResNets the paper's L16 and L33 mirror.
_RESNET_STAGES: dict[int, tuple[int, ...]] = {16: (3, 4, 6, 3), 33: (3, 4, 23, 3)}
# HRNetV2 sized to Table 1 at L = 16 (benchmarks/table1_routes.py): stream starts and the
# rows between exchanges.
_HRNET_TABLE1_STARTS = (0, 4, 7, 11)
_HRNET_TABLE1_EXCHANGE_EVERY = 3
# Auto-DeepLab-like path: (scale, weight in sixteenths of the rows).
_AUTO_DEEPLAB_SEGMENTS: tuple[tuple[int, int], ...] = (
    (0, 2), (1, 2), (2, 4), (3, 4), (2, 3), (1, 1),
)


def chain(layers: int, scales: Sequence[int]) -> frozenset[Path]:
    """The single path through rows 0..L-1 at `scales[row]`, from the init cell to the decoder.

    Args:
        layers: rows L of the routing space.
        scales: one scale index per row; consecutive scales differ by at most 1.

    Returns:
        The init cell's path into row 0, one path per row change, and the last row's keep path.
    """
    space = RoutingSpace(layers)
    scales = list(scales)
    if len(scales) != layers:
        raise ValueError(f"chain: got {len(scales)} scales for {layers} rows; give one per row")
    previous = 0  # the init cell is at 1/4
    for row, scale in enumerate(scales):
        if scale not in space.scales(row):
            allowed = sorted(space.scales(row))
            raise ValueError(f"chain: scale {scale} does not exist in row {row} "
                             f"(row {row} has scales {allowed})")
        if abs(scale - previous) > 1:
            raise ValueError(f"chain: scale jumps from {previous} to {scale} into row {row}; "
                             f"a path changes the scale by at most 1")
        previous = scale
    rows = [(INIT_ROW, 0), *enumerate(scales)]
    paths = {Path(row, k, _direction(k, k_next)) for (row, k), (_, k_next) in pairwise(rows)}
    paths.add(Path(layers - 1, scales[-1], "keep"))  # on to the decoder
    return frozenset(paths)


def _direction(scale: int, next_scale: int) -> Direction:
    steps: dict[int, Direction] = {0: "keep", 1: "down", -1: "up"}
    return steps[next_scale - scale]


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` rows in proportion to `weights`, at least one row each (largest remainder)."""
    if total < len(weights):
        raise ValueError(f"cannot give {len(weights)} segments one row each out of {total}")
    quotas = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(q)) for q in quotas]
    # Ties go to the earlier segment, so the result is deterministic.
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda j: (quotas[j] - counts[j], -j))
        counts[i] += 1
    while sum(counts) > total:  # the one-row minimum can overshoot for tiny quotas
        i = min((j for j in range(len(counts)) if counts[j] > 1),
                key=lambda j: (quotas[j] - counts[j], j))
        counts[i] -= 1
    return counts


def _segments(levels: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Per-row scales from segments: `lengths[i]` rows at scale `levels[i]`."""
    return [k for k, n in zip(levels, lengths, strict=True) for _ in range(n)]


def _summary(scales: Sequence[int]) -> str:
    """'1/4×3 → 1/8×4 → ...' for a per-row scale list."""
    runs: list[list[int]] = []
    for k in scales:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return " → ".join(f"{_SCALE_NAMES[k]}×{n}" for k, n in runs)


def _single_path(name: str, layers: int, scales: Sequence[int], what: str) -> Route:
    return Route(layers, chain(layers, scales), name=name,
                 description=f"{what}; rows per scale: {_summary(scales)}")


def _resnet_stages(layers: int) -> list[int]:
    return list(_RESNET_STAGES.get(layers) or _apportion(layers, _RESNET_STAGES[16]))


# -- the named routes ----------------------------------------------------------------------------
def network_fix(layers: int) -> Route:
    """Every cell and path of the space (gates fixed to 1)."""
    return Route.full(layers)


def fcn_32s(layers: int) -> Route:
    """ResNet-like single path down to 1/32 that stays there."""
    scales = _segments(range(NUM_SCALES), _resnet_stages(layers))
    return _single_path("fcn-32s", layers, scales, "FCN-32s: ResNet-like path, output stride 32")


def deeplab_v3(layers: int) -> Route:
    """The FCN-32s backbone at output stride 16: its 1/32 stage stays at 1/16."""
    stages = _resnet_stages(layers)
    scales = _segments(range(3), [stages[0], stages[1], stages[2] + stages[3]])
    return _single_path("deeplab-v3", layers, scales,
                        "DeepLabV3: ResNet-like path, output stride 16 (last stage kept at 1/16)")


def _unet_segments(layers: int) -> tuple[list[int], list[int]]:
    """Levels and row counts of U-Net's down-and-up path (see the module docstring)."""
    depth = min(NUM_SCALES, (layers + 1) // 2)
    levels = [*range(depth), *range(depth - 2, -1, -1)]
    n = len(levels)
    lengths = [layers // n] * n
    spare = layers - sum(lengths)
    if spare % 2:
        lengths[depth - 1] += 1  # the bottleneck
        spare -= 1
    for level in range(spare // 2):  # outer levels first, encoder and decoder alike
        lengths[level] += 1
        lengths[n - 1 - level] += 1
    return levels, lengths


def unet_paths(layers: int, encoder: Sequence[int], decoder: Sequence[int], *,
               skips: Iterable[int] | None = None) -> frozenset[Path]:
    """U-Net's down-and-up path with a skip connection at every level it passes on the way down.

    Args:
        layers: rows L of the routing space.
        encoder: rows at 1/4, 1/8, ... on the way down (the first may be 0: the init cell then is
            the 1/4 encoder); the last entry is the bottleneck.
        decoder: rows on the way back up, coarsest level first (one level finer than the
            bottleneck, then finer still); it may stop before 1/4.
        skips: the levels that get a skip chain; every level above the bottleneck if None.

    Returns:
        The path plus, for each level k above the bottleneck, a chain of keep paths from the last
        encoder cell at k to the first decoder cell at k, or on to the decoder when the path does
        not come back to k (the naive decoder then fuses that level).
    """
    depth = len(encoder)
    levels = [*range(depth), *range(depth - 2, depth - 2 - len(decoder), -1)]
    scales = _segments(levels, [*encoder, *decoder])
    bottom = sum(encoder[:-1])  # first bottleneck row: encoder before it, decoder after
    paths = set(chain(layers, scales))
    for k in range(depth - 1) if skips is None else skips:
        last_encoder = max((r for r in range(bottom) if scales[r] == k), default=INIT_ROW)
        first_decoder = min((r for r in range(bottom, layers) if scales[r] == k), default=layers)
        paths.update(Path(r, k, "keep") for r in range(last_encoder, first_decoder))
    return frozenset(paths)


def unet(layers: int) -> Route:
    """Encoder-decoder path down to 1/32 and back to 1/4, with keep-chain skip connections."""
    levels, lengths = _unet_segments(layers)
    depth = max(levels) + 1
    scales = _segments(levels, lengths)
    return Route(layers, unet_paths(layers, lengths[:depth], lengths[depth:]), name="unet",
                 description=f"U-Net: encoder-decoder path, rows per scale: {_summary(scales)}; "
                             f"skip keep chains at scales {list(range(depth - 1))}")


def hrnet_spawn_rows(layers: int) -> list[int]:
    """Row r_k at which stream k = 0..3 starts (r_0 = 0)."""
    rows = [0]
    for k in range(1, NUM_SCALES):
        r = max(k - 1, k * layers // 8)
        if k > 1:
            r = max(r, rows[-1] + 1)  # stream k-1 must exist in row r_k - 1
        rows.append(r)
    return rows


def hrnet_paths(layers: int, starts: Sequence[int], exchange_rows: Iterable[int]
                ) -> frozenset[Path]:
    """Parallel streams: stream k runs at scale k from row `starts[k]` to the last row and feeds
    the decoder; in each of `exchange_rows` neighbouring streams that both run swap down and up.

    Stream k > 0 is spawned by a down path out of stream k-1 in the row before its start (out of
    the init cell for stream 1 starting at row 0), so each stream starts after its parent.
    """
    if starts[0] != 0 or any(b <= a for a, b in pairwise(starts[1:])):
        raise ValueError(f"hrnet: stream starts {list(starts)} must be 0 for stream 0, then rise "
                         f"strictly from stream 1 on")
    paths: set[Path] = {Path(INIT_ROW, 0, "keep")}
    for k, start in enumerate(starts):
        if k > 0:
            paths.add(Path(start - 1, k - 1, "down"))
        paths.update(Path(r, k, "keep") for r in range(start, layers))
    for r in exchange_rows:
        for k in range(len(starts) - 1):
            if starts[k + 1] <= r < layers - 1:  # both neighbours run in row r, and a row follows
                paths.update({Path(r, k, "down"), Path(r, k + 1, "up")})
    return frozenset(paths)


def hrnet_v2(layers: int, *, exchange_every: int = 4, starts: Sequence[int] | None = None,
             first_exchange: int | None = None) -> Route:
    """Parallel streams at all scales, exchanging between neighbours every `exchange_every` rows.

    Args:
        layers: rows L.
        exchange_every: rows between two exchanges.
        starts: the row where each of the four streams starts; `hrnet_spawn_rows(layers)` if None.
        first_exchange: the first exchange row; `exchange_every - 1` if None.
    """
    if exchange_every < 1:
        raise ValueError(f"hrnet_v2: exchange_every={exchange_every} must be at least 1")
    starts = list(starts) if starts is not None else hrnet_spawn_rows(layers)
    first = exchange_every - 1 if first_exchange is None else first_exchange
    return _hrnet_route("hrnet-v2", layers, starts, range(first, layers - 1, exchange_every))


def hrnet_v2_table1(layers: int) -> Route:
    """HRNetV2 sized to the paper's Table 1 (5.4 M params, 62.5 GFLOPs at L = 16, 1024×2048).

    Found by benchmarks/table1_routes.py: streams start at rows 0, 4, 7, 11 of 16 and exchange
    every 3 rows from the row stream 1 starts (rows 4, 7, 10, 13). Other depths scale the rows.
    """
    starts = [0]
    for k, at16 in enumerate(_HRNET_TABLE1_STARTS[1:], start=1):
        row = max(k - 1, round(at16 * layers / 16))
        starts.append(max(row, starts[-1] + 1) if k > 1 else row)
    every = max(1, round(_HRNET_TABLE1_EXCHANGE_EVERY * layers / 16))
    return _hrnet_route("hrnet-v2-table1", layers, starts,
                        range(starts[1], layers - 1, every))


def _hrnet_route(name: str, layers: int, starts: Sequence[int], exchange_rows: Iterable[int]
                 ) -> Route:
    paths = hrnet_paths(layers, starts, exchange_rows)
    done = sorted({p.row for p in paths if p.direction == "up"})
    return Route(layers, paths, name=name,
                 description=f"HRNetV2: streams at 1/4, 1/8, 1/16, 1/32 start at rows "
                             f"{list(starts)}, exchange in rows {done}, all reach the decoder")


def auto_deeplab(layers: int) -> Route:
    """A searched-style single path down to 1/32 with a late up to 1/16 and then 1/8."""
    segments = list(_AUTO_DEEPLAB_SEGMENTS)
    if layers < len(segments):
        segments = segments[1:]  # the init cell already is at 1/4
    if layers < len(segments):
        segments = segments[:-1]
    levels = [k for k, _ in segments]
    scales = _segments(levels, _apportion(layers, [w for _, w in segments]))
    return _single_path("auto-deeplab", layers, scales,
                        "Auto-DeepLab-like searched path with a late up")


STATIC_ROUTES: dict[str, Callable[[int], Route]] = {
    "network-fix": network_fix,
    "fcn-32s": fcn_32s,
    "deeplab-v3": deeplab_v3,
    "unet": unet,
    "hrnet-v2": hrnet_v2,
    "hrnet-v2-table1": hrnet_v2_table1,
    "auto-deeplab": auto_deeplab,
}


def static_route(name: str, layers: int) -> Route:
    """Build the static route called `name` for a space of `layers` rows."""
    try:
        builder = STATIC_ROUTES[name]
    except KeyError:
        raise ValueError(f"unknown route {name!r}; choose one of "
                         f"{', '.join(STATIC_ROUTES)}") from None
    return builder(layers)
