"""`dynroute data prepare`: a raw Cityscapes or VOC 2012 (+SBD) folder → Parquet shards.

Validates the raw layout, maps labels to train ids, and writes the shards, the manifest and class
statistics described in `dynroute.platform.data.shards`. Splits are `train` and `val`:

- Cityscapes: `leftImg8bit/{split}/{city}/*_leftImg8bit.png` with
  `gtFine/{split}/{city}/*_gtFine_labelIds.png`; label ids → the 19 train ids.
- VOC: `train` is the "aug" set = SBD train ∪ SBD val ∪ VOC train − VOC val (10,582 images on the
  real data), `val` is VOC val. A VOC image's label is its `SegmentationClass` PNG (with the 255
  boundary band); an image only in SBD takes `dataset/cls/{id}.mat` (`GTcls.Segmentation`).

A sample is prepared once and in one split: a Cityscapes frame (its file stem) found twice, or
an id repeated in a VOC or SBD list or in both VOC's train and val lists, is refused by name.

Images are stored as the raw dataset's encoded bytes, after a full decode check. Work streams
through a process pool in a fixed order (deterministic output), the output appears atomically
(written to a temporary sibling, then renamed), and bad input raises `DataError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from dynroute.platform.data.shards import (
    Manifest,
    ShardWriter,
    read_manifest,
    write_scene_kinds,
)

from .labels import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    apply_lookup,
    cityscapes_lookup,
    histogram,
    voc_lookup,
)
from .synth import META_FILE

DATASETS = ("cityscapes", "voc")
SPLITS = ("train", "val")


class DataError(ValueError):
    """Raw data that cannot be prepared; the message names the file and what to do."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path  # a PNG, or an SBD .mat when label.suffix == ".mat"


# -- finding samples --------------------------------------------------------------------------
def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"missing folder {path}: {what}")


