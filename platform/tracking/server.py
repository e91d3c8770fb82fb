"""A real `mlflow server` on 127.0.0.1 for tracking: started, health-checked, restarted and
stopped by process group, which a watcher process ends if this process dies without stopping it
(even by SIGKILL). The tracking facade that talks to it is `tracker.py`.

Artifacts are proxied by the server (`--serve-artifacts`) to `artifacts_destination`, a local
folder by default or an `s3://bucket/prefix` (an S3-compatible endpoint through
`MLFLOW_S3_ENDPOINT_URL`). Only the server talks to S3, so clients need no credentials. Before an
S3-backed server starts, its bucket is checked with the server's own environment, so a wrong or
unreachable endpoint fails at once with a message naming it, instead of at the first artifact.
"""

from __future__ import annotations

import contextlib
import json
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
_ARTIFACT_PROXY_SCHEME = "mlflow-artifacts:"

# boto3 settings for an S3-backed server, unless `env` (or the environment) sets them: botocore's
# "standard" defaults mode means a 3.1 s connect timeout and 3 attempts, where its legacy default
# (60 s, 5 attempts) lets a dead endpoint stall every artifact call for minutes. With them an
# upload to a dead endpoint fails in ~6 s (measured, MLflow 3.17 client retrying twice).
_S3_CLIENT_DEFAULTS = {"AWS_DEFAULTS_MODE": "standard", "AWS_MAX_ATTEMPTS": "3"}

