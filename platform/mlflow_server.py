"""A real `mlflow server` on 127.0.0.1 for tracking: started, health-checked, restarted and
stopped by process group. The tracking facade that talks to it is `tracking.py`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)
_LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------------------------------------
# The server


class MlflowServerError(RuntimeError):
    """The MLflow server did not start (the message holds the last lines of its log)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_LOOPBACK, 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as uvicorn sets it: connections of a stopped server in TIME_WAIT do not count,
    # a live listener does.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_LOOPBACK, port))
        except OSError:
            return False
    return True


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, read from /proc."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 tells whether any member exists
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the command name, which may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, in a process group of its own.

    Usable as a context manager (`with MlflowServer(root=tmp) as server: server.uri`) or through
    `start()` / `stop()` / `restart()`. One uvicorn worker and no job-execution consumer keep it
    at ~0.5 GB and a few seconds to healthy (platform.md); the log goes to `root/server.log`.

    Args:
        root: folder for the sqlite database, local artifacts and the log (created if missing).
        port: port on 127.0.0.1; None picks a free one at the first start and keeps it across
            restarts, so `uri` stays valid.
        backend_store_uri: any MLflow backend URI; default `sqlite:///<root>/mlflow.db`.
        artifacts_destination: where proxied artifacts go (a path, `file://` or `s3://` URI);
            default `<root>/artifacts`. For S3, pass the endpoint and credentials in `env`.
        extra_args: further `mlflow server` options (e.g. `--allowed-hosts`).
        env: extra environment for the server process (e.g. `MLFLOW_S3_ENDPOINT_URL`).
        start_timeout_s: how long `start()` waits for `GET /health`.
        stop_grace_s: how long `stop()` waits after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        port: int | None = None,
        backend_store_uri: str | None = None,
        artifacts_destination: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_destination = artifacts_destination or (self.root / "artifacts").as_uri()
        self.log_path = self.root / "server.log"
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.start_seconds: float | None = None  # how long the last start() took to be healthy
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise MlflowServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def uri(self) -> str:
        """Tracking URI for clients: `http://127.0.0.1:PORT`."""
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the `mlflow server` process, which is also its process group id."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pids(self) -> list[int]:
        """Live processes of the server's group (the CLI and its uvicorn worker)."""
        return _group_pids(self._proc.pid) if self._proc is not None else []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> MlflowServer:
        """Start the server and wait until `/health` answers; a no-op when already running.

        Raises:
            MlflowServerError: the port is taken, the process exited, or `/health` did not
                answer within `start_timeout_s`; the message quotes the server's log.
        """
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = _free_port()
        elif not _port_free(self._port):
            raise MlflowServerError(
                f"port {self._port} on {_LOOPBACK} is in use by another process; stop it or "
                "construct MlflowServer(port=None) to pick a free port")
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", _LOOPBACK,
            "--port", str(self._port),
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_destination,
            "--workers", "1",
            *self.extra_args,
        ]
        # The job-execution consumer (huey) costs ~1.8 GB and we run no server-side jobs.
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | self.env
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            # A new session makes the server the leader of its own process group, so stop() can
            # signal it and the uvicorn worker it forks in one call.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                          start_new_session=True)
        try:
            self._wait_healthy(began)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        logger.info("mlflow server healthy at %s after %.1f s (pid %d)", self.uri,
                    self.start_seconds, self._proc.pid)
        return self

    def _wait_healthy(self, began: float) -> None:
        assert self._proc is not None
        # No proxy for a loopback health check, whatever the environment says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                with opener.open(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            code = self._proc.poll()
            if code is not None:
                raise MlflowServerError(
                    f"mlflow server exited with code {code} before answering {self.uri}/health; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() - began > self.start_timeout_s:
                raise MlflowServerError(
                    f"mlflow server did not answer {self.uri}/health within "
                    f"{self.start_timeout_s:.0f} s; last lines of {self.log_path}:\n"
                    f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the whole process group: SIGTERM, then SIGKILL after `stop_grace_s`.

        Returns once no process of the group is alive (so the port is free for a restart).
        Idempotent.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # the leader of a new session: its pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.stop_grace_s)
        while _group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None or _group_pids(pgid):
            logger.warning("mlflow server group %d ignored SIGTERM for %.0f s; sending SIGKILL",
                           pgid, self.stop_grace_s)
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 5.0
            while _group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def restart(self) -> MlflowServer:
        """Stop and start again on the same port, with the same store (so `uri` stays valid)."""
        self.stop()
        return self.start()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The metric buffer
