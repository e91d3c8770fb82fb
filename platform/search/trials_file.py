"""`trials.json`: the search's record of its finished trials, written from the Optuna study.

One record per finished trial (all sessions of the study): its state, λ2 and μ, the objectives and
GFLOPs figures, where its checkpoint and MLflow run are, and where its budget ended
(`budget_end`). With `tune.cost: latency` the document says so (`cost`, and `objectives` names
latency_p90_ms) and each trial also records its latencies, the device key they were measured on
and their noise (latency_cost.py). The pareto and register stages read the file (and stay on
GFLOPs); `dynroute report` shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynroute.platform import metrics as M
from dynroute.platform.search.latency_cost import LATENCY_DEVICE, LATENCY_NOISE
from dynroute.platform.search.study import (
    BUDGET_KEYS,
    BY_KIND,
    RUN_NAME_ATTR,
    SEEDED_ATTR,
    STEP,
    SearchSpec,
    apply_params,
)
from dynroute.platform.train.spec import TrainSpec

TRIALS_FILE = "trials.json"
_TRIAL_STATES = {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "FAILED"}
# |E/C_all − μ| at the end of training within which a budget counts as reached.
BUDGET_TOLERANCE = 0.05


def trial_records(search: SearchSpec, base: TrainSpec, study) -> list[dict]:
    """One record per finished trial of the study (all sessions), by trial number."""
    records = []
    keys = search.report_keys  # with cost: latency, the latencies too
    for t in study.get_trials(deepcopy=False):
        state = _TRIAL_STATES.get(t.state.name)
        if state is None:  # WAITING or RUNNING: never run, or still running elsewhere
            continue
        attrs = t.user_attrs
        try:
            lambda2, mu = apply_params(base, t.params).train.budget_weights
        except (KeyError, ValueError):
            lambda2 = mu = None
        complete = state == "COMPLETE"
        run_id = attrs.get("mlflow_run_id") or None
        record = {
            "id": search.trial_id(t.number), "number": t.number, "state": state,
            "seeded_from": attrs.get(SEEDED_ATTR), "params": dict(t.params),
            "lambda2": lambda2, "mu": mu,
            "iterations": search.iterations,
            **{k: attrs.get(k) if complete else None for k in (*keys, *BUDGET_KEYS)},
            "checkpoint": attrs.get("checkpoint") if complete else None,
            "mlflow_run_id": run_id,
            "model_uri": f"runs:/{run_id}/model" if complete and run_id else None,
            "run_name": attrs.get(RUN_NAME_ATTR),
            "retry_of": t.system_attrs.get("failed_trial"),
        }
        if search.cost == "latency":
            for key in (LATENCY_DEVICE, LATENCY_NOISE):
                record[key] = attrs.get(key) if complete else None
        if complete:
            record[BY_KIND] = attrs.get(BY_KIND)
            record["budget_end"] = budget_end(
                lambda2=lambda2, mu=mu, cost_ratio=attrs.get(M.EXPECTED_COST_RATIO),
                gflops=attrs.get(M.GFLOPS_MEAN), floor=attrs.get(M.GFLOPS_FLOOR),
                all_open=attrs.get(M.GFLOPS_ALL_OPEN))
        if state == "PRUNED" and STEP in attrs:  # the figures where the scheduler stopped it
            record["last_rung"] = {k: attrs.get(k) for k in (STEP, *keys)}
        if search.mode == "constrained":
            constraints = t.system_attrs.get("constraints")
            record["constraint"] = constraints[0] if constraints else None
            record["feasible"] = None if not constraints else constraints[0] <= 0
        records.append(record)
    return records


def budget_end(*, lambda2: float | None, mu: float | None, cost_ratio: float | None,
               gflops: float | None, floor: float | None, all_open: float | None) -> dict | None:
    """Where a trial's budget ended, or None for a trial without a budget (λ2 = 0) or without
    the figures (a study run before they were recorded).

    `cost_ratio` is E/C_all over the training's last logged steps: the quantity the budget loss
    pulls towards μ. `status` says whether it got there (`reached`, within BUDGET_TOLERANCE), or
    stayed `above` or `below` it. The real GFLOPs are also put against the ones of the same
    network with every gate closed (`floor_fraction`: the stem, decoder, head and gates, which
    no budget removes) and every path open (`real_fraction`).
    """
    if not lambda2 or mu is None or cost_ratio is None:
        return None
    gap = cost_ratio - mu
    status = "reached" if abs(gap) <= BUDGET_TOLERANCE else ("above" if gap > 0 else "below")
    end = {"cost_ratio": cost_ratio, "mu": mu, "gap": gap, "status": status,
           "tolerance": BUDGET_TOLERANCE,
           "floor_fraction": None, "real_fraction": None}
    if floor is not None and all_open:
        end["floor_fraction"] = floor / all_open
        end["real_fraction"] = gflops / all_open if gflops is not None else None
    return end


def write_trials(search: SearchSpec, base: TrainSpec, study, *,
                 parent_run_id: str | None) -> Path:
    """Write `{results}/trials.json` atomically (the pareto and register stages read it)."""
    document = {
        "study": search.study, "mode": search.mode,
        "max_gflops": search.max_gflops if search.mode == "constrained" else None,
        "storage": search.storage,
        "cost": search.cost,  # tune.cost: the second objective's figure
        "objectives": [list(o) for o in search.objectives],
        "cost_resolution": list(search.cost_resolution),
        "parent_run_id": parent_run_id,
        "trials": trial_records(search, base, study),
    }
    path = search.results_dir() / TRIALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
