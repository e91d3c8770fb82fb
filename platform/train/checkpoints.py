"""The checkpoint layout, in one place: where a run's checkpoints live, what a checkpoint folder
holds, and how every stage finds, writes and loads one.

A run's folder is `<run.storage>/<run.name>`; Ray Train (or, in-process, ray_train.py) puts each
checkpoint in `checkpoint_<step:08d>` inside it. A checkpoint folder holds:
- `state.pt`: the model's and optimizer's state, the step, the MLflow run id, the run's history
  (restarts, the search's shared start, the loader processes); tensors and plain data only, and
  read back as such (`ray_train.read_state`: a file that would run code is refused);
- `spec.json`: the TrainSpec that trained it (`TrainSpec.to_dict`), so the network can be rebuilt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dynroute.models import build_network
from dynroute.platform.train.ray_train import CHECKPOINT_PREFIX, read_state
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.url_secrets import mask_url

STATE_FILE = "state.pt"
SPEC_FILE = "spec.json"


def run_dir(spec: TrainSpec) -> str:
    """The run's folder in storage, where its checkpoints are persisted."""
    base = spec.storage if "://" in spec.storage else os.path.abspath(spec.storage)
    return f"{base.rstrip('/')}/{spec.name}"


def completed_checkpoint(spec: TrainSpec) -> Path | None:
    """The final checkpoint of a local run that already trained to the end, else None."""
    if "://" in spec.storage:
        return None
    folder = (Path(spec.storage) / spec.name /
              f"{CHECKPOINT_PREFIX}{spec.train.iterations:08d}")
    return folder if (folder / STATE_FILE).is_file() else None


def write(folder: Path, *, state: dict, spec: TrainSpec) -> None:
    """Fill a checkpoint folder: `state` (see the module's docstring) and the spec, whose URLs
    keep no password (a checkpoint is copied and uploaded, `dvc push` included)."""
    torch.save(state, folder / STATE_FILE)
    saved = spec.to_dict()
    saved["data"], saved["storage"] = mask_url(spec.data), mask_url(spec.storage)
    if spec.tracking.uri is not None:
        saved["tracking"]["uri"] = mask_url(spec.tracking.uri)
    (folder / SPEC_FILE).write_text(json.dumps(saved, indent=2))


def find(path: Path) -> Path:
    """A checkpoint folder: `path` itself, or the newest `checkpoint_*` inside a run folder."""
    if (path / STATE_FILE).is_file():
        return path
    found = sorted(p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}: expected {STATE_FILE} there or in a "
                                f"{CHECKPOINT_PREFIX}* folder; run `dynroute train` first")
    return found[-1]


def load(path: Path):
    """(network in eval mode, its TrainSpec) from a checkpoint folder or a run folder."""
    folder = find(path)
    spec = TrainSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    network = build_network(spec.network)
    state = read_state(folder / STATE_FILE)
    network.load_state_dict(state["model"])
    network.training_run_id = state.get("mlflow_run_id")
    return network.eval(), spec


def load_model(source: str, *, tracking_uri: str | None):
    """(network, its name) from a checkpoint folder or an MLflow model URI (`models:/…`)."""
    if source.startswith(("models:/", "runs:/")):
        # Lazy: model_logging imports mlflow, which a checkpoint folder does not need.
        from dynroute.platform.tracking.model_logging import load_pytorch_model

        if tracking_uri is None:
            raise ValueError(f"{source} is an MLflow model: set tracking.uri to its server")
        network = load_pytorch_model(source, tracking_uri=tracking_uri)
        network.training_run_id = None
        return network.eval(), source
    network, spec = load(Path(source))
    return network, spec.name
