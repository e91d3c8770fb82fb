"""Fixtures for the data path: tiny shards whose pixels encode their sample, and a real S3 server.

`make_shards` writes a prepared dataset with `ShardWriter`. Sample i (id `s000i`) is a constant
colour image of varying size with R = 10·i, G = 100, B = 200 and a constant label i mod 5, so a
test can tell from any tensor which sample it got and where padding went.

`small_disk` is a folder that a command can fill up (a real tmpfs where this process may mount
one, else a per-process file size limit).

`s3_server` starts `moto_server` (a real S3-protocol server) on 127.0.0.1 once per module, `s3`
also points this process's AWS environment at it, and `own_s3_server` starts one for a single test
that may stop it (`server.stop()`); every request stays on loopback. `S3Server.env()` is the
environment a subprocess (an MLflow server, a Ray driver, DVC) needs to reach it.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynroute.platform.data.shards import ShardWriter

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


PAGE = 4096
ROOMY = 64 << 20  # a small disk's size while a command runs with room to spare


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount(8) here
        return False


def _limit_file_size(size: int) -> None:
    """In the child before exec: files cannot grow past `size` bytes (EFBIG, not SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@dataclass(frozen=True)
class SmallDisk:
    """A folder that fills up. Where this process may mount one (root in a sandbox) it is a
    tmpfs of its own: a real full filesystem, ENOSPC. Elsewhere it is an ordinary folder, and a
    command run with `room` gets RLIMIT_FSIZE: no file it writes may pass `room` bytes (EFBIG).
    `mounted` says which."""

    folder: Path
    mounted: bool

    def run(self, args: list, *, room: int | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run `args` with `room` more bytes left on the disk (None: plenty)."""
        preexec = None
        if self.mounted:
            disk = os.statvfs(self.folder)
            used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
            size = ROOMY if room is None else used + -(-room // PAGE) * PAGE
            assert _mount("-o", f"remount,size={size}", str(self.folder)), self.folder
        elif room is not None:
            def preexec() -> None:
                _limit_file_size(room)
        return subprocess.run([str(a) for a in args], preexec_fn=preexec, **kwargs)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A `SmallDisk` of this test's own, unmounted after it."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", f"size={ROOMY},mode=0755", "tmpfs", str(folder))
    try:
        yield SmallDisk(folder, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster of 2 CPUs for the module's tests (started as `dynroute` starts it:
    on loopback), shut down after them."""
    import ray  # lazy: most tests here never start Ray

    from dynroute.platform.train.ray_train import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
