"""Pictures of the accuracy-vs-cost trade-off: a PNG for DVC plots and MLflow, and an offline HTML.

Both show every valid trial (GFLOPs on x, mIoU on y), the Pareto front as the staircase of the best
mIoU reachable at each cost, and the knee. The PNG is drawn on matplotlib's Agg canvas directly
(no pyplot, so no global figure state) and both files are written atomically (temporary file, then
rename; the temporary file is removed if drawing fails). The HTML is self-contained: an inline SVG
whose points carry `<title>` tooltips (id, mIoU, GFLOPs, meta) and link to their row in a table;
no scripts, fonts or styles are fetched, because our machines are offline.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dynroute.platform.pareto.analysis import ParetoSummary, Point, summarize

DPI = 120
DOMINATED, FRONT, KNEE = "#9e9e9e", "#1f77b4", "#d62728"
SVG_WIDTH, SVG_HEIGHT, SVG_MARGIN = 720, 440, 56


def _atomic(out: os.PathLike | str, write: Callable[[Path], None]) -> Path:
    """Write through `write(tmp)` and rename into `out`; never leave a partial `out` behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _staircase(front: tuple[Point, ...]) -> tuple[list[float], list[float]]:
    """Corners of the attainment staircase: the best mIoU holds until the next front point."""
    xs: list[float] = []
    ys: list[float] = []
    for i, p in enumerate(front):
        if i:
            xs.append(p.gflops)
            ys.append(front[i - 1].miou)
        xs.append(p.gflops)
        ys.append(p.miou)
    return xs, ys


def _caption(summary: ParetoSummary) -> str:
    invalid = len(summary.fronts.invalid)
    parts = [f"{len(summary.front)} on the front", f"hypervolume {summary.hypervolume:.4g}"]
    if invalid:
        parts.append(f"{invalid} invalid (NaN/inf) not plotted")
    return ", ".join(parts)