def cityscapes_samples(raw: Path) -> dict[str, list[Sample]]:
    images_root, labels_root = raw / "leftImg8bit", raw / "gtFine"
    layout = "expected the Cityscapes layout leftImg8bit/{split}/{city}/ and gtFine/{split}/{city}/"
    _require_dir(images_root, layout)
    _require_dir(labels_root, layout)
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        _require_dir(images_root / split, layout)
        samples = []
        for image in sorted((images_root / split).glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            label = labels_root / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise DataError(f"image {image} has no label: expected {label}")
            samples.append(Sample(stem, image, label))
        if not samples:
            raise DataError(f"split {split!r} is empty: no *_leftImg8bit.png under "
                            f"{images_root / split}/<city>/")
        _refuse_repeated_frames(split, samples, images_root / split)
        splits[split] = samples
    _refuse_shared_frames(splits, images_root)
    return splits


# A Cityscapes frame is named by its file stem, <city>_<sequence>_<frame>, unique in the whole
# dataset (the cities of train and val are disjoint). The same stem twice is one frame copied:
# into a second city folder of a split, or into both splits.
def _refuse_repeated_frames(split: str, samples: list[Sample], root: Path) -> None:
    folders: dict[str, list[str]] = {}
    for s in samples:
        folders.setdefault(s.id, []).append(s.image.parent.name)
    repeated = {stem: cities for stem, cities in folders.items() if len(cities) > 1}
    if repeated:
        where = _some(f"{stem} (in {', '.join(cities)})" for stem, cities in repeated.items())
        raise DataError(
            f"cityscapes: split {split!r} has {len(repeated)} frame(s) more than once under "
            f"{root}/<city>/: {where}. A frame is its file stem <city>_<sequence>_<frame> and is "
            f"prepared once; remove the copies, keeping each frame in its own city's folder")


def _refuse_shared_frames(splits: dict[str, list[Sample]], root: Path) -> None:
    train = {s.id: s for s in splits["train"]}
    shared = [(train[s.id], s) for s in splits["val"] if s.id in train]
    if shared:
        where = _some(f"{t.id} ({t.image.parent.relative_to(root)} and "
                      f"{v.image.parent.relative_to(root)})" for t, v in shared)
        raise DataError(
            f"cityscapes: {len(shared)} frame(s) are in both train and val under {root}: {where}. "
            f"A validation frame must not be trained on; remove each from one split (the "
            f"official splits share no city)")


def _some(items, count: int = 5) -> str:
    """The first `count` of `items`, joined, with how many more there are."""
    items = list(items)
    more = f", and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _read_ids(path: Path, split: str) -> list[str]:
    """The ids of a VOC or SBD list file, each of which must name an image once."""
    if not path.is_file():
        raise DataError(f"missing split list {path}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    seen: dict[str, int] = {}
    for image_id in ids:
        seen[image_id] = seen.get(image_id, 0) + 1
    repeated = [f"{image_id} ({n} times)" for image_id, n in seen.items() if n > 1]
    if repeated:
        raise DataError(
            f"voc: {path} (read for the {split} split) names {len(repeated)} id(s) more than "
            f"once: {_some(repeated)}. Each line of a list is one image; remove the repeated lines "
            f"(or restore the list from the dataset archive)")
    return ids


def voc_samples(raw: Path) -> dict[str, list[Sample]]:
    voc, sbd = raw / "VOCdevkit" / "VOC2012", raw / "benchmark_RELEASE" / "dataset"
    _require_dir(voc, "expected VOCdevkit/VOC2012 (PASCAL VOC 2012) under the raw folder")
    _require_dir(sbd, "expected benchmark_RELEASE/dataset (SBD) under the raw folder")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        _require_dir(voc / sub, "part of the VOC 2012 layout")
    _require_dir(sbd / "cls", "SBD's class labels (*.mat)")
    lists = voc / "ImageSets" / "Segmentation"
    voc_train = _read_ids(lists / "train.txt", "train")
    voc_val = _read_ids(lists / "val.txt", "val")
    # SBD's own train and val lists both feed the "aug" train set.
    sbd_ids = set(_read_ids(sbd / "train.txt", "train")) | set(_read_ids(sbd / "val.txt", "train"))
    val_set, voc_train_set = set(voc_val), set(voc_train)
    # SBD holds VOC val images, which the aug set leaves out by design; VOC's own train and val
    # lists are disjoint, and an id in both is a damaged list, not something to drop silently.
    shared = [i for i in voc_train if i in val_set]
    if shared:
        raise DataError(
            f"voc: {len(shared)} id(s) are in both the train list {lists / 'train.txt'} and the "
            f"val list {lists / 'val.txt'}: {_some(shared)}. A validation image must not be "
            f"trained on; remove each from one list (or restore both from the VOC 2012 archive)")
    aug = sorted((sbd_ids | voc_train_set) - val_set)

    def sample(image_id: str) -> Sample:
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        if image_id in voc_train_set or image_id in val_set:
            label = voc / "SegmentationClass" / f"{image_id}.png"
        else:
            label = sbd / "cls" / f"{image_id}.mat"
        if not image.is_file():
            raise DataError(f"label {label} has no image: expected {image}")
        if not label.is_file():
            raise DataError(f"image {image} has no label: expected {label}")
        return Sample(image_id, image, label)

    splits = {"train": [sample(i) for i in aug], "val": [sample(i) for i in sorted(voc_val)]}
    for split, samples in splits.items():
        if not samples:
            raise DataError(f"split {split!r} is empty: check the ImageSets and SBD lists under "
                            f"{raw}")
    return splits


# -- converting one sample (runs in worker processes) -----------------------------------------
def _open_image(path: Path, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # a truncated or corrupt file fails here, not later in a data loader
    except Exception as err:
        raise DataError(f"corrupt or truncated image {path}: {err}; re-extract it from the "
                        f"dataset archive") from None
    return image


def _read_label(path: Path) -> np.ndarray:
    if path.suffix == ".mat":
        # Lazy: only SBD's labels are .mat files, and scipy takes a while to import.
        from scipy.io import loadmat

        try:
            gt = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"]
            return np.asarray(gt.Segmentation, dtype=np.uint8)
        except Exception as err:
            raise DataError(f"unreadable SBD label {path}: {err!r}; expected a MATLAB file "
                            f"with GTcls.Segmentation") from None
    label = _open_image(path, path.read_bytes())
    if label.mode not in ("L", "P"):
        raise DataError(f"label {path} has mode {label.mode}; expected a single-channel 8-bit "
                        f"PNG (gray or palette)")
    return np.asarray(label)


def convert(sample: Sample, dataset: str) -> dict:
    """One shard row for `sample`; raises DataError naming the bad file."""
    data = sample.image.read_bytes()
    image = _open_image(sample.image, data)
    if image.mode != "RGB":
        raise DataError(f"image {sample.image} has mode {image.mode}; expected 8-bit RGB")
    raw = _read_label(sample.label)
    if raw.shape != (image.height, image.width):
        raise DataError(f"image {sample.image} is {image.width}x{image.height} but its label "
                        f"{sample.label} is {raw.shape[1]}x{raw.shape[0]}")
    table = cityscapes_lookup() if dataset == "cityscapes" else voc_lookup()
    train_ids, bad = apply_lookup(raw, table)
    if bad:
        raise DataError(f"label {sample.label} contains values {bad[:10]} that are not in the "
                        f"{dataset} label table")
    buffer = io.BytesIO()
    Image.fromarray(train_ids).save(buffer, format="PNG")
    classes = CITYSCAPES_CLASSES if dataset == "cityscapes" else VOC_CLASSES
    return {
        "id": sample.id,
        "image": data,
        "image_format": image.format.lower() if image.format else "unknown",
        "label": buffer.getvalue(),
        "height": image.height,
        "width": image.width,
        "histogram": histogram(train_ids, len(classes)),
    }


def _convert_star(args: tuple[Sample, str]) -> dict:
    return convert(*args)


# -- the stage --------------------------------------------------------------------------------
def prepare(dataset: str, raw: Path, out: Path, *, rows_per_shard: int = 500,
            rows_per_group: int = 2, workers: int | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> Manifest:
    """Prepare `raw` (a Cityscapes or VOC+SBD folder) into shards under `out`, atomically.

    Args:
        dataset: "cityscapes" or "voc".
        workers: processes decoding and checking images (default: all cores).
        progress: called as (split, done, total) after each image.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    raw, out = Path(raw), Path(out)
    _require_dir(raw, "the raw dataset folder (see README, 'Data')")
    splits = cityscapes_samples(raw) if dataset == "cityscapes" else voc_samples(raw)
    classes = CITYSCAPES_CLASSES if dataset == "cityscapes" else VOC_CLASSES
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    try:
        writer = ShardWriter(str(tmp), dataset=dataset, class_names=classes,
                             rows_per_shard=rows_per_shard, rows_per_group=rows_per_group)
        stats: dict = {}
        with get_context("fork").Pool(workers) as pool:
            for split, samples in splits.items():
                counts = np.zeros(len(classes) + 1, dtype=np.int64)

                def rows(split=split, samples=samples, counts=counts):
                    jobs = ((s, dataset) for s in samples)
                    for done, row in enumerate(pool.imap(_convert_star, jobs, chunksize=1), 1):
                        counts += row["histogram"]
                        if progress:
                            progress(split, done, len(samples))
                        yield row

                writer.write_split(split, rows(), total=len(samples))
                stats[split] = _class_stats(counts, classes, len(samples))
        writer.finish(stats)
        kinds = scene_kinds(raw, splits)
        if kinds:
            write_scene_kinds(tmp, kinds)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_manifest(str(out))


def scene_kinds(raw: Path, splits: dict[str, list[Sample]]) -> dict[str, str]:
    """"<split>/<id>" → scene kind of each prepared sample, from the synthetic set's META_FILE
    (none for real data). The file keys images by the raw set they came from, which for VOC is
    not the prepared split (voc_val is val; SBD and voc_train make train), so ids are matched."""
    meta = raw / META_FILE
    if not meta.is_file():
        return {}
    try:
        images = json.loads(meta.read_text())["images"]
        by_id = {key.rpartition("/")[2]: entry["kind"] for key, entry in images.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{meta} is damaged ({err!r}); generate the synthetic set again "
                        f"(dynroute data synth) or remove the file") from None
    return {f"{split}/{s.id}": by_id[s.id] for split, samples in splits.items()
            for s in samples if s.id in by_id}


def _class_stats(counts: np.ndarray, classes: tuple[str, ...], images: int) -> dict:
    labelled = int(counts[:-1].sum())
    return {
        "images": images,
        "labelled_pixels": labelled,
        "ignored_pixels": int(counts[-1]),
        "pixels": {name: int(c) for name, c in zip(classes, counts[:-1], strict=True)},
        "frequency": {name: round(float(c) / labelled, 6) if labelled else 0.0
                      for name, c in zip(classes, counts[:-1], strict=True)},
    }


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an old `out` only now."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def data_metrics(out: Path) -> dict:
    """The headline figures of a prepared dataset, for `dvc metrics show` / `dvc exp show`:
    dataset, class count and images per split. The detail (pixels and frequency per class,
    ignored pixels) stays in the dataset's class_stats.json (`shards.CLASS_STATS`), one column per
    class being too many for a table that compares experiments."""
    manifest = read_manifest(str(out))
    return {
        "dataset": manifest.dataset,
        "classes": manifest.num_classes,
        **{split: {"images": manifest.count(split)} for split in manifest.splits},
    }
