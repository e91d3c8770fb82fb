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

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from dynroute.models import build_network
from dynroute.platform.files import replaced_whole
from dynroute.platform.train import ray_train
from dynroute.platform.train.ray_train import CHECKPOINT_PREFIX, read_state
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.url_secrets import mask_url

log = logging.getLogger("dynroute.checkpoints")
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


class ResumeMismatch(ValueError):
    """A run's checkpoints come from another training than the one asked for."""


class RunBusy(RuntimeError):
    """Another process is training the same run."""


def write(folder: Path, *, state: dict, spec: TrainSpec, data_hash: str | None = None) -> None:
    """Fill a checkpoint folder: `state` (see the module's docstring) and the spec, whose URLs
    keep no password (a checkpoint is copied and uploaded, `dvc push` included), with the
    content hash of the data it trained on.

    Each file is written under a temporary name, flushed to disk and renamed into place, so a
    full disk leaves no partial file behind.

    Raises:
        ray_train.CheckpointWriteError: the storage refuses the files (full, over quota,
            read-only, not writable); the message names the folder and what to do.
    """
    saved = spec.to_dict() | {"data_hash": data_hash}
    saved["data"], saved["storage"] = mask_url(spec.data), mask_url(spec.storage)
    if spec.tracking.uri is not None:
        saved["tracking"]["uri"] = mask_url(spec.tracking.uri)
    # The folder's parent is the place a user knows: the run's folder, or the scratch space a
    # Ray worker fills before Ray uploads the checkpoint.
    with ray_train.writing_checkpoint(folder.parent):
        with replaced_whole(folder / STATE_FILE) as tmp, open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        with replaced_whole(folder / SPEC_FILE) as tmp:
            tmp.write_text(json.dumps(saved, indent=2))


def _spec_from(text: str) -> tuple[TrainSpec, str | None]:
    """(spec, data hash) from a checkpoint's spec.json (older ones have no data hash)."""
    data = json.loads(text)
    data_hash = data.pop("data_hash", None)
    return TrainSpec.from_dict(data), data_hash


def check_resume(spec: TrainSpec, *, data_hash: str) -> None:
    """Refuse to continue a run whose newest checkpoint trained another network, with another
    recipe or on other data: resuming would mix two trainings in one run and one MLflow run.

    `train.iterations` may change (a longer training continues the same one); so may how the
    run is executed (workers, checkpoint and log intervals). A run without checkpoints, or a
    search's shared start copied in (no spec), starts as asked.
    """
    text = ray_train.read_newest_text(run_dir(spec), SPEC_FILE)
    if text is None:
        return
    saved, saved_hash = _spec_from(text)
    differ = [f"{section}.{key}: {old!r} then, {new!r} now"
              for section in ("model", "train")
              for key, new in asdict(getattr(spec, section)).items()
              if (section, key) != ("train", "iterations")
              and (old := getattr(getattr(saved, section), key)) != new]
    if saved_hash is not None and saved_hash != data_hash:
        differ.append(f"data: content hash {saved_hash[:12]} then, {data_hash[:12]} now "
                      f"({mask_url(spec.data)})")
    if differ:
        raise ResumeMismatch(
            f"run {spec.name!r} in {mask_url(run_dir(spec))} has checkpoints of another "
            f"training ({'; '.join(differ)}), and resuming would mix the two. Give this "
            f"training another run.name (--name), or remove that folder to start it afresh")


@contextlib.contextmanager
def one_writer(spec: TrainSpec) -> Iterator[None]:
    """Hold the run for this process while it trains; another process that asks for the same
    run meanwhile is refused (RunBusy). Local storage only: on s3:// nothing is held."""
    if "://" in spec.storage:
        yield
        return
    folder = Path(run_dir(spec)).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{spec.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunBusy(f"run {spec.name!r} in {folder} is being trained by {holder}; wait "
                          f"for it to end, or give this training another run.name "
                          f"(--name)") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find(path: Path) -> list[Path]:
    """The checkpoint folders at `path`, newest first: `path` itself, or the `checkpoint_*`
    folders inside a run folder."""
    if (path / STATE_FILE).is_file():
        return [path]
    found = sorted((p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()),
                   reverse=True)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}: expected {STATE_FILE} there or in a "
                                f"{CHECKPOINT_PREFIX}* folder; run `dynroute train` first")
    return found


def load(path: Path):
    """(network in eval mode, its TrainSpec) from a checkpoint folder, or from the newest
    checkpoint of a run folder that loads (a damaged newest one, as a writer that died leaves
    it, falls back to the one before, as a resumed training does).

    Raises:
        UnsafeCheckpointError: a checkpoint that would run code (never skipped).
        ValueError: no checkpoint loads; the message names each and why.
    """
    failures = []
    for folder in find(path):
        try:
            spec, _ = _spec_from((folder / SPEC_FILE).read_text())
            network = build_network(spec.network)
            state = read_state(folder / STATE_FILE)
            network.load_state_dict(state["model"])
        except ray_train.UnsafeCheckpointError:
            raise
        except Exception as err:  # cut short or damaged: the one before
            failures.append(f"{folder.name}: {type(err).__name__}: {err}".splitlines()[0])
            continue
        if failures:
            log.warning("skipped damaged checkpoints in %s (%s); using %s", path,
                        "; ".join(failures), folder.name)
        network.training_run_id = state.get("mlflow_run_id")
        return network.eval(), spec
    raise ValueError(f"no checkpoint in {path} loads: {'; '.join(failures)}")


def load_model(source: str, *, tracking_uri: str | None):
    """(network, its name) from a checkpoint folder or an MLflow model URI (`models:/…`,
    `runs:/…`); either is read as data, and a registered model's weights must match the SHA-256
    the registry recorded (`tracking/model_logging.py`)."""
    if source.startswith(("models:/", "runs:/")):
        # Lazy: model_logging imports mlflow, which a checkpoint folder does not need.
        from dynroute.platform.tracking.model_logging import load_network

        if tracking_uri is None:
            raise ValueError(f"{source} is an MLflow model: set tracking.uri to its server")
        network, record = load_network(source, tracking_uri=tracking_uri)
        network.training_run_id = record.run_id
        return network, source
    network, spec = load(Path(source))
    return network, spec.name
