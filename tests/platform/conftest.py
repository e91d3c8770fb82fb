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

import io
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tiny prepared synthetic Cityscapes (16 train, 4 val images of 64x128)."""
    from dynroute.pipelines.prepare import prepare
    from dynroute.pipelines.synth import synthesize

    root = tmp_path_factory.mktemp("prepared-data")
    synthesize("cityscapes", root / "raw", train=16, val=4, height=64, width=128, seed=3)
    prepare("cityscapes", root / "raw", root / "prepared", workers=1)
    return root / "prepared"
