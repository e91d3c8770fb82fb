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
                  f"{_num(evaluation.get('gflops_mean'))} at {res[0]}x{res[1]}", ""]
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
    if params.tracking.uri == "local":
        lines.append("MLflow UI (runs, the study's trials and their scatter, the registered "
                     "versions):\n  .venv/bin/dynroute ui   # then open http://127.0.0.1:5000 "
                     "(Ctrl-C stops it)")
    elif params.tracking.uri != "none":
        lines.append(f"MLflow UI: {params.tracking.uri}")
    return "\n".join(lines)
