"""The only module that talks to Ray Train (V2 API, Ray 2.60); everything else calls these.

Driver side: `fit` runs a per-worker function with `TorchTrainer` (gloo on CPU, NCCL on GPU),
persistent checkpoints in a storage path (local or `s3://`) and `FailureConfig` restarts: after a
worker dies, the function runs again and `latest_state` hands it the last checkpoint's state.
`num_workers=0` runs the function in this process (Ray's local mode, no cluster needed); there Ray
does not persist checkpoints, so this module writes them under the storage path itself.

Worker side: `worker()` (rank, world size, device), `prepare_model`, `report`,
`latest_state`, `all_reduce_mean`.

Ray is imported inside the functions that use it, not at the top: the checkpoint readers
(checkpoints.py, and through it evaluation and prediction) import this module without needing Ray,
which takes ~2 s to import.

Networking: a local cluster started here listens on 127.0.0.1 only, whatever the environment
(`loopback.py`; docs/platform.md, "Networking on these machines"); RAY_ADDRESS connects to an
existing cluster, whose addresses are its own.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from dynroute.platform.data.shards import filesystem_for, join
from dynroute.platform.train import loopback
from dynroute.platform.url_secrets import mask_url

CHECKPOINT_PREFIX = "checkpoint_"
_LOCAL_RUN_DIR = "DYNROUTE_LOCAL_RUN_DIR"  # where local mode keeps its checkpoints

_ELSEWHERE = "or point run.storage (--storage) at another disk"
# A storage that refuses a checkpoint (errno → what to do); anything else is not the storage's.
_STORAGE_REMEDIES = {
    errno.ENOSPC: f"the disk is full: free space there (older runs' folders, say) {_ELSEWHERE}",
    errno.EDQUOT: f"your disk quota is used up: free space in it {_ELSEWHERE}",
    errno.EFBIG: f"a file would pass this process's file size limit: raise it (ulimit -f) "
                 f"{_ELSEWHERE}",
    errno.EROFS: f"the filesystem is read-only: remount it writable {_ELSEWHERE}",
    errno.EACCES: f"this user may not write there: fix its permissions {_ELSEWHERE}",
    errno.EPERM: f"this user may not write there: fix its permissions {_ELSEWHERE}",
}


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class FitResult:
    metrics: dict
    checkpoint: str | None  # path or URI of the last checkpoint
    path: str | None  # the run's folder in storage


def init_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS or start a local single-node Ray on 127.0.0.1 (with `num_cpus`
    and `num_gpus` when given, else what Ray detects)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    loopback.loopback_only()
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True)


def fit(train_fn: Callable[[dict], None], *, config: dict, name: str, storage: str,
        num_workers: int, use_gpu: bool = False, cpus_per_worker: float = 1.0,
        max_failures: int = 2, keep_checkpoints: int = 2) -> FitResult:
    """Run `train_fn(config)` on `num_workers` Ray Train workers (0: in this process)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers == 0:
        return _fit_local(train_fn, config=config, name=name, storage=storage)
    init_ray()
    storage_path = storage if "://" in storage else os.path.abspath(storage)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=loopback.torch_config(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return FitResult(metrics=dict(result.metrics or {}), checkpoint=checkpoint, path=result.path)


def _fit_local(train_fn: Callable[[dict], None], *, config: dict, name: str,
               storage: str) -> FitResult:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if "://" in storage:
        raise ValueError(f"train.workers = 0 runs in this process and keeps checkpoints on the "
                         f"local disk; {storage} is remote: use workers >= 1 for it")
    run_dir = Path(storage).absolute() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(_LOCAL_RUN_DIR)
    os.environ[_LOCAL_RUN_DIR] = str(run_dir)
    try:
        trainer = TorchTrainer(train_fn, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(name=name))
        result = trainer.fit()
    finally:
        if previous is None:
            os.environ.pop(_LOCAL_RUN_DIR, None)
        else:
            os.environ[_LOCAL_RUN_DIR] = previous
    last = _local_checkpoints(run_dir)
    return FitResult(metrics=dict(result.metrics or {}),
                     checkpoint=str(last[-1]) if last else None, path=str(run_dir))


def _local_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()
             and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found)


