"""Ordered, outage-proof delivery of MLflow metrics: the buffer behind `Tracker.log_metrics`.

Why a buffer: a training must neither stall nor lose points when the tracking server restarts or
is briefly unreachable. `Tracker.log_metrics` only queues; `MetricSender` delivers on a background
thread, retries transient failures (no connection, timeout, 5xx, 429) until the server is back,
and reports the rest (a deleted run, a bad key: a retry will not cure them) as
`MetricsNotDelivered` from the next `flush()`. `Tracker.end_run` flushes before it marks the
run ended.

MLflow 3.17 facts this relies on: the SQL store ignores an exact duplicate metric (same key,
value, step and timestamp), so a batch replayed after a lost response does not duplicate points;
and a batch holds at most METRICS_PER_BATCH metrics.

It is a helper of `tracker.py`, the facade that owns MLflow (docs/conventions.md, lesson 8): only
`tracker.py` builds a sender; other code at most catches `MetricsNotDelivered`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

__all__ = ["METRICS_PER_BATCH", "MetricSender", "MetricsNotDelivered"]

logger = logging.getLogger(__name__)

# Server-side limit of MLflow 3.17 (mlflow/utils/validation.py).
METRICS_PER_BATCH = 1000


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


class MetricSender:
    """Delivers metrics in order from a FIFO buffer on a background thread.

    A batch leaves the buffer only once the server has accepted it; transient failures (no
    connection, timeout, 5xx) are retried with exponential backoff, so a server restart loses
    nothing. Each metric carries the timestamp of its `log_metrics` call, so a late delivery keeps
    its original time (and an exact replay is deduplicated by the server).

    Args:
        client: sends the batches (`log_batch` with explicit run ids).
        uri: the tracking URI, named in log messages and errors.

    The thread starts with the first `put`; at interpreter exit, what is still buffered gets
    10 s to drain.
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
        """Queue `metrics` of run `run_id` behind those already buffered; returns at once."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mlflow-metrics",
                                                daemon=True)
                self._thread.start()
                atexit.register(self._drain_at_exit)
            self._pending.extend((run_id, metric) for metric in metrics)
            self._cond.notify_all()

    def pending(self) -> int:
        """How many metrics are buffered, not yet accepted by the server."""
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

