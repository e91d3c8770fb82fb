"""Every kind of MLflow run the platform writes, opened and ended here, with the provenance tags
built in one place (`provenance_tags`).

The kinds of run, and who calls what:
- **training**: the driver opens it (`open_training_run`: a resumed training continues its run),
  rank 0 of the workers continues it (`worker_tracker`), logs metrics and at the end the model
  (`finish_training_run`); a failed training is ended by the driver (`end_run`).
- **trial**: a search's trial is a training run; each rung logs its evaluation figures into it and
  the last rung ends it (`log_trial_figures`); a trial whose process died is found by name
  (`find_trial_run`) and ended (`end_run`).
- **study**: a search's parent run (`open_study_run`), which the search ends.
- **evaluation**: one run for each `dynroute evaluate` (`log_evaluation_run`).
- **pareto**: the front, logged into the study's run, or into a run of its own when the study had
  none (`log_pareto_run`).

Functions take plain values (URIs, names, ids), so every room may use them without importing the
specs of another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from dynroute.models import NetworkConfig
from dynroute.platform.tracking.provenance import flatten, git_commit, params_hash
from dynroute.platform.tracking.tracker import RunStatus, Tracker

log = logging.getLogger("dynroute.tracking")


def provenance_tags(*, data_hash: str, dataset: str | None = None,
                    params: Mapping[str, object] | None = None) -> dict[str, str]:
    """What a run or a front records to be traced back: the code's commit (`unknown` outside a
    git checkout), the data's content hash, and where given the dataset and the hash of the
    parameters that define the model."""
    tags = {"git_commit": git_commit() or "unknown", "data_hash": data_hash}
    if params is not None:
        tags["params_hash"] = params_hash(params)
    if dataset is not None:
        tags["dataset"] = dataset
    return tags


def tracker(uri: str, experiment: str) -> Tracker:
    return Tracker(uri=uri, experiment=experiment)


# -- training and trial runs -----------------------------------------------------------------
def open_training_run(uri: str, experiment: str, *, run_name: str, parent_run_id: str | None,
                      state: Mapping | None, tags: Mapping[str, str],
                      params: Mapping[str, object]) -> tuple[Tracker, str]:
    """(tracker, the run a training logs into).

    The run is the newest checkpoint's (`state`; a resumed training continues it) when the server
    knows it; without a checkpoint, a child run of the same name under the same parent (a trial
    run again after its driver died); else a new one with `tags` and `params`. A run that starts
    from a search's shared first steps (`state["warm_start"]`) gets their curve copied.
    """
    runs = tracker(uri, experiment)
    run_id = state.get("mlflow_run_id") if state else None
    if run_id is not None and runs.run_exists(run_id):
        return runs, run_id
    if run_id is not None:
        log.warning("MLflow run %s of the checkpoint is not on %s: starting a new run", run_id,
                    uri)
    elif parent_run_id is not None:
        found = runs.find_child_run(run_name=run_name, parent_run_id=parent_run_id)
        if found is not None:
            return runs, found
    run_id = runs.start_run(run_name=run_name, tags=tags, parent_run_id=parent_run_id)
    runs.log_params(flatten(params))
    shared = state.get("warm_start") if state else None
    if shared and shared.get("run_id") and runs.run_exists(shared["run_id"]):
        runs.copy_metrics(shared["run_id"], up_to_step=int(shared["step"]))
        runs.flush()
    return runs, run_id


def worker_tracker(uri: str | None, experiment: str, run_id: str | None, *,
                   chief: bool) -> Tracker:
    """The tracker of one training worker: rank 0 continues the driver's run; the other ranks
    (and a training without tracking) get a disabled one, whose calls do nothing."""
    enabled = chief and uri is not None and run_id is not None
    worker = Tracker(uri=uri, experiment=experiment, enabled=enabled)
    if enabled:
        worker.resume_run(run_id)
    return worker


def finish_training_run(worker: Tracker, network, config: NetworkConfig) -> None:
    """Log the trained network (data only: its config and weights, `model_logging.py`) and end
    the run FINISHED."""
    if not worker.enabled:
        return
    worker.log_network(network.cpu().eval(), config, name="model")
    worker.flush()
    worker.end_run()


def log_trial_figures(uri: str, experiment: str, run_id: str, figures: Mapping[str, float], *,
                      step: int, final_params: Mapping[str, object] | None) -> None:
    """A rung's figures on the trial's run; at the last rung (`final_params` given: the budget's
    λ2 and μ) the run ends FINISHED, else the training goes on in it at the next rung."""
    runs = tracker(uri, experiment)
    runs.resume_run(run_id)
    runs.log_metrics(figures, step=step)
    if final_params is None:
        runs.flush()
        return
    runs.log_params(final_params)
    runs.end_run("FINISHED")


def find_trial_run(uri: str, experiment: str, *, run_name: str,
                   parent_run_id: str) -> str | None:
    """The run of a trial that died before its first report, found by name under the study's."""
    return tracker(uri, experiment).find_child_run(run_name=run_name,
                                                   parent_run_id=parent_run_id)


def end_run(uri: str | None, experiment: str, run_id: str | None, status: RunStatus) -> None:
    """Mark a run that another process logs into (a training's, a trial's) `status`; nothing
    without tracking or a run."""
    if uri and run_id:
        tracker(uri, experiment).terminate(run_id, status)


# -- study, evaluation and pareto runs -------------------------------------------------------
def open_study_run(uri: str, experiment: str, *, known_run_id: str | None, run_name: str,
                   tags: Mapping[str, str]) -> tuple[Tracker, str]:
    """(tracker with the study's parent run active, its id): the run the study recorded
    (`known_run_id`) when this server has it, else a new one."""
    runs = tracker(uri, experiment)
    if known_run_id:
        try:
            return runs, runs.resume_run(known_run_id)
        except Exception:  # another tracking server than the first session's: start anew
            pass
    return runs, runs.start_run(run_name=run_name, tags=tags)


def log_evaluation_run(uri: str, experiment: str, *, run_name: str, tags: Mapping[str, str],
                       params: Mapping[str, object], metrics: Mapping[str, float],
                       artifacts: Iterable[Path]) -> None:
    """One evaluation as a run of its own: its settings, figures and files."""
    runs = tracker(uri, experiment)
    with runs.run(run_name=run_name, tags=tags):
        runs.log_params(flatten(params))
        runs.log_metrics(metrics, step=0)
        for path in artifacts:
            runs.log_artifact(path)
        runs.flush()


def log_pareto_run(uri: str, experiment: str, *, study_run_id: str | None, run_name: str,
                   metrics: Mapping[str, float], artifacts: Iterable[Path]) -> None:
    """The front's figures and files (under `pareto/`), in the study's run when it has one."""
    runs = tracker(uri, experiment)
    if study_run_id:
        runs.resume_run(study_run_id)
    else:
        runs.start_run(run_name=run_name, tags={"stage": "pareto"})
    try:
        runs.log_metrics(metrics, step=0)
        for path in artifacts:
            runs.log_artifact(path, artifact_path="pareto")
        runs.flush()
    finally:
        runs.end_run()
