"""Writing result files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, data: object) -> Path:
    """Write `data` as indented JSON (no NaN: JSON has none) to a temporary name beside `path`,
    then rename it into place; on any failure the previous file, if any, is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def replaced_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` (same folder, so same filesystem) for the block to write
    to; renamed over `path` when the block ends, removed when it fails. A reader sees the old
    file or the whole new one, never a part, and a failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
