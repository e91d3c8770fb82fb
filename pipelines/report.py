"""`dynroute report`: what the main job produced, read back from its metric files.

The last step of `make run`: the single training's evaluation, the Pareto front of the budget
search, the registered versions with their aliases, and how to open the MLflow UI. It reads files
only (DVC skips finished stages, so their own output may not have been printed this time): the
stages' full summaries under artifacts/, not the DVC metrics files, which hold only the headline.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynroute.platform.config.params import Params


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _num(value, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def report(params: Params, *, artifacts: Path = Path("artifacts")) -> str:
    lines: list[str] = []
    evaluation = _read(artifacts / "eval" / "metrics.json")
    if evaluation:
        res = evaluation.get("cost_resolution") or params.evaluate.cost_resolution
        lines += [f"training '{params.run.name}' ({params.train.budget}): mIoU "
                  f"{_num(evaluation.get('miou'), '.4f')}, real GFLOPs mean "
                  f"{_num(evaluation.get('gflops_mean'))} at {res[0]}x{res[1]}; per image "
                  f"{_spread(evaluation)}", *kind_lines(evaluation.get("by_kind")), ""]
    pareto = _read(artifacts / "pareto" / "pareto.json")
    if pareto is None:
        lines.append(f"no Pareto front yet ({artifacts / 'pareto' / 'pareto.json'}): run "
                     f"`dvc repro`")
    else:
        knee = pareto.get("knee")
        lines += ["Pareto front (mIoU max, real GFLOPs mean min):",
                  f"  {'trial':<26}{'mIoU':>8}{'GFLOPs':>10}{'λ2':>8}{'μ':>7}"]
        for point in sorted(pareto.get("front", []), key=lambda p: -(p.get("miou") or 0)):
            meta = point.get("meta", {})
            lines.append(f"  {point['id']:<26}{_num(point.get('miou'), '.4f'):>8}"
                         f"{_num(point.get('gflops')):>10}{_num(meta.get('lambda2'), '.3g'):>8}"
                         f"{_num(meta.get('mu'), '.3g'):>7}"
                         f"{'  knee' if point['id'] == knee else ''}")
        lines.append(f"  {len(pareto.get('front', []))} of {len(pareto.get('points', []))} "
                     f"trials on the front; hypervolume {_num(pareto.get('hypervolume'))}")
    lines.append("")
    lines += search_lines(params, pareto.get("knee") if pareto else None)
    registry = _read(artifacts / "registry.json")
    if registry is None:
        lines.append(f"no registry summary yet ({artifacts / 'registry.json'})")
    else:
        lines += [f"registered model '{registry['name']}':",
                  f"  {'version':>7}  {'trial':<26}{'mIoU':>8}{'GFLOPs':>10}  {'pareto':<7}"
                  f"aliases"]
        for v in registry.get("versions", []):
            aliases = ", ".join(v.get("aliases", [])) or "-"
            lines.append(f"  {v['version']:>7}  {(v.get('trial') or '-'):<26}"
                         f"{_num(v.get('miou'), '.4f'):>8}{_num(v.get('gflops_mean')):>10}  "
                         f"{str(v.get('pareto')).lower():<7}{aliases}")
        lines.append(f"  use one: dynroute select --max-gflops N, or "
                     f"dynroute predict --model models:/{registry['name']}@knee IMAGES…")
    lines.append("")
    lines += profile_lines(artifacts / "profile" / "profile.json")
    if params.tracking.uri == "local":
        lines.append("MLflow UI (runs, the study's trials and their scatter, the registered "
                     "versions):\n  .venv/bin/dynroute ui   # then open the address it prints, "
                     "the runs in the Model training view (Ctrl-C stops it)")
    elif params.tracking.uri != "none":
        lines.append(f"MLflow UI: {params.tracking.uri}")
    return "\n".join(lines)


def profile_lines(path: Path) -> list[str]:
    """The front's latency on the device `dynroute profile` last ran on (its profile.json): per
    version, the front in (mIoU, p90 latency) beside the GFLOPs front, and how far the two
    orders agree."""
    document = _read(path)
    if not document or not document.get("versions"):
        return []
    c = document.get("conditions") or {}
    res = c.get("resolution") or ["?", "?"]
    versions = sorted(document["versions"], key=lambda v: v["gflops_mean"] or 0)
    front = document.get("latency_front", [])
    lines = [f"Latency on {document['device']} (dynroute profile: {c.get('images')} "
             f"{document.get('split')} images at {res[0]}x{res[1]}, {c.get('warmup')} warm-up, "
             f"{c.get('repeats')} interleaved repeats; the median per image):",
             f"  {'version':>7}  {'trial':<26}{'mIoU':>8}{'GFLOPs':>9}{'p50 ms':>9}{'p90 ms':>9}"
             f"{'spread':>8}  latency front"]
    for v in versions:
        note = "yes" if v["version"] in front else "-"
        spread = f"{100 * v['spread']:.1f}%" if v.get("spread") is not None else "-"
        lines.append(f"  {v['version']:>7}  {(v.get('trial') or '-')[:25]:<26}"
                     f"{_num(v.get('miou'), '.4f'):>8}{_num(v.get('gflops_mean')):>9}"
                     f"{_num(v.get('p50_ms')):>9}{_num(v.get('p90_ms')):>9}"
                     f"{spread:>8}"
                     f"  {note}{'  DISTURBED' if v.get('disturbed') else ''}")
    d = document.get("gflops_vs_latency") or {}
    lines.append(f"  GFLOPs front: versions {', '.join(v['version'] for v in versions)} (cheapest "
                 f"first); latency front: {', '.join(front) or 'none'} (fastest first)")
    if d.get("pairs"):
        lines.append(f"  GFLOPs and p90 latency order {d['pairs'] - d['discordant']} of "
                     f"{d['pairs']} version pairs alike (Kendall tau {d['kendall_tau']:.2f})")
    if any(v.get("disturbed") for v in versions):
        lines.append("  DISTURBED: another job shared the device; such figures are kept out of "
                     "the front and of select: profile again on a quiet machine")
    lines += ["  use one: dynroute select --max-latency-ms N [--percentile p50] (this machine), "
              "or --device KEY", ""]
    return lines


def _spread(figures: dict) -> str:
    return (f"GFLOPs min {_num(figures.get('gflops_min'))} / p50 "
            f"{_num(figures.get('gflops_p50'))} / max {_num(figures.get('gflops_max'))}")


def kind_lines(by_kind: dict | None) -> list[str]:
    """One line per scene kind (evaluation.py `by_kind`): how its images' routes differ."""
    return [f"  {kind:<6} scenes: {entry['images']:>3} images, GFLOPs mean "
            f"{_num(entry['gflops_mean'])} ({_num(entry['gflops_min'])}–"
            f"{_num(entry['gflops_max'])}), {_num(entry['paths_open_mean'], '.1f')} paths open"
            for kind, entry in (by_kind or {}).items()]


