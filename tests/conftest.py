"""Fixtures every test folder may use: a real S3-protocol server (`moto_server`) on 127.0.0.1.

`s3_server` is shared by a module; `own_s3_server` belongs to one test, which may stop it; `s3`
also points this process's AWS environment at the shared one. Every request stays on loopback.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# -- ending the test process ------------------------------------------------------------------
# Ray leaves native threads behind after `ray.shutdown()` (its GCS client's io service, gRPC's
# timers), and at interpreter exit the C++ static destructors can run under them: a CI run whose
# 871 tests had passed and whose summary was printed died there with SIGSEGV (the kernel log:
# "pytest[...]: segfault ... in libstdc++.so.6", in its string hash, on a thread's stack), failing
# `make test`. So a test process that imported Ray ends with os._exit and the session's own exit
# status, once pytest has printed everything and run its cleanups; nothing of a test's outcome
# is hidden, only the interpreter's teardown is skipped. xdist workers end as usual (their
# controller reads their results).
_sessions: list[pytest.Session] = []


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        config.add_cleanup(_end_process)  # cleanups run last-in first-out: this one runs last


def pytest_sessionstart(session: pytest.Session) -> None:
    _sessions.append(session)


def _end_process() -> None:
    if "ray" not in sys.modules or not _sessions:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_sessions[-1].exitstatus))


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask a cloud metadata service for credentials or the region: loopback only.
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    _stop: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """Dummy credentials and this endpoint in the forms boto3/Arrow and MLflow read."""
        return S3_ENV | {"AWS_ENDPOINT_URL_S3": self.endpoint,
                         "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under `prefix` in `bucket`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        """Stop the server (only one from `own_s3_server`; the shared one outlives the test)."""
        if self._stop is None:
            raise RuntimeError("this S3 server is shared by the module; use own_s3_server")
        self._stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Upload every file under `folder` to s3://bucket/prefix/...; returns the URI."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


@contextmanager
def _moto_server(log: Path, *, stoppable: bool = False) -> Iterator[S3Server]:
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | S3_ENV)

    def stop() -> None:
        proc.terminate()  # our own child, by its pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    try:
        deadline = time.monotonic() + 30
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start on 127.0.0.1:{port}: "
                            f"{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield S3Server(endpoint=f"http://127.0.0.1:{port}", _stop=stop if stoppable else None)
    finally:
        if proc.poll() is None:
            stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    with _moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def own_s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A server of this test's own, which the test may `stop()`."""
    with _moto_server(tmp_path_factory.mktemp("moto") / "moto.log", stoppable=True) as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with this process's AWS environment pointing at it."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    return s3_server


# MLflow's set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI and
# MLFLOW_REGISTRY_URI. A test (or a module fixture) that logs in-process would leave them pointing
# at its server, stopped later, and every later `dynroute` subprocess would obey them (the
# environment wins over params.yaml, see platform/config/settings.py). Every test starts and ends
# with the values the session started with.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
              "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
_SESSION_MLFLOW_ENV = {key: os.environ.get(key) for key in MLFLOW_ENV}


def _reset_mlflow_environment() -> None:
    for key, value in _SESSION_MLFLOW_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _isolated_mlflow_environment() -> Iterator[None]:
    _reset_mlflow_environment()
    yield
    _reset_mlflow_environment()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tiny prepared synthetic Cityscapes (16 train, 4 val images of 64x128)."""
    from dynroute.pipelines.prepare import prepare
    from dynroute.pipelines.synth import synthesize

    root = tmp_path_factory.mktemp("prepared-data")
    synthesize("cityscapes", root / "raw", train=16, val=4, height=64, width=128, seed=3)
    prepare("cityscapes", root / "raw", root / "prepared", workers=1)
    return root / "prepared"