def plot_front(points: Iterable[Point], out_png: os.PathLike | str, *, title: str = "") -> Path:
    """A PNG of all valid points, the front as a staircase and the knee as a star.

    Args:
        points: the trials (invalid ones are counted in the caption, not drawn).
        out_png: the PNG to write.
        title: figure title; default "Pareto front".

    Returns:
        `out_png`.
    """
    summary = summarize(points)
    ranked = [p for front in summary.fronts.fronts[1:] for p in front]
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if ranked:
        ax.scatter([p.gflops for p in ranked], [p.miou for p in ranked], s=16, color=DOMINATED,
                   label="dominated", zorder=2)
    if summary.front:
        xs, ys = _staircase(summary.front)
        ax.plot(xs, ys, color=FRONT, linewidth=1.4, zorder=3)
        ax.scatter([p.gflops for p in summary.front], [p.miou for p in summary.front], s=28,
                   color=FRONT, edgecolors="black", linewidths=0.5, label="Pareto front",
                   zorder=4)
    if summary.knee is not None:
        knee = summary.knee
        ax.scatter([knee.gflops], [knee.miou], marker="*", s=220, color=KNEE,
                   edgecolors="black", linewidths=0.6, label=f"knee ({knee.id})", zorder=5)
    if summary.front or ranked:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("GFLOPs per image (mean, real)")
    ax.set_ylabel("mIoU")
    ax.set_title(f"{title or 'Pareto front'}\n{_caption(summary)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _atomic(out_png, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def plot_fronts(series: Mapping[str, Iterable[Point]], out_png: os.PathLike | str, *,
                xlabel: str, title: str) -> Path:
    """A PNG of several sets of points on one pair of axes (cost on x, mIoU on y), each with its
    front as a staircase: e.g. the registered versions' latency on each device profiled.

    Args:
        series: label → points (invalid points are left out); an empty mapping draws the axes
            with a note that there is nothing to show.
        out_png: the PNG to write.
        xlabel, title: the x axis's label and the figure's title.
    """
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in series.items():
        summary = summarize(points)
        valid = [p for front in summary.fronts.fronts for p in front]
        drawn = ax.scatter([p.gflops for p in valid], [p.miou for p in valid], s=24,
                           label=label, zorder=3)
        if summary.front:
            xs, ys = _staircase(summary.front)
            ax.plot(xs, ys, color=drawn.get_facecolor()[0], linewidth=1.2, zorder=2)
        for p in valid:
            ax.annotate(p.id, (p.gflops, p.miou), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if series:
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing profiled yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return _atomic(out_png, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _axis(values: list[float]) -> tuple[float, float, list[float]]:
    """A padded range and round tick values for one SVG axis."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.06 or max(abs(hi) * 0.06, 0.5)
    lo, hi = lo - pad, hi + pad
    ticks = [t for t in MaxNLocator(nbins=6).tick_values(lo, hi) if lo <= t <= hi]
    return lo, hi, [float(t) for t in ticks]


def _svg(summary: ParetoSummary, anchors: dict[str, str]) -> str:
    valid = [p for front in summary.fronts.fronts for p in front]
    x_lo, x_hi, x_ticks = _axis([p.gflops for p in valid])
    y_lo, y_hi, y_ticks = _axis([p.miou for p in valid])
    left, top = SVG_MARGIN, SVG_MARGIN // 2
    width, height = SVG_WIDTH - left - SVG_MARGIN // 2, SVG_HEIGHT - top - SVG_MARGIN

    def sx(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * width

    def sy(v: float) -> float:  # SVG's y grows downwards
        return top + (y_hi - v) / (y_hi - y_lo) * height

    parts = [f'<svg viewBox="0 0 {SVG_WIDTH} {SVG_HEIGHT}" width="{SVG_WIDTH}" '
             f'height="{SVG_HEIGHT}" role="img" aria-label="Pareto front">',
             f'<rect x="{left}" y="{top}" width="{width}" height="{height}" class="frame"/>']
    for t in x_ticks:
        parts.append(f'<text x="{sx(t):.1f}" y="{top + height + 16}" class="tick" '
                     f'text-anchor="middle">{t:g}</text>')
    for t in y_ticks:
        parts.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" class="tick" '
                     f'text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{left + width / 2:.1f}" y="{SVG_HEIGHT - 8}" text-anchor="middle">'
                 "GFLOPs per image (mean, real)</text>")
    parts.append(f'<text x="14" y="{top + height / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + height / 2:.1f})">mIoU</text>')
    if summary.front:
        xs, ys = _staircase(summary.front)
        corners = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
        parts.append(f'<polyline points="{corners}" class="staircase"/>')
    ranks = summary.fronts.ranks
    knee_id = summary.knee.id if summary.knee else None
    # Dominated points first, so front points are drawn (and hovered) on top of them.
    for p in sorted(valid, key=lambda p: (-ranks[p.id], p.gflops, p.id)):
        kind = "knee" if p.id == knee_id else "front" if ranks[p.id] == 0 else "dominated"
        tip = html.escape(_tooltip(p, ranks[p.id], kind == "knee"))
        parts.append(f'<a href="#{anchors[p.id]}"><circle class="point {kind}" '
                     f'cx="{sx(p.gflops):.1f}" cy="{sy(p.miou):.1f}" '
                     f'r="{7 if kind == "knee" else 4}" data-id="{html.escape(p.id)}">'
                     f"<title>{tip}</title></circle></a>")
    parts.append("</svg>")
    return "\n".join(parts)


def _tooltip(p: Point, rank: int | None, is_knee: bool) -> str:
    lines = [f"{p.id}{' (knee)' if is_knee else ''}", f"mIoU {p.miou:.4f}",
             f"GFLOPs {p.gflops:.4g}", f"rank {rank if rank is not None else '-'}"]
    lines += [f"{k}: {v}" for k, v in p.meta.items()]
    return "\n".join(lines)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
svg text { font-size: 12px; fill: #333; }
.frame { fill: none; stroke: #bbb; }
.staircase { fill: none; stroke: #1f77b4; stroke-width: 1.5; }
.point { stroke: #000; stroke-width: 0.5; cursor: pointer; }
.point:hover { stroke-width: 2.5; }
.dominated { fill: #9e9e9e; } .front { fill: #1f77b4; } .knee { fill: #d62728; }
table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
tr:target { background: #ffe9a8; }
"""


def front_html(points: Iterable[Point], out_html: os.PathLike | str, *,
               title: str = "Pareto front") -> Path:
    """A self-contained HTML page: the SVG chart with tooltips and a table of all points.

    Args:
        points: the trials; invalid ones appear in the table only.
        out_html: the page to write.
        title: page heading.

    Returns:
        `out_html`.
    """
    summary = summarize(points)
    ranks = summary.fronts.ranks
    ordered = [p for front in summary.fronts.fronts for p in front] + list(summary.fronts.invalid)
    anchors = {p.id: f"p{i}" for i, p in enumerate(ordered)}  # ids may hold any character
    knee_id = summary.knee.id if summary.knee else None
    rows = []
    for p in ordered:
        rank = ranks.get(p.id)
        meta = json.dumps(dict(p.meta), default=str, sort_keys=True)
        rows.append(f'<tr id="{anchors[p.id]}"><td>{html.escape(p.id)}</td>'
                    f"<td>{p.miou:.4f}</td><td>{p.gflops:.4g}</td>"
                    f"<td>{rank if rank is not None else 'invalid'}</td>"
                    f"<td>{'yes' if p.id == knee_id else ''}</td><td>{html.escape(meta)}</td></tr>")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(_caption(summary))}</p>",
        _svg(summary, anchors),
        "<table><thead><tr><th>id</th><th>mIoU</th><th>GFLOPs</th><th>rank</th><th>knee</th>"
        "<th>meta</th></tr></thead><tbody>", *rows, "</tbody></table></body></html>", ""])
    return _atomic(out_html, lambda tmp: tmp.write_text(page, encoding="utf-8"))
