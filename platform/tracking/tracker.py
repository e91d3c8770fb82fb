"""Experiment tracking: a local MLflow server and the tracking facade training code talks to.

With its helpers (`metric_sender.py`, `model_logging.py`, `server.py`, and
`client.py`: the server's limits, fail-fast HTTP settings, artifact-store errors) and with
`register.py` and `registered_versions.py` (the registry half of the API: versions, aliases, tags),
this is the only code that imports `mlflow` (docs/conventions.md, lesson 8): MLflow's APIs move
between releases, and keeping the calls in these few files keeps an upgrade small.

* `MlflowServer` runs a real `mlflow server` on 127.0.0.1 in its own process group (sqlite backend
  by default, because MLflow ≥ 3.13 refuses the plain file store; see docs/platform.md, pitfall 6).
* `Tracker` is what training and evaluation call. It is rank-aware (`enabled=False` turns every
  method into a no-op, so the training loop never branches on rank) and robust to a server that
  restarts: metrics go through an ordered buffer that a background thread delivers with explicit
  timestamps, retrying through outages (`metric_sender.MetricSender`; its `MetricsNotDelivered`
  is what `flush` and `end_run` raise). Networks are logged and loaded as data by `model_logging.py`
  and registered by `register.py`.
* The reproducibility record's pure helpers (`flatten`, `params_hash`, `git_commit`) live in
  `provenance.py`.

MLflow 3.17 facts this module relies on (checked in the installed source; those about metric
delivery and model logging are in the helpers' docstrings):

* The fluent active-run stack is thread-local, so the facade keeps its own run stack and logs
  through `MlflowClient` with explicit run ids, and so do model logging and loading.
* The parameter value limit is 6000 characters (older releases and docs: 500); longer values are
  cut silently by the server (`MLFLOW_TRUNCATE_LONG_VALUES`), so we cut them with a visible marker.
* `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `_TIMEOUT` / `_BACKOFF_FACTOR` are read on every request.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from dynroute.platform.tracking.client import (
    MAX_PARAM_VALUE_CHARS,
    MAX_TAG_VALUE_CHARS,
    PARAMS_TAGS_PER_BATCH,
    configure_http_client,
    mlflow_client,
    storing,
    truncate,
)
from dynroute.platform.tracking.metric_sender import MetricSender
from dynroute.platform.tracking.model_logging import log_network
from dynroute.platform.tracking.provenance import flatten
from dynroute.platform.url_secrets import mask_url

if TYPE_CHECKING:
    import torch

    from dynroute.models import NetworkConfig

__all__ = ["EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "RunStatus", "Tracker", "experiment_page"]

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

_NO_TAGS: Mapping[str, str] = MappingProxyType({})

# The experiment's declared type, MLflow 3's `mlflow.experimentKind` tag (key and values read in
# MLflow 3.17.2's UI bundle, whose type selector writes it; `mlflow.demo` sets the GenAI one). Our
# experiments hold training runs, so the tracker declares `custom_model_development` on the
# experiments it creates, and on existing ones with no type or one the UI only inferred
# (`*_inferred`, `no_inferred_type`); a type someone chose is kept. MLflow 3.17.2's own UI opens
# an experiment on the view of its GenAI / Model training switch (the browser remembers it,
# `?workflowType=` overrides it) and not on this tag, so `experiment_page` gives the address of
# the training view (measured in Chromium; see the README, "MLflow UI").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def _kind_chosen(kind: str | None) -> bool:
    return bool(kind) and not kind.endswith("_inferred") and kind != "no_inferred_type"


def experiment_page(uri: str, experiment: str) -> str | None:
    """The UI address of `experiment`'s runs in the Model training view, on the tracking server
    at `uri` (None when it has no such experiment)."""
    found = mlflow_client(uri).get_experiment_by_name(experiment)
    if found is None:
        return None
    return f"{uri.rstrip('/')}/#/experiments/{found.experiment_id}/runs?{TRAINING_VIEW}"


# ---------------------------------------------------------------------------------------------
# The facade


class Tracker:
    """The tracking facade: runs, params, metrics, artifacts and models (registering them is
    `register.py`'s).

    Args:
        uri: tracking URI (e.g. `MlflowServer.uri`); None falls back to `MLFLOW_TRACKING_URI`.
            Ignored when disabled.
        experiment: experiment name; created on first use.
        enabled: False on non-zero ranks: every method is then a no-op returning None, so the
            training code never branches on rank. Nothing touches the network or the
            environment.
        flush_timeout_s: how long `end_run` waits for buffered metrics (covers a server restart).

    Methods act on the innermost run this tracker started. Constructing a tracker contacts no
    server.
    """

    def __init__(self, *, uri: str | None, experiment: str, enabled: bool = True,
                 flush_timeout_s: float = 120.0) -> None:
        self.enabled = enabled
        self.experiment = experiment
        self.flush_timeout_s = flush_timeout_s
        self._runs: list[str] = []
        self._experiment_id: str | None = None
        self.uri = uri
        if not enabled:
            return
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not self.uri:
            raise ValueError("Tracker(enabled=True) needs a tracking URI: pass uri= (e.g. "
                             "MlflowServer(...).uri) or set MLFLOW_TRACKING_URI")
        configure_http_client()
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._sender = MetricSender(client=self._client, uri=self.uri)

    # -- runs --------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The innermost active run of this tracker (None when disabled or outside a run)."""
        return self._runs[-1] if self._runs else None

    def _active(self) -> str:
        if not self._runs:
            raise RuntimeError("no active run: call tracker.start_run(...) or use "
                               "`with tracker.run(...)` first")
        return self._runs[-1]

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self._client.create_experiment(
                        self.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except MlflowException:
                    # Another process (a parallel trial) may have created it just now.
                    found = self._client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
                if not _kind_chosen(found.tags.get(EXPERIMENT_KIND_TAG)):
                    self._client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG,
                                                    EXPERIMENT_KIND)
        assert self._experiment_id is not None
        return self._experiment_id

    def start_run(self, *, run_name: str, tags: Mapping[str, str] = _NO_TAGS,
                  parent_run_id: str | None = None,
                  nested_in_this_process: bool = False) -> str | None:
        """Start a run in the experiment and make it this tracker's active run.

        Args:
            run_name: display name.
            tags: extra run tags (MLflow's context tags, such as the user and source, are added).
            parent_run_id: make this a child run of a run started elsewhere (e.g. the study's
                parent run, from a Tune trial process).
            nested_in_this_process: make this a child of this tracker's active run.

        Returns:
            The run id (None when disabled).
        """
        if not self.enabled:
            return None
        if nested_in_this_process:
            parent = self._active()
            if parent_run_id not in (None, parent):
                raise ValueError(f"parent_run_id={parent_run_id} contradicts "
                                 f"nested_in_this_process=True (the active run is {parent})")
            parent_run_id = parent
        elif self._runs:
            raise RuntimeError(f"run {self._runs[-1]} is still active in this tracker; end it "
                               "first, or pass nested_in_this_process=True to start a child run")
        user_tags = {key: truncate(str(value), MAX_TAG_VALUE_CHARS)
                     for key, value in tags.items()}
        user_tags[MLFLOW_RUN_NAME] = run_name
        if parent_run_id is not None:
            user_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self._client.create_run(experiment_id=self._experiment(), run_name=run_name,
                                      tags=resolve_tags(user_tags))
        self._runs.append(run.info.run_id)
        return run.info.run_id

    def resume_run(self, run_id: str) -> str | None:
        """Make an existing run (e.g. of a training restarted from its checkpoint) the active
        run again and mark it RUNNING, so its metrics continue where they stopped."""
        if not self.enabled:
            return None
        if self._runs:
            raise RuntimeError(f"run {self._runs[-1]} is still active in this tracker")
        self._client.update_run(run_id, status="RUNNING")
        self._runs.append(run_id)
        return run_id

    def end_run(self, status: RunStatus = "FINISHED") -> None:
        """Flush the run's metrics, then mark it `status` (FINISHED, FAILED or KILLED)."""
        if not self.enabled:
            return
        if status not in _RUN_STATUSES:
            raise ValueError(f"status {status!r} is not one of {_RUN_STATUSES}")
        run_id = self._active()
        self._runs.pop()
        self.terminate(run_id, status)

    def run_exists(self, run_id: str) -> bool:
        """Whether the server knows the run (False for one deleted or from another server)."""
        if not self.enabled:
            return False
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def find_child_run(self, *, run_name: str, parent_run_id: str) -> str | None:
        """The id of the newest child run `run_name` of `parent_run_id` in the experiment."""
        if not self.enabled:
            return None
        def quoted(value: str) -> str:
            return "'" + value.replace("'", "\\'") + "'"

        found = self._client.search_runs(
            [self._experiment()], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`{MLFLOW_RUN_NAME}` = {quoted(run_name)} and "
                          f"tags.`{MLFLOW_PARENT_RUN_ID}` = {quoted(parent_run_id)}")
        return found[0].info.run_id if found else None

    def terminate(self, run_id: str, status: RunStatus) -> None:
        """Mark a run that another process or tracker logs into `status`; this tracker's
        buffered metrics are flushed first."""
        if not self.enabled:
            return
        if status not in _RUN_STATUSES:
            raise ValueError(f"status {status!r} is not one of {_RUN_STATUSES}")
        try:
            self.flush()
        finally:
            self._client.set_terminated(run_id, status=status)
        self._print_link(run_id)

    def _print_link(self, run_id: str) -> None:
        """Where to see the run in the MLflow UI, the URI's password masked (MLflow's own line,
        which it prints on ending a run, is turned off: it showed the password)."""
        base = mask_url(self.uri).rstrip("/")
        if not base.startswith(("http://", "https://")):
            return
        try:
            info = self._client.get_run(run_id).info
        except MlflowException:  # only a courtesy: the run is ended already
            return
        print(f"View run {info.run_name} at: {base}/#/experiments/{info.experiment_id}/runs/"
              f"{run_id}", flush=True)

    @contextlib.contextmanager
    def run(self, *, run_name: str, tags: Mapping[str, str] = _NO_TAGS,
            parent_run_id: str | None = None,
            nested_in_this_process: bool = False) -> Iterator[str | None]:
        """`with tracker.run(run_name=...) as run_id:` — ends FINISHED, FAILED on an exception,
        KILLED on KeyboardInterrupt/SystemExit; the exception propagates."""
        run_id = self.start_run(run_name=run_name, tags=tags, parent_run_id=parent_run_id,
                                nested_in_this_process=nested_in_this_process)
        try:
            yield run_id
        except BaseException as exc:
            status: RunStatus = "FAILED" if isinstance(exc, Exception) else "KILLED"
            try:
                self.end_run(status=status)
            except Exception as end_exc:
                # The training's own exception is what matters; don't let ours mask it.
                logger.error("could not mark run %s %s: %s", run_id, status, end_exc)
            raise
        self.end_run()

    # -- params, tags, metrics ---------------------------------------------------------------

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params: nested mappings flattened with dots, values `str()`-ed, values longer than
        MAX_PARAM_VALUE_CHARS cut with a `...[truncated N chars]` marker, sent in batches of 100.

        MLflow params are immutable: logging a key again with another value is an error.
        """
        if not self.enabled:
            return
        run_id = self._active()
        items = [Param(key, truncate(str(value), MAX_PARAM_VALUE_CHARS))
                 for key, value in flatten(params).items()]
        for begin in range(0, len(items), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id=run_id,
                                   params=items[begin:begin + PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Set (or overwrite) run tags; values `str()`-ed and cut at MAX_TAG_VALUE_CHARS."""
        if not self.enabled:
            return
        run_id = self._active()
        items = [RunTag(key, truncate(str(value), MAX_TAG_VALUE_CHARS))
                 for key, value in tags.items()]
        for begin in range(0, len(items), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id=run_id, tags=items[begin:begin + PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics of `step`; returns at once (delivery is in the background, in order).

        Raises:
            ValueError: a value is NaN or infinite (it would corrupt MLflow's charts); nothing of
                this call is logged.
        """
        if not self.enabled:
            return
        run_id = self._active()
        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"metric {key!r} at step {step} is {value!r}, not a number") from exc
            if not math.isfinite(number):
                raise ValueError(f"metric {key!r} is {number} at step {step}; NaN/inf values "
                                 "corrupt MLflow charts, so fix the computation or skip it")
            batch.append(Metric(key=key, value=number, timestamp=timestamp, step=int(step)))
        self._sender.put(run_id, batch)

    def copy_metrics(self, source_run_id: str, *, up_to_step: int) -> int:
        """Copy the metric history of another run, steps ≤ `up_to_step`, into the active run
        (with their original steps and timestamps); the number of points copied."""
        if not self.enabled:
            return 0
        run_id = self._active()
        copied = 0
        for key in sorted(self._client.get_run(source_run_id).data.metrics):
            points = [m for m in self._client.get_metric_history(source_run_id, key)
                      if m.step <= up_to_step]
            if points:
                self._sender.put(run_id, [Metric(key=m.key, value=m.value,
                                                 timestamp=m.timestamp, step=m.step)
                                          for m in points])
                copied += len(points)
        return copied

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every buffered metric is on the server (default: `flush_timeout_s`).

        Raises:
            metric_sender.MetricsNotDelivered: still buffered after the timeout, or rejected by
                the server.
        """
        if not self.enabled:
            return
        self._sender.flush(self.flush_timeout_s if timeout is None else timeout)

    # -- artifacts ---------------------------------------------------------------------------

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's contents) under `artifact_path` of the active run."""
        if not self.enabled:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        with storing(f"artifact {path}", self.uri):
            if path.is_dir():
                self._client.log_artifacts(self._active(), str(path), artifact_path)
            else:
                self._client.log_artifact(self._active(), str(path), artifact_path)

    def log_dict(self, data: Mapping[str, object] | list[object], artifact_file: str) -> None:
        """Store `data` as a JSON (or YAML, by the file's suffix) artifact."""
        if not self.enabled:
            return
        with storing(f"artifact {artifact_file}", self.uri):
            self._client.log_dict(self._active(), data, artifact_file)

    # -- models ------------------------------------------------------------------------------

    def log_network(self, network: torch.nn.Module, config: NetworkConfig, *,
                    name: str = "model") -> str | None:
        """Log a network to the active run as data only (`model_logging.log_network`: its
        config as JSON, its weights as tensors, their SHA-256 recorded on the server).

        Returns:
            The model URI, `models:/<model_id>` (None when disabled).
        """
        if not self.enabled:
            return None
        run_id = self._active()
        assert self.uri is not None
        with storing(f"model {name!r}", self.uri):
            return log_network(network, config, tracking_uri=self.uri,
                               experiment_id=self._experiment(), run_id=run_id, name=name)
