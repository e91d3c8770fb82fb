"""`dynroute data prepare` on tiny raw folders written here in the real layouts."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.io import savemat

from dynroute.pipelines.labels import CITYSCAPES_CLASSES, VOC_CLASSES, cityscapes_lookup
from dynroute.pipelines.prepare import DataError, prepare
from dynroute.platform.data.shards import (
    CLASS_STATS,
    SCENE_KINDS,
    read_manifest,
    read_scene_kinds,
    verify_shards,
)

H, W = 24, 40
# label ids: 7 road (train 0), 26 car (13), 23 sky (10), 0 unlabeled (ignore), 1 ego vehicle
CITY_IDS = (7, 26, 23, 0, 1)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def make_cityscapes(root: Path, train: int = 3, val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    # Real city names: the cities (so the frames) of train and val are disjoint.
    for split, n, cities in (("train", train, ("bochum", "aachen")),
                             ("val", val, ("frankfurt", "lindau"))):
        for i in range(n):
            city = cities[i % 2]
            stem = f"{city}_{i:06d}_000019"
            _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(i))
            label = rng.choice(CITY_IDS, size=(H, W)).astype(np.uint8)
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return root


def _voc_palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    p = Image.new("P", (label.shape[1], label.shape[0]))
    p.putdata(label.ravel().tolist())
    p.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    p.save(path)


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    voc_train, voc_val = ["2008_000001", "2008_000002"], ["2008_000003", "2008_000004"]
    sbd_train, sbd_val = ["2008_000001", "2008_000003", "2009_000010"], ["2010_000020"]
    rng = np.random.default_rng(1)
    for i, image_id in enumerate(sorted(set(voc_train + voc_val + sbd_train + sbd_val))):
        path = voc / "JPEGImages" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i)).save(path, quality=90)
        label = rng.integers(0, 21, (H, W)).astype(np.uint8)
        if image_id in voc_train + voc_val:
            band = label.copy()
            band[0, :] = 255  # VOC's boundary band
            _voc_palette_png(voc / "SegmentationClass" / f"{image_id}.png", band)
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        savemat(sbd / "cls" / f"{image_id}.mat",
                {"GTcls": {"Segmentation": (label + 0).astype(np.uint8),
                           "CategoriesPresent": np.unique(label)}})
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("\n".join(voc_train) + "\n")
    (lists / "val.txt").write_text("\n".join(voc_val) + "\n")
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    return root


def _rows(root: Path, split: str) -> list[dict]:
    manifest = read_manifest(str(root))
    rows = []
    for shard in manifest.shards(split):
        rows += pq.read_table(root / shard.path).to_pylist()
    return rows


def test_cityscapes_prepares_into_shards_with_train_ids(tmp_path):
    raw = make_cityscapes(tmp_path / "raw", train=5, val=2)
    out = tmp_path / "prepared"
    manifest = prepare("cityscapes", raw, out, rows_per_shard=2, rows_per_group=1, workers=2)
    assert manifest.count("train") == 5 and manifest.count("val") == 2
    assert [s.path for s in manifest.shards("train")] == [
        f"shards/train-0000{i}-of-00003.parquet" for i in range(3)]
    assert pq.ParquetFile(out / manifest.shards("train")[0].path).metadata.num_row_groups == 2
    verify_shards(str(out))
    rows = _rows(out, "train")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    lookup = cityscapes_lookup()
    for row in rows:
        city = row["id"].split("_")[0]
        src = raw / "leftImg8bit" / "train" / city / f"{row['id']}_leftImg8bit.png"
        assert row["image"] == src.read_bytes(), "images are stored untouched"
        raw_label = np.asarray(Image.open(raw / "gtFine" / "train" / city /
                                          f"{row['id']}_gtFine_labelIds.png"))
        label = np.asarray(Image.open(io.BytesIO(row["label"])))
        assert np.array_equal(label, lookup[raw_label].astype(np.uint8))
        assert set(np.unique(label)) <= {0, 13, 10, 255}
        assert (row["height"], row["width"], row["image_format"]) == (H, W, "png")
        assert sum(row["histogram"]) == H * W
        assert row["histogram"][0] == int((label == 0).sum())
        assert row["histogram"][-1] == int((label == 255).sum())
    stats = json.loads((out / CLASS_STATS).read_text())
    assert set(stats["train"]["pixels"]) == set(CITYSCAPES_CLASSES)
    assert stats["train"]["labelled_pixels"] + stats["train"]["ignored_pixels"] == 5 * H * W
    assert stats["train"]["pixels"]["road"] > 0 and stats["train"]["pixels"]["person"] == 0


def test_prepare_is_deterministic_and_idempotent(tmp_path):
    raw = make_cityscapes(tmp_path / "raw")
    first = prepare("cityscapes", raw, tmp_path / "a", workers=1)
    second = prepare("cityscapes", raw, tmp_path / "b", workers=2)
    assert first.content_hash == second.content_hash
    assert first.to_dict() == second.to_dict()
    again = prepare("cityscapes", raw, tmp_path / "a", workers=2)  # over its own output
    assert again.to_dict() == first.to_dict()
    assert not list(tmp_path.glob(".a.*")), "no temporary or old folders left behind"


def test_voc_train_is_the_aug_set_with_labels_from_voc_or_sbd(tmp_path):
    raw = make_voc(tmp_path / "raw")
    out = tmp_path / "prepared"
    manifest = prepare("voc", raw, out, workers=2)
    train, val = _rows(out, "train"), _rows(out, "val")
    # SBD train ∪ SBD val ∪ VOC train − VOC val
    assert [r["id"] for r in train] == ["2008_000001", "2008_000002", "2009_000010",
                                        "2010_000020"]
    assert [r["id"] for r in val] == ["2008_000003", "2008_000004"]
    assert manifest.num_classes == 21 and manifest.class_names == VOC_CLASSES
    by_id = {r["id"]: r for r in train}
    voc_label = np.asarray(Image.open(io.BytesIO(by_id["2008_000001"]["label"])))
    assert (voc_label[0] == 255).all(), "a VOC image keeps its SegmentationClass boundary band"
    sbd_label = np.asarray(Image.open(io.BytesIO(by_id["2009_000010"]["label"])))
    assert 255 not in sbd_label and sbd_label.max() <= 20, "an SBD-only image takes the .mat"
    assert by_id["2009_000010"]["image_format"] == "jpeg"


# -- bad input: a clear error naming the file, a non-zero exit, nothing half-written ----------
def _break_missing_folder(raw: Path) -> str:
    shutil.rmtree(raw / "gtFine")
    return "gtFine"


def _break_missing_label(raw: Path) -> str:
    label = next((raw / "gtFine" / "train").rglob("*_labelIds.png"))
    label.unlink()
    return label.name


def _break_unknown_id(raw: Path) -> str:
    label = sorted((raw / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    array = np.asarray(Image.open(label)).copy()
    array[0, 0] = 40  # not in the Cityscapes table
    Image.fromarray(array).save(label)
    return label.name


def _break_size(raw: Path) -> str:
    label = sorted((raw / "gtFine" / "train").rglob("*_labelIds.png"))[1]
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(label)
    return label.name


def _break_corrupt_png(raw: Path) -> str:
    image = sorted((raw / "leftImg8bit" / "train").rglob("*.png"))[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # truncated
    return image.name


def _break_empty_split(raw: Path) -> str:
    for image in (raw / "leftImg8bit" / "val").rglob("*.png"):
        image.unlink()
    return "'val' is empty"


@pytest.mark.parametrize("breaker", [_break_missing_folder, _break_missing_label,
                                     _break_unknown_id, _break_size, _break_corrupt_png,
                                     _break_empty_split])
def test_bad_cityscapes_input_fails_clearly_and_writes_nothing(tmp_path, breaker):
    raw = make_cityscapes(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare("cityscapes", raw, out, workers=1)
    before = read_manifest(str(out)).to_dict()
    needle = breaker(raw)
    with pytest.raises(DataError, match=re.escape(needle)):
        prepare("cityscapes", raw, out, workers=2)
    assert read_manifest(str(out)).to_dict() == before, "the old output is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_bad_voc_input_fails_clearly(tmp_path):
    raw = make_voc(tmp_path / "raw")
    mat = raw / "benchmark_RELEASE" / "dataset" / "cls" / "2009_000010.mat"
    mat.write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"2009_000010\.mat"):
        prepare("voc", raw, tmp_path / "out", workers=1)
    mat.unlink()
    with pytest.raises(DataError, match="has no label"):
        prepare("voc", raw, tmp_path / "out", workers=1)
    jpeg = raw / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000004.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    savemat(mat, {"GTcls": {"Segmentation": np.zeros((H, W), np.uint8)}})
    with pytest.raises(DataError, match=r"2008_000004\.jpg"):
        prepare("voc", raw, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_with_a_nonzero_exit(tmp_path):
    raw = make_cityscapes(tmp_path / "raw")
    _break_unknown_id(raw)
    dynroute = Path(sys.executable).parent / "dynroute"
    res = subprocess.run([dynroute, "data", "prepare", "--dataset", "cityscapes", "--raw", raw,
                          "--out", tmp_path / "out"], capture_output=True, text=True)
    assert res.returncode == 1
    assert "error:" in res.stderr and "not in the cityscapes label table" in res.stderr
    assert not (tmp_path / "out").exists()
    res = subprocess.run([dynroute, "data", "prepare", "--dataset", "kitti", "--raw", raw,
                          "--out", tmp_path / "out"], capture_output=True, text=True)
    assert res.returncode == 1 and "cityscapes, voc" in res.stderr


# -- a sample prepared twice, or in both splits: refused by name, the old output untouched ----
def _prepare_cli(dataset: str, raw: Path, out: Path) -> subprocess.CompletedProcess:
    dynroute = Path(sys.executable).parent / "dynroute"
    return subprocess.run([dynroute, "data", "prepare", "--dataset", dataset, "--raw", raw,
                           "--out", out, "--workers", "1"], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "400"})


def _copy_frame(raw: Path, stem: str, src: tuple[str, str], dst: tuple[str, str]) -> None:
    """Copy a Cityscapes frame (image and label) from (split, city) to (split, city)."""
    for folder, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
        target = raw / folder / dst[0] / dst[1] / f"{stem}_{suffix}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / folder / src[0] / src[1] / f"{stem}_{suffix}.png", target)


def _frame_in_two_cities(raw: Path) -> list[str]:
    _copy_frame(raw, "aachen_000001_000019", ("train", "aachen"), ("train", "bochum"))
    return ["split 'train'", "aachen_000001_000019 (in aachen, bochum)",
            str(raw / "leftImg8bit" / "train"), "remove the copies"]


def _frame_in_both_splits(raw: Path) -> list[str]:
    _copy_frame(raw, "bochum_000000_000019", ("train", "bochum"), ("val", "bochum"))
    _copy_frame(raw, "aachen_000001_000019", ("train", "aachen"), ("val", "aachen"))
    return ["2 frame(s) are in both train and val", str(raw / "leftImg8bit"),
            "aachen_000001_000019 (train/aachen and val/aachen)",
            "bochum_000000_000019 (train/bochum and val/bochum)", "remove each from one split"]


def _lists(raw: Path) -> Path:
    return raw / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"


def _voc_val_list_repeats_ids(raw: Path) -> list[str]:
    val = _lists(raw) / "val.txt"
    val.write_text(val.read_text() * 2)  # a list concatenated twice
    return [f"voc: {val} (read for the val split) names 2 id(s) more than once",
            "2008_000003 (2 times), 2008_000004 (2 times)", "remove the repeated lines"]


def _sbd_list_repeats_an_id(raw: Path) -> list[str]:
    sbd_val = raw / "benchmark_RELEASE" / "dataset" / "val.txt"
    sbd_val.write_text("2010_000020\n2009_000010\n2010_000020\n")
    return [f"voc: {sbd_val} (read for the train split)", "2010_000020 (2 times)"]


def _voc_val_id_in_train_list(raw: Path) -> list[str]:
    train = _lists(raw) / "train.txt"
    train.write_text(train.read_text() + "2008_000004\n")
    return [f"voc: 1 id(s) are in both the train list {train} and the val list "
            f"{_lists(raw) / 'val.txt'}: 2008_000004", "remove each from one list"]


@pytest.mark.parametrize(("dataset", "breaker"), [
    ("cityscapes", _frame_in_two_cities), ("cityscapes", _frame_in_both_splits),
    ("voc", _voc_val_list_repeats_ids), ("voc", _sbd_list_repeats_an_id),
    ("voc", _voc_val_id_in_train_list)])
def test_a_sample_twice_is_refused_and_the_output_untouched(tmp_path, dataset, breaker):
    raw = {"cityscapes": make_cityscapes, "voc": make_voc}[dataset](tmp_path / "raw")
    out = tmp_path / "prepared"
    assert _prepare_cli(dataset, raw, out).returncode == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    needles = breaker(raw)
    res = _prepare_cli(dataset, raw, out)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.startswith(f"error: {dataset}: ") and "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_sbd_holding_voc_val_images_is_not_a_duplicate(tmp_path):
    """SBD's lists hold VOC val images on the real data; the aug set leaves them out of train
    by design, so the refusal above must not catch them."""
    raw = make_voc(tmp_path / "raw")
    (raw / "benchmark_RELEASE" / "dataset" / "val.txt").write_text("2010_000020\n2008_000004\n")
    manifest = prepare("voc", raw, tmp_path / "out", workers=1)
    assert manifest.count("train") == 4 and manifest.count("val") == 2


@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_the_synthetic_scene_kinds_are_kept_by_prepared_split(tmp_path, dataset):
    """synth_meta.json keys images by the raw set (for VOC voc_val, sbd_train…); the prepared
    folder keys them by the prepared split, which is what the evaluation reads."""
    from dynroute.pipelines.synth import synthesize
    from dynroute.platform.data.dataset import ShardDataset

    raw, out = tmp_path / "raw", tmp_path / "prepared"
    extra = {"sbd_train": 2, "sbd_val": 1} if dataset == "voc" else {}
    synthesize(dataset, raw, train=4, val=3, height=64, width=64, seed=2, **extra)
    prepare(dataset, raw, out, workers=1)
    meta = json.loads((raw / "synth_meta.json").read_text())["images"]
    kind_of = {key.rpartition("/")[2]: entry["kind"] for key, entry in meta.items()}
    for split in ("train", "val"):
        ids = [s["id"] for s in ShardDataset(root=str(out), split=split, train=False,
                                             crop=None)]
        assert read_scene_kinds(str(out), split) == {i: kind_of[i] for i in ids}


def test_real_data_has_no_scene_kinds_and_a_damaged_meta_file_is_refused(tmp_path):
    raw = make_cityscapes(tmp_path / "raw")
    prepare("cityscapes", raw, tmp_path / "out", workers=1)
    assert read_scene_kinds(str(tmp_path / "out"), "val") is None
    assert not (tmp_path / "out" / SCENE_KINDS).exists()
    before = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    (raw / "synth_meta.json").write_text('{"images": ')
    res = _prepare_cli("cityscapes", raw, tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{raw / 'synth_meta.json'} is damaged" in res.stderr, res.stderr
    after = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert after == before
