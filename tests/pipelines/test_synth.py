"""The synthetic datasets, read back as a converter of the real Cityscapes and VOC+SBD would."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from cityscapesscripts.helpers.labels import id2label
from PIL import Image
from scipy import ndimage

from dynroute.pipelines import synth
from dynroute.pipelines.synth import (
    CITYSCAPES_CITIES,
    KINDS,
    META_FILE,
    VOC_CLASSES,
    synthesize,
    voc_colormap,
)

CS_H, CS_W = 96, 192
VOC_H, VOC_W = 96, 128
VOC_ID = re.compile(r"^20(07|08|09|10|11)_\d{6}$")


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cs") / "cityscapes"
    summary = synthesize("cityscapes", root, train=12, val=6, height=CS_H, width=CS_W, seed=3)
    return root, summary


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("voc") / "voc"
    summary = synthesize("voc", root, train=8, val=8, height=VOC_H, width=VOC_W, seed=5)
    return root, summary


def meta_of(root: Path) -> dict:
    return json.loads((root / META_FILE).read_text())


def cs_label(root: Path, key: str) -> np.ndarray:
    split, image_id = key.split("/")
    city = image_id.split("_")[0]
    return np.array(Image.open(root / "gtFine" / split / city /
                               f"{image_id}_gtFine_labelIds.png"))


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# -- Cityscapes ------------------------------------------------------------------------------
def test_cityscapes_layout_is_the_real_one(cityscapes):
    root, summary = cityscapes
    meta = meta_of(root)
    assert (meta["dataset"], meta["seed"], meta["height"], meta["width"]) == (
        "cityscapes", 3, CS_H, CS_W)
    assert summary["splits"] == {"train": 12, "val": 6, "test": 0} and summary["images"] == 18
    expected = {META_FILE}
    for key in meta["images"]:
        split, image_id = key.split("/")
        city, seq, frame = image_id.split("_")
        assert city in CITYSCAPES_CITIES[split] and re.fullmatch(r"\d{6}", seq)
        assert frame == "000019"
        expected |= {f"leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png",
                     f"gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png"}
    assert set(digests(root)) == expected
    assert sum(k.startswith("train/") for k in meta["images"]) == 12
    # Images are spread over the split's cities, several images per city.
    assert {k.split("/")[1].split("_")[0] for k in meta["images"] if k.startswith("val/")} == set(
        CITYSCAPES_CITIES["val"])


def test_cityscapes_images_are_rgb_and_labels_are_label_ids(cityscapes):
    root, _ = cityscapes
    seen: set[int] = set()
    for key in meta_of(root)["images"]:
        split, image_id = key.split("/")
        city = image_id.split("_")[0]
        image = Image.open(root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png")
        label = Image.open(root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png")
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (CS_W, CS_H))
        assert (label.format, label.mode, label.size) == ("PNG", "L", (CS_W, CS_H))
        assert np.array(image).std() > 10  # a picture, not a flat fill
        seen |= set(np.unique(np.array(label)).tolist())
    assert seen <= set(id2label)  # label ids of the official table, never train ids
    train_ids = {id2label[i].trainId for i in seen} - {255}
    assert len(train_ids) >= 15
    ignored = {i for i in seen if id2label[i].trainId == 255}
    assert {1, 3} & ignored and len(ignored) >= 4  # ego vehicle / out of roi and patches


def test_images_follow_their_labels(cityscapes):
    # Learnable: pixels of one class look alike within an image and differ between classes.
    root, _ = cityscapes
    key = next(iter(meta_of(root)["images"]))
    split, image_id = key.split("/")
    city = image_id.split("_")[0]
    image = np.array(Image.open(root / "leftImg8bit" / split / city /
                                f"{image_id}_leftImg8bit.png")).astype(float)
    label = cs_label(root, key)
    road, sky = image[label == 7].mean(0), image[label == 23].mean(0)
    assert np.abs(road - sky).max() > 30


def test_kinds_follow_the_requested_fractions(cityscapes, tmp_path):
    root, summary = cityscapes
    kinds = [v["kind"] for v in meta_of(root)["images"].values()]
    assert set(kinds) == set(KINDS)
    assert summary["kinds"] == {k: kinds.count(k) for k in KINDS} == dict.fromkeys(KINDS, 6)
    out = synthesize("cityscapes", tmp_path / "cs", train=20, val=0, height=32, width=64,
                     kinds={"small": 2, "large": 1})
    assert out["kinds"] == {"small": 13, "large": 7, "mixed": 0}


def components(label: np.ndarray) -> np.ndarray:
    """Areas of the 4-connected regions of each label value, as fractions of the image."""
    areas = []
    for value in np.unique(label):
        regions, _ = ndimage.label(label == value)
        areas.append(np.bincount(regions.ravel())[1:])
    return np.concatenate(areas) / label.size


def test_scale_kinds_differ_in_measured_region_sizes(cityscapes):
    root, _ = cityscapes
    by_kind: dict[str, list[tuple[float, int, float]]] = {k: [] for k in KINDS}
    for key, info in meta_of(root)["images"].items():
        areas = components(cs_label(root, key))
        areas = areas[areas * CS_H * CS_W >= 4]  # drop slivers along slanted edges
        small = areas < 0.01
        by_kind[info["kind"]].append((areas.mean(), int(small.sum()), areas[small].sum()))
    mean = {k: np.mean(v, axis=0) for k, v in by_kind.items()}
    small, large, mixed = mean["small"], mean["large"], mean["mixed"]
    assert small[0] * 2.5 < large[0]  # mean region size
    assert small[1] > 4 * large[1] and small[1] >= 20  # regions under 1% of the image
    assert small[2] > 3 * large[2]  # share of pixels in such regions
    assert large[1] < mixed[1] < small[1]


# -- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_same_seed_gives_identical_bytes(dataset, tmp_path, monkeypatch):
    def run(name: str, seed: int) -> dict[str, str]:
        synthesize(dataset, tmp_path / name, train=3, val=2, height=48, width=64, seed=seed)
        return digests(tmp_path / name)

    first = run("a", 1)
    # A run on another day: writers that stamp the time (scipy's MAT header does) must not leak it.
    monkeypatch.setattr(time, "asctime", lambda *_: "Fri Jan  1 00:00:00 2100")
    assert run("b", 1) == first
    other = run("c", 2)
    changed = [f for f in first if first[f] != other.get(f)]
    assert len(changed) > len(first) // 2


# -- VOC + SBD -------------------------------------------------------------------------------
def test_voc_id_sets_overlap_like_the_real_ones(voc):
    root, summary = voc
    seg = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    sbd = root / "benchmark_RELEASE/dataset"
    train, val, trainval = (lines(seg / f"{n}.txt") for n in ("train", "val", "trainval"))
    sbd_train, sbd_val = lines(sbd / "train.txt"), lines(sbd / "val.txt")
    for ids in (train, val, trainval, sbd_train, sbd_val):
        assert ids == sorted(set(ids)) and all(VOC_ID.match(i) for i in ids)
    assert (len(train), len(val), len(sbd_train), len(sbd_val)) == (8, 8, 48, 16)
    assert not set(train) & set(val) and set(trainval) == set(train) | set(val)
    assert not set(sbd_train) & set(sbd_val)
    assert set(val) & set(sbd_train)  # why the aug split subtracts VOC val
    assert set(train) & set(sbd_train)
    assert set(sbd_train) - set(trainval) and set(sbd_val) - set(trainval)
    aug = (set(sbd_train) | set(sbd_val) | set(train)) - set(val)
    assert summary["splits"]["aug_train"] == len(aug)
    everything = set(trainval) | set(sbd_train) | set(sbd_val)
    assert summary["images"] == len(everything)
    assert {p.stem for p in (root / "VOCdevkit/VOC2012/JPEGImages").iterdir()} == everything
    assert {p.stem for p in (root / "VOCdevkit/VOC2012/SegmentationClass").iterdir()} == set(
        trainval)
    assert {p.stem for p in (sbd / "cls").iterdir()} == set(sbd_train) | set(sbd_val)
    assert {p.stem for p in (sbd / "img").iterdir()} == set(sbd_train) | set(sbd_val)
    meta = meta_of(root)
    assert meta["dataset"] == "voc"
    assert {k for k in meta["images"] if k.startswith("sbd_val/")} == {
        f"sbd_val/{i}" for i in sbd_val}


def test_voc_labels_are_palette_pngs_with_a_void_band(voc):
    root, _ = voc
    voc_dir = root / "VOCdevkit/VOC2012"
    palette = voc_colormap()
    assert palette[255].tolist() == [224, 224, 192] and palette[15].tolist() == [192, 128, 128]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"
    for image_id in lines(voc_dir / "ImageSets/Segmentation/trainval.txt"):
        png = Image.open(voc_dir / "SegmentationClass" / f"{image_id}.png")
        assert png.mode == "P"
        assert np.array_equal(np.array(png.getpalette(), np.uint8).reshape(-1, 3), palette)
        values = set(np.unique(np.array(png)).tolist())
        assert values <= set(range(21)) | {255} and 255 in values and values - {0, 255}
        jpeg = Image.open(voc_dir / "JPEGImages" / f"{image_id}.jpg")
        assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", png.size)


def class_edges(seg: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class."""
    edge = np.zeros(seg.shape, bool)
    down, right = seg[1:] != seg[:-1], seg[:, 1:] != seg[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    return edge


def test_voc_void_band_outlines_every_object(voc):
    # Ids in VOC and SBD show one scene, so SBD's map is VOC's without the band.
    root, _ = voc
    voc_dir, sbd = root / "VOCdevkit/VOC2012", root / "benchmark_RELEASE/dataset"
    shared = set(lines(voc_dir / "ImageSets/Segmentation/trainval.txt")) & {
        p.stem for p in (sbd / "cls").iterdir()}
    assert len(shared) >= 5
    for image_id in sorted(shared):
        label = np.array(Image.open(voc_dir / "SegmentationClass" / f"{image_id}.png"))
        seg = scipy.io.loadmat(sbd / "cls" / f"{image_id}.mat", squeeze_me=True,
                               struct_as_record=False)["GTcls"].Segmentation
        void = label == 255
        assert np.array_equal(label[~void], seg[~void])
        # At least 4 px wide: every class change, grown by 1 px, is void.
        assert not (ndimage.binary_dilation(class_edges(seg)) & ~void).any()
        # Hugging the objects: no void background pixel lies more than 2 px from an object.
        near = ndimage.binary_dilation(seg > 0, iterations=2)
        assert not (void & (seg == 0) & ~near).any()
        assert void.mean() < 0.5


def test_sbd_mat_files_load_with_scipy(voc):
    root, _ = voc
    sbd = root / "benchmark_RELEASE/dataset"
    voc_dir = root / "VOCdevkit/VOC2012"
    in_voc = set(lines(voc_dir / "ImageSets/Segmentation/trainval.txt"))
    membership: set[bool] = set()
    for image_id in lines(sbd / "train.txt") + lines(sbd / "val.txt"):
        gt = scipy.io.loadmat(sbd / "cls" / f"{image_id}.mat", squeeze_me=True,
                              struct_as_record=False)["GTcls"]
        seg = gt.Segmentation
        assert seg.dtype == np.uint8 and seg.max() <= 20 and 255 not in seg
        assert np.atleast_1d(gt.CategoriesPresent).tolist() == sorted(set(np.unique(seg)) - {0})
        assert len(gt.Boundaries) == 20 and gt.Boundaries[0].shape == seg.shape
        jpeg = sbd / "img" / f"{image_id}.jpg"
        assert jpeg.read_bytes() == (voc_dir / "JPEGImages" / f"{image_id}.jpg").read_bytes()
        assert Image.open(jpeg).size == (seg.shape[1], seg.shape[0])
        membership.add(image_id in in_voc)
    assert membership == {True, False}  # SBD has ids of VOC's sets and ids of its own


def test_voc_sizes_vary_within_the_jitter(voc):
    root, _ = voc
    sizes = {Image.open(p).size for p in (root / "VOCdevkit/VOC2012/JPEGImages").iterdir()}
    widths, heights = zip(*sizes, strict=True)
    assert len(sizes) > 10
    assert min(widths) >= 0.8 * VOC_W - 1 and max(widths) <= 1.2 * VOC_W + 1
    assert min(heights) >= 0.8 * VOC_H - 1 and max(heights) <= 1.2 * VOC_H + 1


# -- atomic writes and progress -------------------------------------------------------------
def failing_after(calls: int, real):
    count = 0

    def write(*args, **kwargs):
        nonlocal count
        count += 1
        if count > calls:
            raise OSError("disk full")
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize(("dataset", "writer"), [("cityscapes", "_write_png"),
                                                 ("voc", "_write_mat")])
def test_a_failed_run_leaves_nothing_behind(dataset, writer, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, writer, failing_after(3, getattr(synth, writer)))
    with pytest.raises(OSError, match="disk full"):
        synthesize(dataset, tmp_path / "out", train=4, val=2, height=32, width=48)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_the_old_tree_and_a_good_run_replaces_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous dataset")
    real = synth._write_png
    monkeypatch.setattr(synth, "_write_png", failing_after(2, real))
    with pytest.raises(OSError):
        synthesize("cityscapes", out, train=3, val=0, height=32, width=32)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old.txt").read_text() == "previous dataset"
    monkeypatch.setattr(synth, "_write_png", real)
    synthesize("cityscapes", out, train=3, val=0, height=32, width=32)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not (out / "old.txt").exists() and (out / META_FILE).exists()


@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_progress_is_called_once_per_image(dataset, tmp_path):
    calls: list[tuple[int, int]] = []
    summary = synthesize(dataset, tmp_path / "out", train=3, val=2, height=32, width=32,
                         progress=lambda done, total: calls.append((done, total)))
    total = summary["images"]
    assert calls == [(i, total) for i in range(1, total + 1)]


# -- errors ----------------------------------------------------------------------------------
GOOD = {"train": 1, "val": 1, "height": 32, "width": 32}


@pytest.mark.parametrize(("dataset", "changes", "message"), [
    ("kitti", {}, r"unknown dataset 'kitti'; choose one of: cityscapes, voc"),
    ("cityscapes", {"height": 31}, r"height 31 is below the minimum of 32"),
    ("voc", {"width": 8}, r"width 8 is below the minimum of 32"),
    ("cityscapes", {"train": -1}, r"train=-1 is negative"),
    ("voc", {"sbd_val": -2}, r"sbd_val=-2 is negative"),
    ("cityscapes", {"kinds": {"small": 0, "large": 0}}, r"sum to 0"),
    ("cityscapes", {"kinds": {"small": 1, "tiny": 1}}, r"unknown scale kind\(s\) 'tiny'"),
    ("cityscapes", {"kinds": {"small": -1, "large": 2}}, r"must be >= 0"),
    ("voc", {"test": 2}, r"VOC has no labelled test set"),
    ("cityscapes", {"sbd_train": 4}, r"for dataset 'voc' only"),
    ("cityscapes", {"seed": -1}, r"seed -1 is negative"),
    ("voc", {"size_jitter": 1.5}, r"size_jitter 1.5 is outside"),
])
def test_bad_arguments_are_named(dataset, changes, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        synthesize(dataset, tmp_path / "out", **(GOOD | changes))
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        synthesize("voc", tmp_path / "file", **GOOD)
