"""What a training is told, declared once: `RunSettings` (params.yaml's `run:` section) and the
`TrainSpec` that carries it, the network and the recipe to every Ray worker and into every
checkpoint.

Typed all the way: `TrainSpec.model` is a NetworkConfig and `TrainSpec.train` a TrainConfig,
validated when they are built. Plain data exists only where the spec crosses a process boundary
(Ray's task arguments, a checkpoint's `spec.json`): `to_dict` and `from_dict` are that one pair.

This module imports the recipe and models/ only, so the search can read a spec without importing
the training loop, its DataLoader or Ray Train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from dynroute.models import NetworkConfig
from dynroute.platform.train.recipe import TrainConfig, network_for_budget


@dataclass(frozen=True)
class RunSettings:
    """How a training runs: where, on how many Ray workers, how often it checkpoints.

    The defaults are params.yaml's (a test holds them equal).
    """

    name: str = "train"
    storage: str = "artifacts/runs"  # local path or s3://bucket/prefix (Ray storage)
    workers: int = 0  # Ray Train workers; 0 runs the loop in this process
    use_gpu: bool = False
    loader_workers: int | None = None  # None: the resumed checkpoint's, else fast_path's
    checkpoint_every: int = 100
    log_every: int = 20
    max_failures: int = 2
    fast: bool = True  # the device's measured fast path (device/fast_path.py); False: plain fp32
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\"):
            raise ValueError(f"run.name = {self.name!r}: give a folder name (no '/', not '.' "
                             f"or '..'): the run's checkpoints go to run.storage/run.name")
        if self.workers < 0 or self.max_failures < 0:
            raise ValueError("run.workers and run.max_failures must be >= 0")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("run.checkpoint_every and run.log_every must be at least 1 (steps)")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"run.loader_workers = {self.loader_workers}: give >= 0, or leave "
                             f"it unset")


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None  # None: no tracking
    experiment: str = "dynroute"
    run_name: str = "train"
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)
    run_id: str | None = None  # the run the workers log into; set by `train`


@dataclass(frozen=True, kw_only=True)
class TrainSpec(RunSettings):
    """Everything a worker needs: the run settings it inherits, plus the data, the network and
    the recipe."""

    data: str  # prepared dataset root (path or s3://)
    model: NetworkConfig  # as configured; `network` applies the budget's gate choice
    train: TrainConfig
    stop_at: int | None = None  # pause after this step (a checkpoint there); a later call resumes
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.route is not None:
            raise ValueError(f"model.route = {self.model.route.name!r}: a training spec trains "
                             f"the whole routing space; a static route has no spec")

    @classmethod
    def for_run(cls, run: RunSettings, **given) -> TrainSpec:
        """A spec with `run`'s settings and the `given` fields."""
        return cls(**{f.name: getattr(run, f.name) for f in fields(RunSettings)}, **given)

    @property
    def network(self) -> NetworkConfig:
        """The network this training builds: the named budget may switch to the small gate or,
        for Network-Fix, to fixed gates."""
        return network_for_budget(self.model, self.train.budget)

    def to_dict(self) -> dict:
        """Plain JSON-able data (for Ray and `spec.json`); `from_dict` reads it back."""
        data = asdict(self)
        del data["model"]["route"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainSpec:
        data = dict(data)
        data["model"] = NetworkConfig.from_dict(data["model"], source="spec model")
        data["train"] = TrainConfig(**data["train"])
        data["tracking"] = TrackingSpec(**data.get("tracking", {}))
        return cls(**data)