# Run with the server's environment in a child process, so it sees exactly what the server's
# boto3 will (endpoint, credentials, profile, TLS settings). Prints one JSON line.
_S3_PROBE = """
import json, os, sys
import boto3
from botocore import exceptions as be
from botocore.config import Config

bucket = sys.argv[1]
tls = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() not in ("1", "true", "yes")
result = {"endpoint": os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "(AWS default)"}
try:
    client = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
                          verify=None if tls else False,
                          config=Config(signature_version="s3v4"))
    result["endpoint"] = client.meta.endpoint_url
    client.head_bucket(Bucket=bucket)
    result["problem"] = None
except be.ClientError as exc:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    result["problem"] = {"404": "no-bucket", "NoSuchBucket": "no-bucket", "403": "denied",
                         "AccessDenied": "denied"}.get(code, "error")
    result["detail"] = str(exc)
except (be.NoCredentialsError, be.PartialCredentialsError) as exc:
    result["problem"], result["detail"] = "credentials", str(exc)
except (be.EndpointConnectionError, be.ConnectTimeoutError, be.ReadTimeoutError) as exc:
    result["problem"], result["detail"] = "unreachable", str(exc)
except Exception as exc:
    result["problem"], result["detail"] = "error", f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""

# The server's watcher: a process of its own that holds the read end of a pipe whose only write
# end is this process's. When this process ends in any way (SIGKILL and the OOM killer included)
# the kernel closes that end, the read returns, and the watcher ends the server's whole process
# group (the `mlflow server` CLI and its uvicorn worker) as stop() does. PR_SET_PDEATHSIG would
# reach the CLI alone, and only on Linux. Argument: the group id and the grace in seconds.
_WATCHER = """
import os, signal, sys, time
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
for sig in (signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
while os.read(0, 4096):
    pass
def alive():
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
if alive():
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        os.killpg(pgid, signal.SIGKILL)
"""

# ---------------------------------------------------------------------------------------------
# The server


class MlflowServerError(RuntimeError):
    """The MLflow server did not start: the message names the cause (an unreachable S3 artifacts
    endpoint, a busy port, ...) or quotes the last lines of the server's log."""


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
    at ~0.5 GB and a few seconds to healthy (docs/platform.md); the log goes to `root/server.log`.

    Args:
        root: folder for the sqlite database, local artifacts and the log (created if missing).
        port: port on 127.0.0.1; None picks a free one at the first start and keeps it across
            restarts, so `uri` stays valid.
        backend_store_uri: any MLflow backend URI; default `sqlite:///<root>/mlflow.db`.
        artifacts_destination: where proxied artifacts go (a path, `file://` or `s3://` URI);
            default `<root>/artifacts`. For S3, pass the endpoint and credentials in `env`
            (`MLFLOW_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...); the
            bucket must exist.
        extra_args: further `mlflow server` options (e.g. `--allowed-hosts`).
        env: extra environment for the server process, over this process's environment.
        start_timeout_s: how long `start()` waits for `GET /health`.
        s3_check_timeout_s: how long the bucket check before an S3-backed start may take.
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
        s3_check_timeout_s: float = 30.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_destination = artifacts_destination or (self.root / "artifacts").as_uri()
        self.log_path = self.root / "server.log"
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.s3_check_timeout_s = s3_check_timeout_s
        self.stop_grace_s = stop_grace_s
        self.start_seconds: float | None = None  # how long the last start() took to be healthy
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # the pipe's write end the watcher waits on

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

    def resolve_artifact_uri(self, uri: str) -> str:
        """Where a proxied artifact URI of this server is stored.

        Args:
            uri: e.g. a run's or logged model's `mlflow-artifacts:/1/models/m-…/artifacts`.

        Returns:
            The same place under `artifacts_destination`, e.g.
            `s3://bucket/mlflow/1/models/m-…/artifacts`; any other URI unchanged.
        """
        if not uri.startswith(_ARTIFACT_PROXY_SCHEME):
            return uri
        path = uri.removeprefix(_ARTIFACT_PROXY_SCHEME).lstrip("/")
        return f"{self.artifacts_destination.rstrip('/')}/{path}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> MlflowServer:
        """Start the server and wait until `/health` answers; a no-op when already running.

        Raises:
            MlflowServerError: the port is taken; an `s3://` artifacts destination is
                unreachable, has no bucket or refuses the credentials (nothing is started then);
                the process exited; or `/health` did not answer within `start_timeout_s`. The
                message names the cause (quoting the server's log) and what to do.
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
            "--serve-artifacts",
            "--artifacts-destination", self.artifacts_destination,
            "--workers", "1",
            *self.extra_args,
        ]
        # The job-execution consumer (huey) costs ~1.8 GB and we run no server-side jobs.
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        on_s3 = self.artifacts_destination.startswith("s3://")
        if on_s3:
            env |= {k: v for k, v in _S3_CLIENT_DEFAULTS.items() if k not in os.environ}
        env |= self.env
        if on_s3:
            self._check_s3(env)
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
            self._watch(self._proc.pid)
            self._wait_healthy(began)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        logger.info("mlflow server healthy at %s after %.1f s (pid %d)", self.uri,
                    self.start_seconds, self._proc.pid)
        return self

    def _watch(self, pgid: int) -> None:
        """Start the watcher (`_WATCHER`) that ends group `pgid` when this process ends."""
        read_end, self._lifeline = os.pipe()  # neither end is inherited across exec
        try:
            # Its own session: a Ctrl-C at the terminal reaches this process, not the watcher.
            self._watcher = subprocess.Popen(
                [sys.executable, "-c", _WATCHER, str(pgid), str(self.stop_grace_s)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
        finally:
            os.close(read_end)

    def _unwatch(self) -> None:
        """End the watcher (our own child, by its pid) and close its pipe; stop() ends the group
        itself, whose id the watcher must not signal once it may be reused."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill()
            watcher.wait()
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is not None:
            os.close(lifeline)

    def _check_s3(self, env: Mapping[str, str]) -> None:
        """Check the bucket of the `s3://` artifacts destination as the server will see it."""
        bucket = self.artifacts_destination.removeprefix("s3://").split("/", 1)[0]
        dest = self.artifacts_destination
        endpoint = env.get("MLFLOW_S3_ENDPOINT_URL") or "(AWS default)"
        began = time.monotonic()
        try:
            done = subprocess.run([sys.executable, "-c", _S3_PROBE, bucket], env=dict(env),
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=self.s3_check_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise MlflowServerError(
                f"S3 endpoint {endpoint} of artifacts destination {dest} did not answer within "
                f"{self.s3_check_timeout_s:.0f} s; check that the S3 server is up and that "
                "MLFLOW_S3_ENDPOINT_URL (MlflowServer(env=...)) points at it. The MLflow server "
                "was not started.") from None
        try:
            found = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise MlflowServerError(
                f"could not check artifacts destination {dest} (exit code {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}") from None
        endpoint, detail = found["endpoint"], found.get("detail", "")
        advice = {
            "unreachable": (
                f"S3 endpoint {endpoint} of artifacts destination {dest} is unreachable "
                f"({detail}). Start the S3 server, or set MLFLOW_S3_ENDPOINT_URL "
                "(MlflowServer(env=...)) to a reachable endpoint."),
            "no-bucket": (
                f"bucket {bucket!r} of artifacts destination {dest} does not exist at S3 "
                f"endpoint {endpoint}; create it first (e.g. `aws s3 mb s3://{bucket} "
                f"--endpoint-url {endpoint}`) or fix artifacts_destination."),
            "denied": (
                f"S3 endpoint {endpoint} refused access to bucket {bucket!r} of artifacts "
                f"destination {dest} ({detail}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in MlflowServer(env=...) or the environment."),
            "credentials": (
                f"no AWS credentials to reach artifacts destination {dest} at {endpoint} "
                f"({detail}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in "
                "MlflowServer(env=...) or the environment."),
            "error": (
                f"S3 endpoint {endpoint} failed the check of artifacts destination {dest}: "
                f"{detail}"),
        }
        if found["problem"] is not None:
            raise MlflowServerError(advice.get(found["problem"], advice["error"])
                                    + " The MLflow server was not started.")
        logger.info("artifacts destination %s reachable at %s (checked in %.1f s)", dest,
                    endpoint, time.monotonic() - began)

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
        self._unwatch()
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