def search_lines(params: Params, knee: str | None) -> list[str]:
    """Where each trial's budget ended (trials.json, `trials_file.budget_end`), the cost floor no
    budget goes below, and the knee's per-image spread and routes per scene kind."""
    if "://" in params.tune.results:
        return []
    document = _read(Path(params.tune.results) / "trials.json")
    if document is None:
        return []
    done = [t for t in document.get("trials", []) if t.get("state") == "COMPLETE"]
    if not done:
        return []
    lines = ["Budget search: where each trial's budget ended (E/C_all, the expected cost over "
             "the all-open one, against its target μ):",
             f"  {'trial':<26}{'λ2':>6}{'μ':>6}{'E/C_all':>9}  {'budget':<8}{'GFLOPs':>8}"
             f"{'×open':>7}{'mIoU':>8}"]
    floors = set()
    for trial in done:
        end = trial.get("budget_end") or {}
        status = end.get("status") or ("none" if not trial.get("lambda2") else "-")
        lines.append(f"  {trial['id']:<26}{_num(trial.get('lambda2'), '.2f'):>6}"
                     f"{_num(trial.get('mu'), '.2f'):>6}{_num(end.get('cost_ratio'), '.3f'):>9}  "
                     f"{status:<8}{_num(trial.get('gflops_mean'), '.4f'):>8}"
                     f"{_num(end.get('real_fraction'), '.2f'):>7}"
                     f"{_num(trial.get('miou'), '.4f'):>8}")
        if end.get("floor_fraction") is not None:
            floors.add((round(trial["gflops_floor"], 4), round(trial["gflops_all_open"], 4),
                        round(end["floor_fraction"], 3)))
    tolerance = next((t["budget_end"]["tolerance"] for t in done if t.get("budget_end")), None)
    if tolerance is not None:
        lines.append(f"  budget: reached (E/C_all within {tolerance} of μ at the last step), or "
                     f"stayed above or below it; none: no budget (λ2 = 0)")
    for floor, all_open, fraction in sorted(floors):
        lines.append(f"  every gate closed, an image still costs {floor:.4g} GFLOPs ({fraction:.2f}"
                     f"× the {all_open:.4g} with every path open): the stem, decoder, head and "
                     f"gates, which no budget removes")
    knee_trial = next((t for t in done if t["id"] == knee), None)
    if knee_trial is not None:
        lines += [f"knee {knee}: per image {_spread(knee_trial)}",
                  *kind_lines(knee_trial.get("by_kind"))]
    return [*lines, ""]