# -- worker side ------------------------------------------------------------------------------
def worker() -> Worker:
    import ray.train

    ctx = ray.train.get_context()
    rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    if torch.cuda.is_available() and world > 0 and _uses_gpu():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Worker(rank=rank, world_size=world, local_rank=local, device=device)


def _uses_gpu() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def prepare_model(model: torch.nn.Module, *, device: torch.device) -> torch.nn.Module:
    """Move to `device`; with several workers convert BN to SyncBatchNorm (GPU only: torch has
    no CPU kernel for it) and wrap in DDP."""
    model = model.to(device)
    if not is_distributed():
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Training runs every path (Eq. 4), so every parameter gets a gradient each step.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over workers (identity when alone), so every worker reports the same numbers.

    The values travel on the device the process group's backend serves (NCCL: this worker's GPU
    only; gloo: the host) and come back on the device they came from.
    """
    if not is_distributed():
        return values
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    reduced = values.to(device, copy=True)
    dist.all_reduce(reduced)
    return (reduced / dist.get_world_size()).to(values.device)


def latest_state(run_dir: str, *, name: str, in_worker: bool = True) -> object | None:
    """What the newest complete checkpoint of the run saved as `name` (loaded with torch), or
    None for a fresh start. Nothing is left behind: a remote checkpoint's download is removed.

    In a worker, Ray hands back the newest checkpoint its controller registered; a worker that
    died right after persisting a newer one leaves that one on storage unregistered. Both are
    considered, so a restart goes back at most one checkpoint interval. On the driver
    (`in_worker=False`) only the checkpoints on storage count. A checkpoint counts as complete
    when its `name` file loads.

    Raises:
        UnsafeCheckpointError: a checkpoint that would run code (never skipped).
        DamagedRunError: on the driver, the run has checkpoints and none of them loads; starting
            over from step 0 would silently replace them. (In a worker the driver has checked
            the run already, so none loading means the first checkpoint of this training was
            cut short by a worker that died: it starts over, as it would have without one.)
    """
    import ray.train

    candidates = _persisted(run_dir)
    if in_worker and not os.environ.get(_LOCAL_RUN_DIR):
        registered = ray.train.get_checkpoint()
        if registered is not None:
            candidates.append((_step_of(registered.path), registered))
    failures = []
    for _, checkpoint in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            with checkpoint.as_directory() as folder:  # may be a temporary download
                return read_state(Path(folder) / name)
        except UnsafeCheckpointError:
            raise  # not something a dying writer leaves: refuse it rather than skip it
        except Exception as err:  # incomplete (the writer died): try the one before
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            reason = reason if len(reason) <= 160 else f"{reason[:157]}..."  # torch's run long
            failures.append(f"{os.path.basename(checkpoint.path.rstrip('/'))}: {reason}")
    if failures and not in_worker:
        raise DamagedRunError(
            f"the run folder {mask_url(run_dir)} has checkpoints but none of them loads "
            f"({'; '.join(failures)}); training would start over from step 0 and replace them. "
            f"Remove that folder to start the run afresh, or give this training another "
            f"run.name (--name)")
    if failures:
        print(f"no checkpoint of {mask_url(run_dir)} loads ({'; '.join(failures)}): starting "
              f"from step 0", flush=True)
    return None


def newest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint folder on the run's storage (local path or URI), or None."""
    found = sorted(name for _, name in _persisted_names(run_dir))
    return f"{run_dir.rstrip('/')}/{found[-1]}" if found else None


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than data: loading it would run code."""


class DamagedRunError(ValueError):
    """A run has checkpoints and none of them loads."""


class CheckpointWriteError(ValueError):
    """The storage refuses a checkpoint: full, over quota, read-only or not writable."""


def _storage_error(err: BaseException | None) -> OSError | None:
    """The OSError of a storage that refuses a write behind `err` (torch.save wraps it in a
    RuntimeError whose message is only a position in its zip writer), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _STORAGE_REMEDIES:
            return err
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def writing_checkpoint(folder: str | os.PathLike) -> Iterator[None]:
    """Around the writing of checkpoint files in `folder`: a storage that refuses them raises
    CheckpointWriteError naming the folder and what to do; other errors pass unchanged."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as err:
        cause = _storage_error(err)
        if cause is None:
            raise
        raise CheckpointWriteError(
            f"cannot write a checkpoint in {folder}: {os.strerror(cause.errno)}; "
            f"{_STORAGE_REMEDIES[cause.errno]}. No partial checkpoint is left: run `dynroute "
            f"train` again once it can write, and it resumes from the last whole "
            f"checkpoint") from err


def read_state(path: Path) -> object:
    """A checkpoint file read as data only: tensors, numbers, strings, lists and dicts.

    torch's `weights_only` loader refuses anything else, such as a pickle that would call a
    function while it loads, instead of running it; that refusal is UnsafeCheckpointError.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "not plain data"
        raise UnsafeCheckpointError(
            f"{path} holds more than tensors and plain data ({reason}); it was not loaded, "
            f"since loading it could run code. Use checkpoints that dynroute wrote, from a "
            f"source you trust") from None


