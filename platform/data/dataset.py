"""A streaming torch dataset over the prepared Parquet shards (docs/model.md §1, §9; shards.py).

`ShardDataset` reads `manifest.json` and the shards of one split from a local folder or an
`s3://bucket/prefix`, one row group at a time, and yields
`{"image": (3, H, W) float32 BGR − mean, "label": (H, W) int64, "id": str}`.

How the samples of an epoch are shared out:

- Training: a permutation of all N samples seeded by (seed, epoch) is cut into `world_size` equal
  contiguous chunks of N // world_size; the last N mod world_size samples of the permutation are
  dropped, so every rank yields the same count (Ray Train / DDP need equal steps per worker; a
  different tail is dropped each epoch). Each rank's chunk is cut again among its DataLoader
  workers. No sample is yielded twice in an epoch across ranks × workers.
- Evaluation: all N samples, each exactly once, in contiguous chunks of the manifest order (ranks
  may differ by one sample), manifest order within a worker, full images, no augmentation.

Reading: a worker groups its samples by row group and reads each needed row group once (only the
image and label columns), visiting groups in order of first appearance in the permutation (so the
visiting order is seeded too), and decodes only the rows it owns. Memory per worker is one row
group of encoded bytes plus the sample being augmented. With a global shuffle a worker usually owns
few rows of a group, so a row group is fetched by up to min(rows per group, ranks × workers)
workers per epoch: small row groups keep that read amplification low.

Determinism: a sample's augmentation is drawn from a generator seeded by (seed, epoch, global
sample index), so it does not depend on the number of ranks or workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from dynroute.platform.data.augment import SCALES, eval_sample, train_sample
from dynroute.platform.data.shards import (
    SCHEMA,
    ManifestError,
    ShardInfo,
    filesystem_for,
    join,
    read_manifest,
    verify_shards,
)

# Distinct first words of the seed sequences: the epoch permutation and per-sample augmentation
# never share a stream (numpy pads short entropy with zeros, so a tag keeps them apart).
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1
_COLUMNS = ("id", "image", "label")  # the rest (histogram, sizes) are not needed to train
_AGAIN = "prepare or pull the data again"


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill rank / world size from torch.distributed when it is initialised, else 0 / 1."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def _open_shard(fs: pafs.FileSystem, base: str, root: str, shard: ShardInfo) -> pq.ParquetFile:
    path = join(base, shard.path)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except FileNotFoundError:
        raise ManifestError(f"shard {shard.path} listed in the manifest is missing under {root}; "
                            f"{_AGAIN}") from None
    except (pa.ArrowException, OSError) as err:
        raise ManifestError(f"shard {shard.path} under {root} cannot be opened as Parquet ({err}); "
                            f"{_AGAIN}") from None


def _row_groups(file: pq.ParquetFile, shard: ShardInfo, root: str) -> list[int]:
    """Rows per row group of one shard, after checking it against the manifest and SCHEMA."""
    meta = file.metadata
    if meta.num_rows != shard.rows:
        raise ManifestError(f"shard {shard.path} under {root} has {meta.num_rows} rows, the "
                            f"manifest says {shard.rows}; {_AGAIN}")
    names = set(file.schema_arrow.names)
    if missing := [c for c in _COLUMNS if c not in names]:
        raise ManifestError(f"shard {shard.path} under {root} lacks columns {missing} of the "
                            f"shard schema {SCHEMA.names}; {_AGAIN}")
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


class ShardDataset(IterableDataset):
    """One split of a prepared dataset, streamed from Parquet shards (see the module docstring).

    Args:
        root: dataset folder or `s3://bucket/prefix` holding `manifest.json` and `shards/`.
        split: a split of the manifest, e.g. "train", "val".
        train: augment and shuffle (dropping the tail so ranks are equal) or evaluate.
        crop: training crop (H, W); None keeps the whole scaled image. Ignored when evaluating.
        scales: training scale factors, drawn uniformly.
        flip: horizontal flip with p 0.5 in training.
        seed: seeds the epoch permutation and every sample's augmentation.
        rank, world_size: this process's place among data-parallel workers; default from
            torch.distributed when initialised, else 0 and 1.
        verify: check this split's shard checksums against the manifest first (reads them all).

    Raises:
        ManifestError: no manifest, unknown split, a shard missing, unreadable or not matching.
    """

    def __init__(self, *, root: str, split: str, train: bool, crop: tuple[int, int] | None,
                 scales: Sequence[float] = SCALES, flip: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 verify: bool = False) -> None:
        super().__init__()
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"crop must be (H, W) with positive sides, got {crop}")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive factors, got {tuple(scales)}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.root, self.split, self.train = root, split, train
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.scales, self.flip, self.seed = tuple(float(s) for s in scales), flip, seed
        self.rank, self.world_size = _distributed(rank, world_size)
        self.epoch = 0

        manifest = read_manifest(root)
        self.shards: tuple[ShardInfo, ...] = manifest.shards(split)
        if verify:
            verify_shards(root, manifest, splits=(split,))
        fs, base = filesystem_for(root)
        sizes: list[int] = []
        group_shard: list[int] = []
        group_index: list[int] = []
        for s, shard in enumerate(self.shards):
            with _open_shard(fs, base, root, shard) as file:
                for g, rows in enumerate(_row_groups(file, shard, root)):
                    sizes.append(rows)
                    group_shard.append(s)
                    group_index.append(g)
        # Per row group over the whole split: its shard, its index there, its first sample.
        self._group_shard = np.asarray(group_shard, np.int64)
        self._group_index = np.asarray(group_index, np.int64)
        self._group_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1]
        self.num_samples = int(sum(sizes))
        if train and self.num_samples < self.world_size:
            raise ValueError(f"split {split!r} has {self.num_samples} samples, fewer than "
                             f"world_size {self.world_size}: some ranks would get none")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and augmentation. Call before creating the iterator;
        persistent DataLoader workers keep the epoch they were started with."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (over all of its DataLoader workers)."""
        return len(self._rank_indices())

    def _rank_indices(self) -> np.ndarray:
        n, world = self.num_samples, self.world_size
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, _PERMUTATION_STREAM])
            per_rank = n // world  # the permutation's tail of n mod world is dropped
            return rng.permutation(n)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return np.array_split(np.arange(n), world)[self.rank]

    def worker_indices(self, worker: int = 0, num_workers: int = 1) -> np.ndarray:
        """Global sample indices one DataLoader worker owns this epoch, in permutation order."""
        return np.array_split(self._rank_indices(), num_workers)[worker]

    def _plan(self, indices: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(row group, its samples) in order of the groups' first appearance in `indices`."""
        groups = np.searchsorted(self._group_start, indices, side="right") - 1
        unique, first = np.unique(groups, return_index=True)
        order = unique[np.argsort(first)]
        return [(int(g), indices[groups == g]) for g in order]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The filesystem is made here, in the worker, not inherited from the parent process.
        fs, base = filesystem_for(self.root)
        files: dict[int, pq.ParquetFile] = {}
        try:
            for group, samples in self._plan(self.worker_indices(worker, workers)):
                s = int(self._group_shard[group])
                shard = self.shards[s]
                if s not in files:
                    files[s] = _open_shard(fs, base, self.root, shard)
                try:
                    table = files[s].read_row_group(int(self._group_index[group]),
                                                    columns=list(_COLUMNS))
                except (pa.ArrowException, OSError) as err:
                    raise ManifestError(f"shard {shard.path} under {self.root}: row group "
                                        f"{self._group_index[group]} cannot be read ({err}); "
                                        f"{_AGAIN}") from None
                ids, images, labels = (table.column(c) for c in _COLUMNS)
                for index in samples:
                    row = int(index - self._group_start[group])
                    yield self._sample(int(index), ids[row].as_py(), images[row].as_py(),
                                       labels[row].as_py(), shard)
                del table, ids, images, labels  # hold one row group at a time
        finally:
            for file in files.values():
                file.close()

    def _sample(self, index: int, sample_id: str, image: bytes, label: bytes,
                shard: ShardInfo) -> dict:
        try:
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, _AUGMENT_STREAM, index])
                img, lab = train_sample(image, label, id=sample_id, crop=self.crop, rng=rng,
                                        scales=self.scales, flip=self.flip)
            else:
                img, lab = eval_sample(image, label, id=sample_id)
        except ValueError as err:
            raise ValueError(f"shard {shard.path} under {self.root}: {err}") from None
        return {"image": img, "label": lab, "id": sample_id}
