"""Writing result files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
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
