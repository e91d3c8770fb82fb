"""The `pareto` stage: the study's trials (trials.json from `dynroute tune`) → the Pareto front.

Writes `pareto.json` + `pareto.csv` (pareto.analysis.write_front; the CSV is the DVC plot of mIoU
against GFLOPs), a PNG and an interactive HTML page, and logs all of them with the front's
figures (hypervolume, size) to the study's parent run in MLflow. Each point carries its trial's
record in `meta` (the registry reads model URIs, λ2/μ and the figures from there), plus the data
hash, git commit and dataset of this run. The DVC metrics file holds only the front's headline
(`headline`): what `dvc exp show` compares across experiments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dynroute.platform import metrics as M
from dynroute.platform.config.params import Params
from dynroute.platform.data.shards import read_manifest
from dynroute.platform.files import write_json_atomic
from dynroute.platform.pareto.analysis import ParetoSummary, Point, write_front
from dynroute.platform.pareto.plots import front_html, plot_front
from dynroute.platform.tracking import runs

TRIAL_KEYS = ("id", "state", M.MIOU, M.GFLOPS_MEAN)
META_KEYS = ("number", "state", "seeded_from", "params", "lambda2", "mu", "iterations",
             M.GFLOPS_MAX, M.GFLOPS_MIN, M.GFLOPS_P50, M.GFLOPS_P90, "checkpoint",
             "mlflow_run_id", "model_uri")


class TrialsError(ValueError):
    """trials.json is missing, unreadable or malformed."""


@dataclass(frozen=True)
class ParetoOutputs:
    summary: ParetoSummary
    points: list[Point]
    files: dict[str, Path]


def load_trials(path: Path) -> dict:
    """The document `dynroute tune` writes, checked for what this stage needs."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrialsError(f"{path} not found: run `dynroute tune` (or `dvc repro tune`) "
                          f"first") from None
    except json.JSONDecodeError as err:
        raise TrialsError(f"{path} is not valid JSON ({err}); re-run `dynroute tune`") from None
    if not isinstance(document, dict) or not isinstance(document.get("trials"), list):
        raise TrialsError(f"{path}: expected an object with a 'trials' list")
    for i, trial in enumerate(document["trials"]):
        missing = [k for k in TRIAL_KEYS if not isinstance(trial, dict) or k not in trial]
        if missing:
            raise TrialsError(f"{path}: trials[{i}] lacks {', '.join(missing)}")
    return document


def trial_points(document: dict, *, extra_meta: dict | None = None) -> list[Point]:
    """One point per finished trial; a trial without both objectives becomes an invalid point
    (NaN), which the front leaves out but the report lists. Failed trials are left out."""
    study = document.get("study")
    resolution = document.get("cost_resolution")
    points = []
    for trial in document["trials"]:
        if trial["state"] == "FAILED":
            continue
        meta = {k: trial.get(k) for k in META_KEYS}
        meta |= {"study": study, "cost_resolution": resolution, **(extra_meta or {})}
        points.append(Point(id=str(trial["id"]), miou=_number(trial[M.MIOU]),
                            gflops=_number(trial[M.GFLOPS_MEAN]), meta=meta))
    return points


def _number(value) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def run_pareto(params: Params, *, trials: Path, out: Path, plots: Path,
               uri: str | None, metrics: Path | None = None) -> ParetoOutputs:
    """Write the front of `trials` to `out` (pareto.json, pareto.csv), `plots` (PNG, HTML) and
    its headline to `metrics`; log them to the study's parent MLflow run when tracking is on."""
    document = load_trials(trials)
    manifest = read_manifest(params.data.prepared)
    points = trial_points(document, extra_meta=runs.provenance_tags(
        data_hash=manifest.content_hash, dataset=manifest.dataset))
    files = {"json": out / "pareto.json", "csv": out / "pareto.csv",
             "png": plots / "pareto.png", "html": plots / "pareto.html"}
    summary = write_front(files["json"], files["csv"], points)
    title = f"Pareto front of {document.get('study', 'the study')}"
    plot_front(points, files["png"], title=title)
    front_html(points, files["html"], title=title)
    if metrics is not None:
        write_json_atomic(metrics, headline(summary, points))
    if uri is not None:
        _track(uri, params, document, summary, files)
    return ParetoOutputs(summary=summary, points=points, files=files)


def headline(summary: ParetoSummary, points: list[Point]) -> dict:
    """The front in a few figures (the DVC metrics file): hypervolume, front size, trials, and
    the knee's trial, mIoU, mean GFLOPs, λ2 and μ (empty when there is no knee)."""
    knee = summary.knee
    return {
        "hypervolume": summary.hypervolume,
        "front_size": len(summary.front),
        "trials": len(points),
        "knee": {} if knee is None else {
            "trial": knee.id, M.MIOU: knee.miou, M.GFLOPS_MEAN: knee.gflops,
            "lambda2": knee.meta.get("lambda2"), "mu": knee.meta.get("mu")},
    }


def _track(uri: str, params: Params, document: dict, summary: ParetoSummary,
           files: dict[str, Path]) -> None:
    runs.log_pareto_run(
        uri, params.tracking.experiment, study_run_id=document.get("parent_run_id"),
        run_name=f"pareto-{document.get('study', 'study')}",
        metrics={"pareto_hypervolume": summary.hypervolume,
                 "pareto_front_size": float(len(summary.front))},
        artifacts=files.values())


def format_table(outputs: ParetoOutputs) -> str:
    """The front as a text table, best mIoU first, with the knee marked."""
    summary = outputs.summary
    knee = summary.knee.id if summary.knee else None
    lines = [f"{'trial':<28}{'mIoU':>8}{'GFLOPs':>10}{'λ2':>8}{'μ':>7}  ",
             "-" * 64]
    for p in sorted(summary.front, key=lambda p: -p.miou):
        lam, mu = p.meta.get("lambda2"), p.meta.get("mu")
        lines.append(f"{p.id:<28}{p.miou:>8.4f}{p.gflops:>10.4g}"
                     f"{_fmt(lam):>8}{_fmt(mu):>7}  {'knee' if p.id == knee else ''}")
    invalid = len(summary.fronts.invalid)
    lines.append(f"{len(summary.front)} on the front of {len(outputs.points)} trials"
                 + (f" ({invalid} without both objectives)" if invalid else "")
                 + f"; hypervolume {summary.hypervolume:.4g}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else "-"
