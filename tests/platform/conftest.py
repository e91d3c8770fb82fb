"""Fixtures for the data path: tiny shards whose pixels encode their sample, and a real S3 server.

`make_shards` writes a prepared dataset with `ShardWriter`. Sample i (id `s000i`) is a constant
colour image of varying size with R = 10·i, G = 100, B = 200 and a constant label i mod 5, so a
test can tell from any tensor which sample it got and where padding went.

`s3_server` starts `moto_server` (a real S3-protocol server) on 127.0.0.1 once per module, `s3`
also points this process's AWS environment at it, and `own_s3_server` starts one for a single test
that may stop it (`server.stop()`); every request stays on loopback. `S3Server.env()` is the
environment a subprocess (an MLflow server, a Ray driver, DVC) needs to reach it.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynroute.platform.shards import ShardWriter

NUM_CLASSES = 5
CLASS_NAMES = tuple(f"class{k}" for k in range(NUM_CLASSES))
COLOUR_G, COLOUR_B = 100, 200


def sample_id(i: int) -> str:
    return f"s{i:04d}"


def sample_red(i: int) -> int:
    return 10 * i % 256


def sample_size(i: int) -> tuple[int, int]:
    return 6 + i % 3, 8 + i % 4  # (H, W)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def row(i: int) -> dict:
    h, w = sample_size(i)
    image = np.empty((h, w, 3), np.uint8)
    image[...] = (sample_red(i), COLOUR_G, COLOUR_B)  # RGB, as the shards store it
    label = np.full((h, w), i % NUM_CLASSES, np.uint8)
    hist = [0] * (NUM_CLASSES + 1)
    hist[i % NUM_CLASSES] = h * w
    return {"id": sample_id(i), "image": png(image), "image_format": "png", "label": png(label),
            "height": h, "width": w, "histogram": hist}


def write_shards(root: Path, *, splits: dict[str, int], rows_per_shard: int = 5,
                 rows_per_group: int = 2) -> Path:
    writer = ShardWriter(str(root), dataset="toy", class_names=CLASS_NAMES,
                         rows_per_shard=rows_per_shard, rows_per_group=rows_per_group)
    for split, count in splits.items():
        writer.write_split(split, (row(i) for i in range(count)), count)
    writer.finish({})
    return root


@dataclass(frozen=True)
class ToySample:
    """What the tensors of one toy sample must hold; `index` is its place in manifest order."""

    index: int
    red: int
    label: int
    size: tuple[int, int]
    shard: int
    group: int  # row group inside the shard (for rows_per_shard 5, rows_per_group 2)


@pytest.fixture
def toy() -> Callable[[str], ToySample]:
    """Decode a toy sample id into what its image and label contain."""
    def expected(id: str) -> ToySample:
        i = int(id.removeprefix("s"))
        return ToySample(index=i, red=sample_red(i), label=i % NUM_CLASSES, size=sample_size(i),
                         shard=i // 5, group=i % 5 // 2)
    return expected


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_shards(splits={"train": 23, "val": 7}, rows_per_shard=5, rows_per_group=2)."""
    def make(splits: dict[str, int] | None = None, **kwargs) -> Path:
        return write_shards(tmp_path / "data", splits=splits or {"train": 23, "val": 7}, **kwargs)
    return make


# ---------------------------------------------------------------------------------------------
# A real S3-protocol server on loopback

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


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tiny prepared synthetic Cityscapes (16 train, 4 val images of 64x128)."""
    from dynroute.pipelines.prepare import prepare
    from dynroute.pipelines.synth import synthesize

    root = tmp_path_factory.mktemp("prepared-data")
    synthesize("cityscapes", root / "raw", train=16, val=4, height=64, width=128, seed=3)
    prepare("cityscapes", root / "raw", root / "prepared", workers=1)
    return root / "prepared"
