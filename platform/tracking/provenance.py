"""The reproducibility record of a run: flat parameters, their hash and the code's commit.

Pure helpers (no MLflow): training, the run stage and the pareto stage record these with every
run and front so a model can be traced back to its exact settings and code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = ["flatten", "git_commit", "params_hash"]


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