def load_state(checkpoint: str, *, name: str) -> object:
    """The file `name` of a checkpoint folder given as a local path or URI (`read_state`)."""
    from ray.train import Checkpoint

    if "://" not in checkpoint:
        return read_state(Path(checkpoint) / name)
    with Checkpoint(checkpoint).as_directory() as folder:  # a temporary download
        return read_state(Path(folder) / name)


def place_checkpoint(folder: Path, *, run_dir: str, step: int) -> str:
    """Copy a local checkpoint folder into a run's storage (local path or URI) as the
    checkpoint of `step`, where `latest_state` finds it; a local copy appears whole or not at
    all. Returns where it went."""
    fs, base = filesystem_for(run_dir)
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    if isinstance(fs, pafs.LocalFileSystem):
        final = Path(base) / name
        tmp = final.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing_checkpoint(base):
                # File by file, not copytree: copytree reports a full disk without its errno.
                for source in sorted(folder.rglob("*")):
                    target = tmp / source.relative_to(folder)
                    if source.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(source, target)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only there when the copy failed
        return str(final)
    target = join(base, name)
    pafs.copy_files(str(folder), target, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return f"{run_dir.rstrip('/')}/{name}"


def _step_of(path: str) -> int:
    match = re.search(rf"{CHECKPOINT_PREFIX}(\d+)$", path.rstrip("/"))
    return int(match.group(1)) if match else -1


def read_newest_text(run_dir: str, name: str) -> str | None:
    """The text of the file `name` in the newest checkpoint folder of the run that has it
    readable (local path or URI), or None."""
    fs, _ = filesystem_for(run_dir)
    for path, _ in sorted(_persisted_names(run_dir), key=lambda p: _step_of(p[1]), reverse=True):
        try:
            with fs.open_input_stream(join(path, name)) as stream:
                return stream.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):  # not written yet, or cut short: the one before
            continue
    return None


def _persisted_names(run_dir: str) -> list[tuple[str, str]]:
    """(path inside the filesystem, folder name) of the checkpoint folders under the run's
    storage folder (local path or URI)."""
    fs, base = filesystem_for(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    return [(info.path, info.base_name) for info in infos
            if info.type == pafs.FileType.Directory
            and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", info.base_name)]


def _persisted(run_dir: str) -> list[tuple[int, object]]:
    """(step, Checkpoint) of the checkpoint folders under the run's storage folder."""
    from ray.train import Checkpoint

    fs, _ = filesystem_for(run_dir)
    return [(_step_of(name), Checkpoint(path, filesystem=fs))
            for path, name in _persisted_names(run_dir)]


@contextmanager
def checkpoint_dir(step: int) -> Iterator[Path]:
    """A folder to write the checkpoint of `step` into, to hand to `report` inside the block."""
    local_dir = os.environ.get(_LOCAL_RUN_DIR)
    if local_dir:
        final = Path(local_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing_checkpoint(local_dir):
                tmp.mkdir(parents=True)
            yield tmp
            with writing_checkpoint(local_dir):
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)  # complete or absent, never half-written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only there when the checkpoint failed
        for old in _local_checkpoints(Path(local_dir))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="dynroute-ckpt-") as folder:
        yield Path(folder)


def report(metrics: dict, *, checkpoint: Path | None = None, step: int) -> None:
    """Report metrics (every worker, same number of times) and optionally a checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    if os.environ.get(_LOCAL_RUN_DIR):
        final = Path(os.environ[_LOCAL_RUN_DIR]) / f"{CHECKPOINT_PREFIX}{step:08d}"
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(final))
                         if checkpoint is not None else None)
        return
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint))
                     if checkpoint is not None else None,
                     checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}")
