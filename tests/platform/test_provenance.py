"""The reproducibility helpers: flat parameters, a canonical hash, the checked-out commit."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynroute.platform.tracking.provenance import flatten, git_commit, params_hash


@dataclass(frozen=True)
class _Optim:
    lr: float
    momentum: float


def test_flatten() -> None:
    nested = {"train": {"lr": 0.1, "schedule": {"name": "poly", "power": 0.9}}, "seed": 0,
              "optim": _Optim(lr=0.05, momentum=0.9), "empty": {}, "crop": [768, 768]}
    assert flatten(nested) == {
        "train.lr": 0.1, "train.schedule.name": "poly", "train.schedule.power": 0.9, "seed": 0,
        "optim.lr": 0.05, "optim.momentum": 0.9, "empty": {}, "crop": [768, 768],
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": 1}


def test_params_hash_is_canonical() -> None:
    a = {"train": {"lr": 0.1, "epochs": 3}, "seed": 0}
    b = {"seed": 0, "train": {"epochs": 3, "lr": 0.1}}
    assert params_hash(a) == params_hash(b)
    assert len(params_hash(a)) == 64 and int(params_hash(a), 16) >= 0
    assert params_hash(a) != params_hash({"seed": 0, "train": {"epochs": 3, "lr": 0.2}})
    assert params_hash({"path": Path("x")}) == params_hash({"path": "x"})


def test_git_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never let git look above tmp_path for a repository.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                               *args], cwd=repo, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (repo / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert len(head) == 40
    assert git_commit(repo) == head
    (repo / "untracked.txt").write_text("output")
    assert git_commit(repo) == head  # untracked outputs do not make the tree dirty
    (repo / "a.txt").write_text("two")
    assert git_commit(repo) == f"{head}-dirty"

    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(outside) is None
