"""`dynroute report` on the files a pipeline leaves: where each budget ended, the cost floor,
and how the knee's and the training's images spread in cost and differ by scene kind."""

import json
from dataclasses import replace
from pathlib import Path

from dynroute.pipelines.report import report
from dynroute.platform.config.params import load_params
from dynroute.platform.search.trials_file import budget_end

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"large": {"images": 5, "gflops_mean": 0.21, "gflops_min": 0.2, "gflops_max": 0.22,
                   "paths_open_mean": 20.0, "pixel_accuracy_mean": 0.8},
         "small": {"images": 6, "gflops_mean": 0.17, "gflops_min": 0.16, "gflops_max": 0.18,
                   "paths_open_mean": 12.5, "pixel_accuracy_mean": 0.7}}


def trial(number: int, lambda2: float, mu: float, ratio: float, gflops: float) -> dict:
    return {"id": f"s-t{number:03d}", "number": number, "state": "COMPLETE",
            "lambda2": lambda2, "mu": mu, "miou": 0.3 + number / 100, "gflops_mean": gflops,
            "gflops_min": gflops - 0.01, "gflops_p50": gflops, "gflops_max": gflops + 0.01,
            "gflops_floor": 0.0642, "gflops_all_open": 0.3104, "by_kind": KINDS,
            "budget_end": budget_end(lambda2=lambda2, mu=mu, cost_ratio=ratio, gflops=gflops,
                                     floor=0.0642, all_open=0.3104)}


def test_the_report_says_where_each_budget_ended_and_how_images_differ(tmp_path):
    artifacts = tmp_path / "artifacts"
    (artifacts / "eval").mkdir(parents=True)
    (artifacts / "pareto").mkdir()
    (artifacts / "tune").mkdir()
    trials = [trial(0, 0.8, 0.1, 0.12, 0.17), trial(1, 0.5, 0.1, 0.43, 0.25),
              trial(2, 0.0, 0.0, 0.93, 0.30)]
    (artifacts / "tune" / "trials.json").write_text(json.dumps({"trials": trials}))
    (artifacts / "pareto" / "pareto.json").write_text(json.dumps({
        "knee": "s-t000", "front": [{"id": "s-t000", "miou": 0.3, "gflops": 0.17, "meta": {}}],
        "points": trials}))
    (artifacts / "eval" / "metrics.json").write_text(json.dumps({
        "miou": 0.4, "gflops_mean": 0.3, "gflops_min": 0.29, "gflops_p50": 0.3,
        "gflops_max": 0.31, "cost_resolution": [256, 512], "by_kind": KINDS}))
    params = load_params(ROOT / "params.yaml")
    params = replace(params, tune=replace(params.tune, results=str(artifacts / "tune")))
    text = report(params, artifacts=artifacts)
    lines = text.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line.startswith("  s-t00")
           and "E/C_all" not in line}
    assert row["s-t000"][1:5] == ["0.80", "0.10", "0.120", "reached"]
    assert row["s-t001"][1:5] == ["0.50", "0.10", "0.430", "above"]
    assert row["s-t002"][4] == "none", "no budget, no target to reach"
    assert "every gate closed, an image still costs 0.0642 GFLOPs (0.21× the 0.3104" in text
    assert "knee s-t000: per image GFLOPs min 0.16 / p50 0.17 / max 0.18" in text
    assert "per image GFLOPs min 0.29 / p50 0.3 / max 0.31" in text, "the training's spread"
    assert sum("small  scenes:   6 images, GFLOPs mean 0.17 (0.16–0.18), 12.5 paths open"
               in line for line in lines) == 2, "the training's and the knee's"
