"""The `tune` stage: params.yaml's `tune:` section → the budget search → `trials.json`.

Thin on purpose: it resolves the settings (the trials' common training from `run.train_spec`,
iterations, the evaluation split and cost resolution), calls `platform.search.tune.run_study` and
shows progress: trial i of N with ETA, and the best trial so far.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from dynroute.pipelines.progress import Progress
from dynroute.pipelines.run import train_spec
from dynroute.platform import metrics as M
from dynroute.platform.config.params import Params
from dynroute.platform.search.study import SearchSpec
from dynroute.platform.search.tune import run_study


def search_spec(params: Params):
    """The search settings of params.yaml (`tune.iterations` 0: `train.iterations`)."""
    return SearchSpec.resolve(params.tune, train_iterations=params.train.iterations,
                              split=params.evaluate.split,
                              cost_resolution=params.evaluate.cost_resolution,
                              max_failures=params.run.max_failures, latency=params.profile)


class TrialProgress:
    """After each trial: "trial i of N" of the study, this session's rate and ETA (Progress),
    and the best trial so far (highest mIoU; in hard-budget mode, within max_gflops).
    """

    def __init__(self, label: str, *, max_gflops: float = 0.0,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.progress = Progress(f"{label} this session", stream=self.stream, every=0.0)
        self.max_gflops = max_gflops
        self.best: dict | None = None
        self.before: int | None = None  # trials the study had finished before this session

    def __call__(self, entry: dict, done: int, total: int) -> None:
        miou, gflops = entry.get(M.MIOU), entry.get(M.GFLOPS_MEAN)
        fits = self.max_gflops <= 0 or (gflops is not None and gflops <= self.max_gflops)
        if entry["state"] == "COMPLETE" and miou is not None and fits and (
                self.best is None or miou > self.best[M.MIOU]):
            self.best = entry
        if self.before is None:
            self.before = done - 1
        self.progress(done - self.before, total - self.before)
        line = f"  trial {done} of {total}, {entry['id']}: {entry['state']}"
        if miou is not None and gflops is not None:
            latency = entry.get(M.LATENCY_P90_MS)  # with tune.cost: latency, the objective
            timed = f", p90 {latency:.4g} ms" if latency is not None else ""
            line += (f" (mIoU {miou:.4f}, {gflops:.4g} GFLOPs{timed} at step "
                     f"{entry.get('step')})")
        if self.best is not None:
            line += (f"; best so far {self.best['id']}: mIoU {self.best[M.MIOU]:.4f} at "
                     f"{self.best[M.GFLOPS_MEAN]:.4g} GFLOPs")
        self.stream.write(line + "\n")
        self.stream.flush()


def run_tune(params: Params, *, data: str, uri: str | None, resume: bool) -> Path:
    """Run (or with `resume`, continue) the study of `params.tune`; the trials.json path."""
    search = search_spec(params)
    base = train_spec(params, data=data, uri=uri)
    progress = TrialProgress(f"tune {search.study} ({search.mode})",
                             max_gflops=search.max_gflops)
    return run_study(search, base, resume=resume, on_trial=progress)
