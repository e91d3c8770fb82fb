"""Experiment tracking: a local MLflow server and the tracking facade training code talks to.

With `registry.py` (the registry half of the API: versions, aliases, tags), this is the only module
that imports `mlflow` (style.md, lesson 8): MLflow's APIs move between releases, and keeping the
calls in two files makes an upgrade a two-file change.

* `MlflowServer` runs a real `mlflow server` on 127.0.0.1 in its own process group (sqlite backend
  by default, because MLflow ≥ 3.13 refuses the plain file store; see platform.md, pitfall 6).
* `Tracker` is what training and evaluation call. It is rank-aware (`enabled=False` turns every
  method into a no-op, so the training loop never branches on rank) and robust to a server that
  restarts: metrics go through an ordered buffer that a background thread delivers with explicit
  timestamps, retrying through outages.
* `flatten`, `params_hash` and `git_commit` are small pure helpers for the reproducibility record.

MLflow 3.17 facts this module relies on (checked in the installed source):

* `mlflow.pytorch.log_model` takes `name=` (`artifact_path=` is deprecated), returns a `ModelInfo`
  whose `model_uri` is `models:/<model_id>` (a LoggedModel, no longer `runs:/...`), and defaults to
  `serialization_format="pt2"` (torch.export; needs `input_example`) outside Databricks.
* The fluent active-run stack is thread-local, so the facade keeps its own run stack and logs
  through `MlflowClient` with explicit run ids; only model logging/registration use the fluent
  API (with the process-wide tracking URI set first).
* The parameter value limit is 6000 characters (older releases and docs: 500); longer values are
  cut silently by the server (`MLFLOW_TRUNCATE_LONG_VALUES`), so we cut them with a visible marker.
* The SQL store ignores an exact duplicate metric (same key, value, step and timestamp), so a batch
  replayed after a lost response does not duplicate points.
* `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `_TIMEOUT` / `_BACKOFF_FACTOR` are read on every request.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from dynroute.platform.mlflow_server import MlflowServer, MlflowServerError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_PARAM_VALUE_CHARS",
    "MetricsNotDelivered",
    "MlflowServer",
    "MlflowServerError",
    "RunStatus",
    "Tracker",
    "flatten",
    "git_commit",
    "params_hash",
]

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# Server-side limits of MLflow 3.17 (mlflow/utils/validation.py); a test pins them to MLflow's own.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
PARAMS_TAGS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

# Client HTTP settings, used unless the environment already sets them. MLflow's defaults (7 retries
# with backoff factor 2, 120 s timeout) let a dead server stall a training for minutes; metrics do
# their own retrying in the buffer, and the rest should fail fast with a clear error.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

_NO_TAGS: Mapping[str, str] = MappingProxyType({})


# ---------------------------------------------------------------------------------------------
# Helpers


def flatten(mapping: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Flatten nested mappings (and dataclass instances) into dotted keys.

    Args:
        mapping: e.g. `{"train": {"lr": 0.1}, "seed": 0}`.
        prefix: prepended to every key, joined with a dot.

    Returns:
        e.g. `{"train.lr": 0.1, "seed": 0}`; an empty nested mapping stays as `{}` so its key is
        not silently dropped.
    """
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            # Shallow on purpose: nested dataclasses are flattened by the recursion.
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def params_hash(mapping: Mapping[str, object]) -> str:
    """sha256 (hex) of the canonical JSON of `mapping`: sorted keys, no whitespace, non-JSON
    values as `str()`; equal for equal content whatever the key order."""
    canonical = json.dumps(mapping, sort_keys=True, separators=(",", ":"), default=str,
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def git_commit(path: str | Path = ".") -> str | None:
    """The commit checked out at `path`, with a `-dirty` suffix when tracked files have changes.

    Untracked files do not count: run outputs and data often sit untracked in a working tree.

    Returns:
        The 40-hex commit (`abc…-dirty` when dirty), or None outside a git repository or without
        git on the PATH.
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                                  timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if changes else commit


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = f"...[truncated {len(value)} chars]"
    return value[: limit - len(marker)] + marker


def _configure_http_client() -> None:
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _is_transient(exc: BaseException) -> bool:
    """True for failures a later retry can cure: no connection, timeouts, 5xx and 429.

    MLflow wraps connection errors and timeouts in an `MlflowException` with INTERNAL_ERROR
    (HTTP 500); a 4xx answer (a deleted run, a bad key) will not change on retry.
    """
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, OSError)


class MetricsNotDelivered(RuntimeError):
    """Metrics could not be delivered: the server stayed down past the timeout, or it rejected a
    batch (e.g. the run was deleted)."""


class _MetricSender:
    """Delivers metrics in order from a FIFO buffer on a background thread.

    A batch leaves the buffer only once the server has accepted it; transient failures (no
    connection, timeout, 5xx) are retried with exponential backoff, so a server restart loses
    nothing. Each metric carries the timestamp of its `log_metrics` call, so a late delivery keeps
    its original time (and an exact replay is deduplicated by the server).
    """

    _BACKOFF_FIRST_S = 0.25
    _BACKOFF_MAX_S = 2.0

    def __init__(self, *, client: MlflowClient, uri: str) -> None:
        self._client = client
        self._uri = uri
        self._pending: deque[tuple[str, Metric]] = deque()
        self._cond = threading.Condition()
        self._rejected: list[str] = []  # permanent failures, reported by the next flush()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    def put(self, run_id: str, metrics: Sequence[Metric]) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mlflow-metrics",
                                                daemon=True)
                self._thread.start()
                atexit.register(self._drain_at_exit)
            self._pending.extend((run_id, metric) for metric in metrics)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _next_batch(self) -> tuple[str, list[Metric]]:
        """Wait for metrics; return the oldest run's leading run of at most METRICS_PER_BATCH."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
            run_id = self._pending[0][0]
            batch = []
            for owner, metric in self._pending:
                if owner != run_id or len(batch) == METRICS_PER_BATCH:
                    break
                batch.append(metric)
            return run_id, batch

    def _loop(self) -> None:
        backoff = self._BACKOFF_FIRST_S
        while True:
            run_id, batch = self._next_batch()
            try:
                self._client.log_batch(run_id=run_id, metrics=batch)
            except Exception as exc:
                if _is_transient(exc):
                    self._note_outage(exc)
                    time.sleep(backoff)
                    backoff = min(2 * backoff, self._BACKOFF_MAX_S)
                    continue
                logger.error("MLflow rejected %d metrics of run %s: %s", len(batch), run_id, exc)
                with self._cond:
                    self._rejected.append(f"{len(batch)} metrics of run {run_id}: {exc}")
                    self._drop(len(batch))
                continue
            backoff = self._BACKOFF_FIRST_S
            if self._down_since is not None:
                logger.warning("MLflow server %s is back after %.1f s; buffered metrics delivered",
                               self._uri, time.monotonic() - self._down_since)
                self._down_since = None
            with self._cond:
                self._drop(len(batch))

    def _drop(self, count: int) -> None:
        for _ in range(count):
            self._pending.popleft()
        self._cond.notify_all()

    def _note_outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("MLflow server %s unreachable (%s); buffering %d metrics and retrying",
                           self._uri, exc, self.pending())

    def flush(self, timeout: float) -> None:
        """Wait until every buffered metric is on the server.

        Raises:
            MetricsNotDelivered: metrics are still buffered after `timeout` seconds (they stay
                buffered; a later flush may succeed), or the server rejected some since the last
                flush.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MetricsNotDelivered(
                        f"{len(self._pending)} metrics not yet delivered to {self._uri} after "
                        f"{timeout:.0f} s; is the MLflow server up? They stay buffered.")
                self._cond.wait(left)
            rejected, self._rejected = self._rejected, []
        if rejected:
            raise MetricsNotDelivered("MLflow rejected metrics: " + "; ".join(rejected))

    def _drain_at_exit(self) -> None:
        # Training code should end its runs (which flushes); this covers one that forgot.
        with contextlib.suppress(MetricsNotDelivered):
            self.flush(timeout=10.0)
        if self.pending():
            logger.error("%d metrics for %s were lost at exit: the server was unreachable",
                         self.pending(), self._uri)


# ---------------------------------------------------------------------------------------------
# The facade


class Tracker:
    """The tracking facade: runs, params, metrics, artifacts, models and registry calls.

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
        _configure_http_client()
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._sender = _MetricSender(client=self._client, uri=self.uri)

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
                    self._experiment_id = self._client.create_experiment(self.experiment)
                except MlflowException:
                    # Another process (a parallel trial) may have created it just now.
                    found = self._client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
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
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        if nested_in_this_process:
            parent = self._active()
            if parent_run_id not in (None, parent):
                raise ValueError(f"parent_run_id={parent_run_id} contradicts "
                                 f"nested_in_this_process=True (the active run is {parent})")
            parent_run_id = parent
        elif self._runs:
            raise RuntimeError(f"run {self._runs[-1]} is still active in this tracker; end it "
                               "first, or pass nested_in_this_process=True to start a child run")
        user_tags = {key: _truncate(str(value), MAX_TAG_VALUE_CHARS)
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
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

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
        items = [Param(key, _truncate(str(value), MAX_PARAM_VALUE_CHARS))
                 for key, value in flatten(params).items()]
        for begin in range(0, len(items), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id=run_id,
                                   params=items[begin:begin + PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Set (or overwrite) run tags; values `str()`-ed and cut at MAX_TAG_VALUE_CHARS."""
        if not self.enabled:
            return
        run_id = self._active()
        items = [RunTag(key, _truncate(str(value), MAX_TAG_VALUE_CHARS))
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
            MetricsNotDelivered: still buffered after the timeout, or rejected by the server.
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
        if path.is_dir():
            self._client.log_artifacts(self._active(), str(path), artifact_path)
        else:
            self._client.log_artifact(self._active(), str(path), artifact_path)

    def log_dict(self, data: Mapping[str, object] | list[object], artifact_file: str) -> None:
        """Store `data` as a JSON (or YAML, by the file's suffix) artifact."""
        if not self.enabled:
            return
        self._client.log_dict(self._active(), data, artifact_file)

    # -- models and registry -----------------------------------------------------------------

    def _use_global_uris(self) -> None:
        # Model logging and registration go through MLflow's fluent API, which reads the
        # process-wide URIs.
        assert self.uri is not None
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def log_model(self, model: torch.nn.Module, *, name: str, input_example: np.ndarray,
                  output_example: np.ndarray | None = None,
                  pip_requirements: list[str] | None = None) -> str | None:
        """Log a PyTorch model to the active run, with a signature inferred from the examples.

        Pickle serialization with explicit requirements takes ~1 s; MLflow 3's default (pt2 via
        torch.export, requirements inferred in a subprocess) needs an input example and ~20 s.
        The model's classes must be importable where it is loaded (pickled by reference).

        Args:
            model: the module; it must map one tensor to one tensor for `pyfunc` serving.
            name: the model's name within the run.
            input_example: a batch like the model's input, e.g. (B, 3, H, W) float32.
            output_example: the model's output for it; None runs the model (in eval mode, no
                grad) to get it.
            pip_requirements: the serving environment; default torch and cloudpickle pinned to
                the installed versions. Add the wheel holding the model's code.

        Returns:
            The model URI, `models:/<model_id>` (None when disabled).
        """
        if not self.enabled:
            return None
        import mlflow.pytorch
        from mlflow.models import infer_signature

        run_id = self._active()
        if output_example is None:
            output_example = _predict(model, input_example)
        signature = infer_signature(input_example, output_example)
        if pip_requirements is None:
            pip_requirements = mlflow.pytorch.get_default_pip_requirements()
        self._use_global_uris()
        # A logged model lands in the fluent API's current experiment, not in its run's: point
        # it at this tracker's experiment so the model sits beside its run.
        mlflow.set_experiment(experiment_id=self._experiment())
        # `run_id` reaches `Model.log` through log_model's **kwargs (checked in 3.17): the fluent
        # active run is thread-local and this facade does not use it.
        info = mlflow.pytorch.log_model(model, name=name, signature=signature,
                                        serialization_format="pickle",
                                        pip_requirements=pip_requirements, run_id=run_id)
        return info.model_uri

    def register_model(self, model_uri: str, name: str) -> str | None:
        """Register `model_uri` as a new version of registered model `name` (created if needed).

        Returns:
            The new version number, as a string (None when disabled).
        """
        if not self.enabled:
            return None
        self._use_global_uris()
        return str(mlflow.register_model(model_uri, name).version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `models:/name@alias` at `version` (moves the alias if it exists)."""
        if self.enabled:
            self._client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        if self.enabled:
            self._client.delete_registered_model_alias(name, alias)

    def set_model_version_tag(self, name: str, version: str, key: str, value: object) -> None:
        if self.enabled:
            self._client.set_model_version_tag(name, version, key, str(value))


def _predict(model: torch.nn.Module, example: np.ndarray) -> np.ndarray:
    """Run `model` on `example` in eval mode without grad, on the model's device; as numpy."""
    import torch

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.as_tensor(example, device=device))
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(output).__name__}, not a tensor; "
                        "pass output_example= explicitly (or log a wrapper returning a tensor)")
    return output.detach().cpu().numpy()


def load_pytorch_model(model_uri: str, *, tracking_uri: str | None) -> torch.nn.Module:
    """A logged or registered PyTorch model (`models:/NAME@ALIAS`, `models:/<id>`, `runs:/…`)."""
    import mlflow.pytorch

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except MlflowException as err:
        raise ValueError(f"cannot load model {model_uri} from {tracking_uri}: {err}") from None
