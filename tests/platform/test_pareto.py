"""Pareto ranks, hypervolume, knee, budget queries and the written front (pure, no Ray/MLflow)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from dynroute.platform.pareto.analysis import (
    Fronts,
    Point,
    best_under_budget,
    bucket_name,
    budget_buckets,
    default_reference,
    hypervolume,
    knee_point,
    non_dominated_sort,
    pareto_front,
    pareto_ranks,
    summarize,
    write_front,
)
from dynroute.platform.pareto.plots import front_html, plot_front

NAN, INF = math.nan, math.inf


def ids(points) -> list[str]:
    return [p.id for p in points]


def brute_force_ranks(points: list[Point]) -> dict[str, int]:
    """rank(p) = 1 + the largest rank of a point dominating p, or 0; from the definition."""
    valid = [p for p in points if math.isfinite(p.miou) and math.isfinite(p.gflops)]
    m = np.array([p.miou for p in valid])
    g = np.array([p.gflops for p in valid])
    # dom[j, i]: j is no worse than i in both objectives and strictly better in one.
    no_worse = (m[:, None] >= m[None, :]) & (g[:, None] <= g[None, :])
    dom = no_worse & ((m[:, None] > m[None, :]) | (g[:, None] < g[None, :]))
    rank = np.zeros(len(valid), dtype=int)
    for _ in range(len(valid) + 1):
        new = np.where(dom, rank[:, None] + 1, 0).max(axis=0, initial=0)
        if np.array_equal(new, rank):
            break
        rank = new
    return {p.id: int(r) for p, r in zip(valid, rank, strict=True)}


# ---------------------------------------------------------------------------------------------
# Points and non-dominated sorting


def test_point_is_immutable_and_hashable() -> None:
    meta = {"lr": 0.1}
    p = Point("7", 0.5, 10, meta)
    meta["lr"] = 99.0  # the caller's dict is copied
    assert p.meta["lr"] == 0.1
    with pytest.raises(TypeError):
        p.meta["lr"] = 1.0  # type: ignore[index]
    assert hash(p) == hash(Point("7", 0.5, 10.0, {"other": [1, 2]}))  # unhashable meta is fine
    assert p == Point("7", 0.5, 10.0, {"lr": 0.1}) != Point("7", 0.5, 10.0, {"lr": 0.2})
    assert isinstance(Point("a", np.float32(0.5), np.int64(3)).gflops, float)
    with pytest.raises(TypeError, match="str"):
        Point(7, 0.5, 10)  # type: ignore[arg-type]


def test_two_fronts_by_hand() -> None:
    points = [Point("a", 0.60, 10), Point("b", 0.70, 20), Point("c", 0.80, 40),
              Point("d", 0.55, 15), Point("e", 0.65, 30), Point("f", 0.50, 50)]
    fronts = non_dominated_sort(points)
    assert [ids(f) for f in fronts.fronts] == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert fronts.invalid == ()
    assert pareto_front(points) == [points[0], points[1], points[2]]
    assert pareto_ranks(points) == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 2}


def test_ties_share_a_rank_and_order_is_deterministic() -> None:
    points = [Point("z", 0.7, 20), Point("y", 0.7, 20), Point("x", 0.6, 20), Point("w", 0.7, 25)]
    fronts = non_dominated_sort(points)
    # Identical objectives never dominate each other; equal GFLOPs with lower mIoU is dominated.
    assert [ids(f) for f in fronts.fronts] == [["y", "z"], ["x", "w"]]
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert non_dominated_sort([points[i] for i in rng.permutation(len(points))]) == fronts
    # Within a front: GFLOPs ascending, then mIoU descending, then id.
    same_rank = [Point("b", 0.5, 10), Point("a", 0.5, 10), Point("c", 0.9, 30)]
    assert ids(non_dominated_sort(same_rank).fronts[0]) == ["a", "b", "c"]


def test_nan_and_inf_points_are_invalid_and_never_ranked() -> None:
    points = [Point("ok", 0.5, 10), Point("nan-miou", NAN, 1), Point("inf-miou", INF, 1),
              Point("inf-gflops", 0.99, INF), Point("neg-inf", 0.9, -INF),
              Point("nan-gflops", 0.9, NAN)]
    fronts = non_dominated_sort(points)
    assert [ids(f) for f in fronts.fronts] == [["ok"]]
    assert ids(fronts.invalid) == sorted(["nan-miou", "inf-miou", "inf-gflops", "neg-inf",
                                          "nan-gflops"])
    assert pareto_ranks(points) == {"ok": 0}
    assert non_dominated_sort([Point("n", NAN, NAN)]) == Fronts(fronts=(),
                                                                 invalid=(Point("n", NAN, NAN),))


def test_single_point_and_empty_input() -> None:
    p = Point("only", 0.4, 3)
    assert non_dominated_sort([p]) == Fronts(fronts=((p,),), invalid=())
    assert non_dominated_sort([]) == Fronts(fronts=(), invalid=())
    assert pareto_front([]) == []
    assert pareto_ranks([]) == {}


def test_duplicate_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unique.*\['a'\]"):
        non_dominated_sort([Point("a", 0.5, 1), Point("b", 0.5, 1), Point("a", 0.6, 2)])


@pytest.mark.parametrize("seed", range(200))
def test_ranks_match_brute_force_dominance(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 31))
    if seed % 2:  # a coarse grid: many ties and exact duplicates
        miou = rng.integers(0, 5, n) / 4
        gflops = rng.integers(1, 6, n).astype(float)
    else:
        miou, gflops = rng.uniform(0, 1, n), rng.uniform(1, 100, n)
        if n > 2:  # duplicate some values exactly
            miou[1], gflops[2] = miou[0], gflops[0]
    if seed % 5 == 0:
        miou[rng.integers(0, n)] = rng.choice([NAN, INF, -INF])
    points = [Point(f"t{i}", float(m), float(g)) for i, (m, g) in enumerate(zip(miou, gflops,
                                                                               strict=True))]
    fronts = non_dominated_sort(points)
    expected = brute_force_ranks(points)
    assert fronts.ranks == expected
    assert sum(map(len, fronts.fronts)) + len(fronts.invalid) == n
    assert all(fronts.fronts)  # no empty front
    for front in fronts.fronts:
        keys = [(p.gflops, -p.miou, p.id) for p in front]
        assert keys == sorted(keys)


# ---------------------------------------------------------------------------------------------
# Hypervolume


def test_hypervolume_by_hand() -> None:
    ref = (0.0, 20.0)
    a, b = Point("a", 0.5, 10), Point("b", 0.8, 15)
    assert hypervolume([a], reference=ref) == pytest.approx(0.5 * 10)
    # b adds the slab from mIoU 0.5 to 0.8 between 15 and 20 GFLOPs.
    assert hypervolume([a, b], reference=ref) == pytest.approx(0.5 * 10 + 0.3 * 5)
    dominated = Point("c", 0.4, 12)
    assert hypervolume([a, b, dominated], reference=ref) == pytest.approx(6.5)
    beyond = [Point("cost", 0.9, 25), Point("at-ref", 0.9, 20), Point("low", -0.1, 1),
              Point("nan", NAN, 1), Point("zero", 0.0, 1)]
    assert hypervolume([a, b, *beyond], reference=ref) == pytest.approx(6.5)
    assert hypervolume([], reference=ref) == 0.0
    assert hypervolume([a], reference=(0.3, 12.0)) == pytest.approx(0.2 * 2)
    with pytest.raises(ValueError, match="finite"):
        hypervolume([a], reference=(0.0, INF))


def test_default_reference() -> None:
    points = [Point("a", 0.5, 10), Point("b", 0.7, 50), Point("c", 0.9, INF)]
    assert default_reference(points) == (0.0, pytest.approx(55.0))
    # The most expensive front point still adds its share under the default reference.
    with_b = hypervolume(points, reference=default_reference(points))
    assert with_b > hypervolume(points[:1], reference=default_reference(points))
    with pytest.raises(ValueError, match="finite GFLOPs"):
        default_reference([Point("c", 0.9, INF)])


@pytest.mark.parametrize("seed", range(20))
def test_hypervolume_is_monotone(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    ref = (0.0, 100.0)
    points: list[Point] = []
    volume = 0.0
    for i in range(25):
        points.append(Point(f"t{i}", rng.uniform(-0.1, 1), rng.uniform(0, 120)))
        grown = hypervolume(points, reference=ref)
        assert grown >= volume - 1e-12
        volume = grown
    assert volume > 0


def test_hypervolume_matches_monte_carlo() -> None:
    rng = np.random.default_rng(7)
    g = rng.uniform(5, 90, 40)
    points = [Point(f"t{i}", 0.8 - 0.4 * math.exp(-x / 25) - rng.uniform(0, 0.1), x)
              for i, x in enumerate(g)]
    ref = (0.2, 100.0)
    exact = hypervolume(points, reference=ref)
    front = pareto_front(points)
    assert len(front) >= 5
    m_hi = max(p.miou for p in front)
    g_lo = min(p.gflops for p in front)
    samples = 200_000
    sm = rng.uniform(ref[0], m_hi, samples)
    sg = rng.uniform(g_lo, ref[1], samples)
    fm, fg = np.array([p.miou for p in front]), np.array([p.gflops for p in front])
    covered = ((fm[None, :] >= sm[:, None]) & (fg[None, :] <= sg[:, None])).any(axis=1)
    estimate = covered.mean() * (m_hi - ref[0]) * (ref[1] - g_lo)
    assert estimate == pytest.approx(exact, rel=0.02)


# ---------------------------------------------------------------------------------------------
# Knee


def test_knee_is_the_corner_of_an_l_shaped_front() -> None:
    corner = Point("corner", 0.78, 20)
    front = [Point("cheap", 0.50, 10), Point("rise1", 0.60, 12), Point("rise2", 0.72, 15),
             corner, Point("flat1", 0.79, 50), Point("best", 0.80, 80)]
    assert knee_point(front) == corner
    # Dominated and invalid points are ignored; the order of the input does not matter.
    noise = [Point("dominated", 0.77, 25), Point("nan", NAN, 1)]
    assert knee_point(list(reversed(front)) + noise) == corner


def test_knee_with_one_two_and_no_points() -> None:
    assert knee_point([]) is None
    assert knee_point([Point("n", NAN, 1)]) is None
    only = Point("only", 0.5, 10)
    assert knee_point([only]) == only
    assert knee_point([only, Point("dup", 0.5, 10)]) == Point("dup", 0.5, 10)  # smaller id
    # Two points: the expensive one wins only with the higher mIoU per GFLOP.
    cheap, costly = Point("cheap", 0.5, 20), Point("costly", 0.75, 100)  # 0.025/G vs 0.0075/G
    assert knee_point([cheap, costly]) == cheap
    bargain = Point("bargain", 0.625, 24)  # 0.026/G
    assert knee_point([cheap, bargain]) == bargain
    equal = Point("equal", 0.75, 30)  # exactly 0.025/G as well: the cheaper one
    assert knee_point([cheap, equal]) == cheap


def test_knee_of_a_front_without_a_point_above_the_chord() -> None:
    # Bulging away from the ideal point: the middle lies below the chord, so the extremes compete.
    cheap, middle, costly = Point("a", 0.2, 10), Point("b", 0.3, 30), Point("c", 0.9, 40)
    assert knee_point([cheap, middle, costly]) == costly  # 0.0225 mIoU per GFLOP beats 0.02
    straight = [Point("a", 0.5, 10), Point("b", 0.6, 20), Point("c", 0.7, 30)]
    assert knee_point(straight) == straight[0]  # 0.05/G beats 0.0233/G


# ---------------------------------------------------------------------------------------------
# Budget queries


def test_best_under_budget() -> None:
    points = [Point("a", 0.60, 10), Point("b", 0.70, 30), Point("c", 0.70, 25),
              Point("d", 0.75, 60), Point("e", 0.70, 25), Point("f", NAN, 1),
              Point("g", 0.99, INF)]
    assert best_under_budget(points, max_gflops=5) is None
    assert best_under_budget(points, max_gflops=10) == points[0]  # the bound is inclusive
    assert best_under_budget(points, max_gflops=30).id == "c"  # tie in mIoU: fewer GFLOPs, id
    assert best_under_budget(points, max_gflops=1e9).id == "d"
    assert best_under_budget(points, max_gflops=30, min_miou=0.70).id == "c"
    assert best_under_budget(points, max_gflops=20, min_miou=0.65) is None
    assert best_under_budget([], max_gflops=100) is None
    with pytest.raises(ValueError, match="numbers"):
        best_under_budget(points, max_gflops=NAN)


def test_bucket_names() -> None:
    assert bucket_name(60) == "le-60g"
    assert bucket_name(60.0) == "le-60g"
    assert bucket_name(2.5) == "le-2p5g"
    assert bucket_name(0.25) == "le-0p25g"
    assert bucket_name(0.1) != bucket_name(0.1000001)
    with pytest.raises(ValueError, match="non-negative"):
        bucket_name(-1)
    with pytest.raises(ValueError, match="finite"):
        bucket_name(INF)


def test_budget_buckets() -> None:
    front = [Point("tiny", 0.40, 0.2), Point("small", 0.55, 2.5), Point("mid", 0.70, 40),
             Point("mid-twin", 0.70, 40), Point("big", 0.78, 90)]
    buckets = budget_buckets(front, edges=[60, 0.1, 2.5, 0.25, 1000, 60.0])
    assert buckets == {"le-0p25g": front[0], "le-2p5g": front[1], "le-60g": front[2],
                       "le-1000g": front[4]}
    assert list(buckets) == ["le-0p25g", "le-2p5g", "le-60g", "le-1000g"]  # ascending, 0.1 empty
    assert budget_buckets([], edges=[10]) == {}
    assert budget_buckets(front, edges=[]) == {}


# ---------------------------------------------------------------------------------------------
# Writers


def study() -> list[Point]:
    return [Point("0", 0.50, 10, {"lr": 0.1, "lambda": 0.5}), Point("1", 0.70, 20),
            Point("2", 0.60, 30), Point("3", 0.78, 60), Point("4", NAN, 5, {"error": "diverged"}),
            Point("5", 0.72, 24)]


def test_write_front_json_and_csv(tmp_path: Path) -> None:
    path_json, path_csv = tmp_path / "out" / "pareto.json", tmp_path / "out" / "pareto.csv"
    summary = write_front(path_json, path_csv, study(), reference=(0.0, 100.0))
    doc = json.loads(path_json.read_text())
    assert doc["objectives"] == {"miou": {"metric": "miou", "direction": "max"},
                                 "gflops": {"metric": "gflops_mean", "direction": "min"}}
    assert doc["reference"] == {"miou": 0.0, "gflops": 100.0}
    expected_hv = 0.5 * 90 + 0.2 * 80 + 0.02 * 76 + 0.06 * 40
    assert doc["hypervolume"] == pytest.approx(expected_hv)
    assert summary.hypervolume == pytest.approx(expected_hv)
    assert doc["knee"] == summary.knee.id == "1"
    assert [r["id"] for r in doc["front"]] == ["0", "1", "5", "3"]
    assert all(r["rank"] == 0 and r["on_front"] for r in doc["front"])
    by_id = {r["id"]: r for r in doc["points"]}
    assert list(by_id) == ["0", "1", "5", "3", "2", "4"]
    assert by_id["0"]["meta"] == {"lr": 0.1, "lambda": 0.5}
    assert by_id["2"] | {"meta": None} == {"id": "2", "miou": 0.6, "gflops": 30.0, "rank": 1,
                                           "on_front": False, "is_knee": False, "meta": None}
    assert by_id["4"]["miou"] is None and by_id["4"]["rank"] is None  # strict JSON, no NaN
    assert doc["invalid"] == ["4"]
    assert "NaN" not in path_json.read_text()
    with open(path_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [tuple(r.values()) for r in rows] == [
        ("0", "0.5", "10.0", "0", "true", "false"),
        ("1", "0.7", "20.0", "0", "true", "true"),
        ("5", "0.72", "24.0", "0", "true", "false"),
        ("3", "0.78", "60.0", "0", "true", "false"),
        ("2", "0.6", "30.0", "1", "false", "false"),
    ]
    assert list(rows[0]) == ["id", "miou", "gflops", "rank", "on_front", "is_knee"]
    assert sorted(p.name for p in path_json.parent.iterdir()) == ["pareto.csv", "pareto.json"]


def test_write_front_default_reference_and_no_valid_point(tmp_path: Path) -> None:
    summary = write_front(tmp_path / "a.json", tmp_path / "a.csv", study())
    assert summary.reference == (0.0, pytest.approx(66.0))  # 1.1 × 60; the NaN trial is ignored
    empty = write_front(tmp_path / "b.json", tmp_path / "b.csv", [Point("x", NAN, 1)])
    doc = json.loads((tmp_path / "b.json").read_text())
    assert empty.knee is None
    assert doc["reference"] is None and doc["hypervolume"] == 0.0 and doc["front"] == []
    assert (tmp_path / "b.csv").read_text() == "id,miou,gflops,rank,on_front,is_knee\n"


def test_write_front_leaves_nothing_half_written(tmp_path: Path) -> None:
    path_json = tmp_path / "pareto.json"
    path_json.write_text("old")
    (tmp_path / "blocker").write_text("a file where the CSV's folder should be")
    with pytest.raises(OSError):
        write_front(path_json, tmp_path / "blocker" / "pareto.csv", study())
    assert path_json.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "pareto.json"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_plot_front_writes_a_png_that_encodes_the_points(tmp_path: Path) -> None:
    a = plot_front(study(), tmp_path / "a.png", title="study")
    assert a == tmp_path / "a.png"
    moved = [p if p.id != "2" else Point("2", 0.4, 50) for p in study()]
    image_a, image_b = pixels(a), pixels(plot_front(moved, tmp_path / "b.png", title="study"))
    assert image_a.shape == image_b.shape and image_a.shape[0] > 100
    assert np.any(image_a != image_b, axis=-1).sum() > 20  # the moved marker, not a stray pixel
    assert pixels(plot_front([], tmp_path / "empty.png")).size > 0  # an empty study still draws
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "empty.png"]


def test_plot_front_leaves_nothing_when_drawing_fails(tmp_path: Path, monkeypatch) -> None:
    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")  # fail after writing part of the file
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_front(study(), tmp_path / "pareto.png")
    assert list(tmp_path.iterdir()) == []


def test_front_html_is_self_contained_and_has_one_element_per_point(tmp_path: Path) -> None:
    points = [*study(), Point('<b>&"x', 0.65, 45, {"note": "<script>"})]
    out = front_html(points, tmp_path / "pareto.html")
    text = out.read_text()
    valid = [p for p in points if p.is_valid]
    assert text.count('<circle class="point') == len(valid)
    assert text.count('class="point knee"') == 1
    assert text.count("<title>1 (knee)\n") == 1
    for p in valid:
        assert f"mIoU {p.miou:.4f}\nGFLOPs {p.gflops:.4g}" in text
    assert "lr: 0.1" in text  # meta in the tooltip
    assert text.count("<tr id=") == len(points)  # invalid trials are listed in the table
    assert "diverged" in text
    # User text is escaped; nothing is fetched from outside.
    assert '<b>&"x' not in text and "&lt;b&gt;&amp;&quot;x" in text
    assert "<script" not in text and "http" not in text.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.html"]


def test_summarize_matches_the_parts() -> None:
    points = study()
    summary = summarize(points, reference=(0.0, 100.0))
    assert summary.front == tuple(pareto_front(points))
    assert summary.knee == knee_point(points)
    assert summary.hypervolume == hypervolume(points, reference=(0.0, 100.0))
