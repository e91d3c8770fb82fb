"""ShardDataset: sharding over ranks × workers, determinism, streaming, errors, local and S3."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from dynroute.models.stem import PIXEL_MEAN_BGR
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import ManifestError

N_TRAIN, N_VAL = 23, 7
CROP = (8, 8)
MEAN = torch.tensor(PIXEL_MEAN_BGR).view(3, 1, 1)


def dataset(root, **kwargs) -> ShardDataset:
    values = {"split": "train", "train": True, "crop": CROP, "seed": 0} | kwargs
    return ShardDataset(root=str(root), **values)


def read(ds: ShardDataset, num_workers: int = 0) -> list[dict]:
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    return list(loader)


def by_id(samples: list[dict]) -> dict[str, dict]:
    out = {s["id"]: s for s in samples}
    assert len(out) == len(samples), "a sample was yielded twice"
    return out


def check_content(sample: dict, toy) -> None:
    """The tensors are those of the sample its id names (the toy pixels encode the sample)."""
    t = toy(sample["id"])
    raw = sample["image"] + MEAN  # back to BGR 0–255
    inside = sample["label"] != 255  # padding is ignore in the label and raw 0 in the image
    assert inside.any()
    assert (sample["label"][inside] == t.label).all()
    assert torch.allclose(raw[0][inside], torch.tensor(200.0))  # B
    assert torch.allclose(raw[2][inside], torch.tensor(float(t.red)))  # R
    assert torch.equal(raw[:, ~inside], torch.zeros(3, int((~inside).sum())))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_and_workers_share_an_epoch_without_repeats(make_shards, toy, world_size,
                                                          num_workers):
    root = make_shards()
    for train, expected_total in ((True, N_TRAIN // world_size * world_size), (False, N_TRAIN)):
        seen: list[str] = []
        for rank in range(world_size):
            ds = dataset(root, train=train, rank=rank, world_size=world_size)
            ds.set_epoch(3)
            samples = read(ds, num_workers)
            assert len(samples) == len(ds)
            if train:
                assert len(ds) == N_TRAIN // world_size  # every rank the same count
            for s in samples:
                check_content(s, toy)
                if not train:
                    assert s["image"].shape[1:] == toy(s["id"]).size  # full image
            seen += [s["id"] for s in samples]
        counts = Counter(seen)
        assert max(counts.values()) == 1
        assert len(seen) == expected_total
        if not train:
            assert {toy(i).index for i in seen} == set(range(N_TRAIN))


def test_lengths_per_rank(make_shards):
    root = make_shards()
    assert [len(dataset(root, rank=r, world_size=3)) for r in range(3)] == [7, 7, 7]
    assert [len(dataset(root, train=False, rank=r, world_size=3)) for r in range(3)] == [8, 8, 7]
    assert len(dataset(root)) == N_TRAIN  # not distributed: rank 0 of 1
    with pytest.raises(ValueError, match="rank 3"):
        dataset(root, rank=3, world_size=3)


def test_rank_and_world_size_default_to_torch_distributed(make_shards, monkeypatch):
    import torch.distributed as dist

    root = make_shards()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    ds = dataset(root)
    assert (ds.rank, ds.world_size, len(ds)) == (2, 3, 7)
    assert (dataset(root, rank=0, world_size=1).world_size, len(dataset(root, rank=0))) == (1, 7)


def test_evaluation_reads_in_manifest_order_with_full_images(make_shards, toy):
    root = make_shards()
    samples = read(dataset(root, split="val", train=False))
    assert [toy(s["id"]).index for s in samples] == list(range(N_VAL))
    for s in samples:
        t = toy(s["id"])
        assert s["image"].shape == (3, *t.size) and s["label"].shape == t.size
        assert (s["label"] == t.label).all()  # no padding, no augmentation
        assert torch.allclose(s["image"][2] + MEAN[2], torch.tensor(float(t.red)))


def test_epochs_differ_and_the_same_seed_repeats(make_shards):
    root = make_shards()
    first = dataset(root)
    order0 = [s["id"] for s in read(first)]
    first.set_epoch(1)
    order1 = [s["id"] for s in read(first)]
    assert order0 != order1 and sorted(order0) == sorted(order1)

    again = dataset(root)
    samples_a, samples_b = read(again), read(dataset(root))
    assert [s["id"] for s in samples_a] == order0
    for a, b in zip(samples_a, samples_b, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert [s["id"] for s in read(dataset(root, seed=1))] != order0


def test_a_samples_augmentation_does_not_depend_on_workers_or_ranks(make_shards):
    root = make_shards()
    alone = by_id(read(dataset(root)))
    with_workers = by_id(read(dataset(root), num_workers=2))
    assert alone.keys() == with_workers.keys()
    shared: dict[str, dict] = {}
    for rank in range(2):
        shared |= by_id(read(dataset(root, rank=rank, world_size=2), num_workers=2))
    # The epoch's permutation is the same, so the ranks' union is alone's minus the dropped tail.
    assert set(shared) <= set(alone)
    for key, sample in [*with_workers.items(), *shared.items()]:
        assert torch.equal(sample["image"], alone[key]["image"])
        assert torch.equal(sample["label"], alone[key]["label"])
    # The augmentation does change the sample across epochs (sizes vary, so compare labels).
    later = dataset(root)
    later.set_epoch(1)
    moved = by_id(read(later))
    assert any(not torch.equal(moved[k]["label"], alone[k]["label"]) for k in alone)


def test_batches_collate_with_a_crop(make_shards):
    batch = next(iter(DataLoader(dataset(make_shards()), batch_size=4)))
    assert batch["image"].shape == (4, 3, *CROP) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, *CROP) and batch["label"].dtype == torch.int64
    assert len(batch["id"]) == 4


@pytest.mark.parametrize(("train", "rank", "world_size"), [(True, 0, 1), (True, 1, 3),
                                                           (False, 1, 2)])
def test_reads_stream_one_row_group_at_a_time(make_shards, toy, monkeypatch, train, rank,
                                              world_size):
    reads: list[tuple[int, tuple[str, ...]]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        reads.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kwargs)

    def whole(*args, **kwargs):
        raise AssertionError("a whole shard was read")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    ds = dataset(make_shards(), train=train, rank=rank, world_size=world_size)
    groups_so_far: list[tuple[int, int]] = []
    for sample in ds:  # lazily: each read happens when its group's first sample is needed
        t = toy(sample["id"])
        if not groups_so_far or groups_so_far[-1] != (t.shard, t.group):
            groups_so_far.append((t.shard, t.group))
        assert len(reads) == len(groups_so_far)
    # Each needed row group was read once (its samples came out together), only needed columns.
    assert len(set(groups_so_far)) == len(groups_so_far) == len(reads)
    assert all(columns == ("id", "image", "label") for _, columns in reads)
    assert [i for i, _ in reads] == [g for _, g in groups_so_far]


def test_row_groups_are_visited_in_a_seeded_order(make_shards, toy):
    root = make_shards()

    def group_order(epoch: int) -> list[tuple[int, int]]:
        ds = dataset(root)
        ds.set_epoch(epoch)
        order: list[tuple[int, int]] = []
        for s in ds:
            g = (toy(s["id"]).shard, toy(s["id"]).group)
            if g not in order:
                order.append(g)
        return order

    assert group_order(0) == group_order(0)
    assert group_order(0) != group_order(1)
    assert group_order(0) != sorted(group_order(0))


def test_unknown_split_lists_the_splits(make_shards):
    with pytest.raises(ManifestError, match=r"'test'.*\['train', 'val'\]"):
        dataset(make_shards(), split="test")


def test_missing_manifest_says_to_prepare(tmp_path: Path):
    with pytest.raises(ManifestError, match="dynroute data prepare"):
        dataset(tmp_path)


def test_missing_shard_is_named(make_shards):
    root = make_shards()
    (root / "shards" / "train-00002-of-00005.parquet").unlink()
    with pytest.raises(ManifestError, match=r"train-00002-of-00005\.parquet.*missing"):
        dataset(root)
    dataset(root, split="val")  # the other split is still readable


def test_verify_checks_only_this_splits_checksums(make_shards):
    root = make_shards()
    dataset(root, verify=True)
    path = root / "shards" / "val-00001-of-00002.parquet"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    dataset(root, verify=True)  # train is intact
    with pytest.raises(ManifestError, match=r"val-00001-of-00002\.parquet.*checksum"):
        dataset(root, split="val", verify=True)


def test_a_corrupt_image_names_the_sample_and_shard(make_shards, monkeypatch):
    root = make_shards()
    original = pq.ParquetFile.read_row_group

    def corrupt(self, i, columns=None, **kwargs):
        table = original(self, i, columns=columns, **kwargs)
        images = [b[: len(b) // 2] for b in table.column("image").to_pylist()]
        return table.set_column(1, "image", [images])

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", corrupt)
    with pytest.raises(ValueError, match=r"shards/val-00000-of-00002\.parquet.*sample s0000\b"):
        next(iter(dataset(root, split="val", train=False)))


# ---------------------------------------------------------------------------------------------
# S3 through a real S3-protocol server on 127.0.0.1


def test_s3_reads_the_same_samples_as_the_local_folder(make_shards, s3):
    root = make_shards()
    uri = s3.upload(root, "data", "prepared/toy")
    for train in (True, False):
        local = read(dataset(root, train=train, rank=1, world_size=2))
        remote = read(dataset(uri, train=train, rank=1, world_size=2, verify=True),
                      num_workers=2)
        assert sorted(s["id"] for s in remote) == sorted(s["id"] for s in local)
        remote_by_id = by_id(remote)
        for s in local:
            assert torch.equal(s["image"], remote_by_id[s["id"]]["image"])
            assert torch.equal(s["label"], remote_by_id[s["id"]]["label"])


def test_s3_verify_names_a_corrupted_shard(make_shards, s3):
    root = make_shards()
    uri = s3.upload(root, "corrupt", "toy")
    key = "toy/shards/train-00003-of-00005.parquet"
    data = bytearray((root / "shards" / "train-00003-of-00005.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    s3.client().put_object(Bucket="corrupt", Key=key, Body=bytes(data))
    with pytest.raises(ManifestError, match=r"train-00003-of-00005\.parquet.*checksum"):
        dataset(uri, verify=True)


def test_s3_errors_name_the_missing_manifest_and_shard(make_shards, s3):
    root = make_shards()
    uri = s3.upload(root, "missing", "toy")
    with pytest.raises(ManifestError, match="dynroute data prepare"):
        dataset("s3://missing/elsewhere")
    s3.client().delete_object(Bucket="missing", Key="toy/shards/train-00001-of-00005.parquet")
    with pytest.raises(ManifestError, match=r"train-00001-of-00005\.parquet.*missing"):
        dataset(uri)
