"""Synthetic data in the real on-disk formats of Cityscapes and PASCAL VOC 2012 + SBD.

The real datasets need registration to download, so the embedded default is synthetic data that
the real converters read unchanged. Scenes (`synth_scenes`) come in three scale kinds, `small`,
`large` and `mixed`, because the network routes each image by the scale of its content (Li et
al., "Learning Dynamic Routing for Semantic Segmentation", CVPR 2020, §3.2).

Cityscapes, under the output root:

    leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png   RGB, 8 bit
    gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png    label ids, 8 bit

PASCAL VOC 2012 and SBD, under the output root:

    VOCdevkit/VOC2012/JPEGImages/{id}.jpg                  every id, VOC and SBD
    VOCdevkit/VOC2012/SegmentationClass/{id}.png           palette PNG, 0..20 and a 255 band
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    benchmark_RELEASE/dataset/cls/{id}.mat                 struct GTcls, no 255
    benchmark_RELEASE/dataset/img/{id}.jpg                 the same bytes as JPEGImages/{id}.jpg
    benchmark_RELEASE/dataset/{train,val}.txt

Both write `synth_meta.json` at the root with the scale kind of every image, keyed
"<split>/<image id>" (Cityscapes splits train, val, test; VOC sets voc_train, voc_val, sbd_train,
sbd_val, an id appearing under each set it belongs to).

Every image draws from its own generator, seeded by (seed, dataset, split, index) for Cityscapes
and (seed, dataset, id) for VOC, so files are byte-identical for a seed whatever the order of
generation. The whole tree is written to a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image
from scipy.ndimage import binary_dilation

from .synth_scenes import (
    KINDS,
    cityscapes_looks,
    cityscapes_scene,
    render,
    voc_colormap,
    voc_looks,
    voc_scene,
)

__all__ = ["CITYSCAPES_CITIES", "DATASETS", "KINDS", "META_FILE", "MIN_SIDE", "VOC_CLASSES",
           "synthesize", "voc_colormap"]

DATASETS = ("cityscapes", "voc")
MIN_SIDE = 32  # the network downsamples by 32
META_FILE = "synth_meta.json"
CITYSCAPES_CITIES = {  # real city names of each split
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bonn"),
}
CITYSCAPES_FRAME = 19  # gtFine annotates the 20th frame of each 30-frame snippet
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
VOC_VOID = 255
VOC_YEARS = (2007, 2008, 2009, 2010, 2011)
SBD_TRAIN_PER_VOC_TRAIN = 6  # real SBD: 8498 train ids for VOC's 1464
SBD_VAL_PER_VOC_VAL = 2  # real SBD: 2857 val ids for VOC's 1449
VOC_SIZE_JITTER = 0.2  # real VOC images are about 500x375 but vary
JPEG_QUALITY = 90
# The first 116 bytes of a MAT file are free text; scipy puts the time there, which would make
# equal seeds give different bytes.
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by dynroute.pipelines.synth".ljust(116, b" ")

# Stream numbers that keep the generators of different purposes apart.
_DATASET_CODE = {"cityscapes": 1, "voc": 2}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_KIND_STREAM, _ID_STREAM = 1000, 1001

Progress = Callable[[int, int], None]


def synthesize(dataset: str, out: Path, *, train: int, val: int, height: int, width: int,
               seed: int = 0, kinds: Mapping[str, float] | None = None,
               sbd_train: int | None = None, sbd_val: int | None = None, test: int = 0,
               size_jitter: float | None = None, progress: Progress | None = None,
               ) -> dict[str, Any]:
    """Write a synthetic dataset in the real on-disk format of `dataset` to `out`.

    Args:
        dataset: "cityscapes" or "voc".
        out: the dataset root; replaced only once the new tree is complete.
        train, val: images per split (for VOC, the VOC 2012 segmentation sets).
        height, width: image size in pixels, each >= 32 (VOC: the centre of the size range).
        seed: equal seeds give byte-identical files.
        kinds: relative weights of the scale kinds small/large/mixed (default equal); each split
            (VOC: the pool of distinct ids) gets these fractions, rounded, in a seeded order.
        sbd_train, sbd_val: SBD set sizes (VOC only); default 6 x train and 2 x val.
        test: Cityscapes test images (labelled like the others).
        size_jitter: each side varies by up to this fraction per image; default 0.2 for VOC and 0
            for Cityscapes, whose frames all have one size.
        progress: called as progress(done, total) after each image.

    Returns:
        {"dataset", "out", "seed", "images" (distinct images), "splits" (name → count; VOC adds
        "aug_train" = |SBD train ∪ SBD val ∪ VOC train − VOC val|), "kinds" (kind → count)}.
    """
    weights = _check(dataset, train=train, val=val, height=height, width=width, seed=seed,
                     kinds=kinds, sbd_train=sbd_train, sbd_val=sbd_val, test=test,
                     size_jitter=size_jitter)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; give a folder path to write into")
    common: dict[str, Any] = {"height": height, "width": width, "seed": seed, "weights": weights,
                              "progress": progress}
    write: Callable[[Path], dict[str, Any]]
    if dataset == "cityscapes":
        write = partial(_write_cityscapes, counts={"train": train, "val": val, "test": test},
                        jitter=size_jitter or 0.0, **common)
    else:
        sbd_train = SBD_TRAIN_PER_VOC_TRAIN * train if sbd_train is None else sbd_train
        sbd_val = SBD_VAL_PER_VOC_VAL * val if sbd_val is None else sbd_val
        write = partial(_write_voc, sets=_voc_sets(train, val, sbd_train, sbd_val, seed),
                        jitter=VOC_SIZE_JITTER if size_jitter is None else size_jitter, **common)
    summary = _write_atomically(out, write)
    return {"dataset": dataset, "out": str(out), "seed": seed, **summary}


def _check(dataset: str, *, train: int, val: int, height: int, width: int, seed: int,
           kinds: Mapping[str, float] | None, sbd_train: int | None, sbd_val: int | None,
           test: int, size_jitter: float | None) -> dict[str, float]:
    """Raise ValueError for a bad argument; return the kind weights, normalised."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    for name, side in (("height", height), ("width", width)):
        if side < MIN_SIDE:
            raise ValueError(f"{name} {side} is below the minimum of {MIN_SIDE} pixels")
    counts = {"train": train, "val": val, "test": test, "sbd_train": sbd_train,
              "sbd_val": sbd_val}
    for name, count in counts.items():
        if count is not None and count < 0:
            raise ValueError(f"{name}={count} is negative; image counts must be >= 0")
    if dataset == "voc" and test:
        raise ValueError("VOC has no labelled test set; leave test=0")
    if dataset == "cityscapes" and (sbd_train is not None or sbd_val is not None):
        raise ValueError("sbd_train and sbd_val are for dataset 'voc' only")
    if seed < 0:
        raise ValueError(f"seed {seed} is negative; use a seed >= 0")
    if size_jitter is not None and not 0 <= size_jitter < 1:
        raise ValueError(f"size_jitter {size_jitter} is outside [0, 1)")
    weights = dict.fromkeys(KINDS, 1.0) if kinds is None else dict(kinds)
    unknown = sorted(set(weights) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown scale kind(s) {', '.join(map(repr, unknown))}; "
                         f"choose from: {', '.join(KINDS)}")
    if any(not w >= 0 for w in weights.values()):  # `not >=` also catches NaN
        raise ValueError(f"kind weights {weights} must be >= 0")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"kind weights {weights} sum to 0; give one kind a positive weight")
    return {k: weights.get(k, 0.0) / total for k in KINDS}


def _write_atomically(out: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run write(tmp) on a temporary sibling of `out`, then put it in `out`'s place.

    On any failure the temporary folder goes and `out` stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had our process id
    try:
        tmp.mkdir()
        summary = write(tmp)
        # Move the old tree aside rather than delete it first, so a failed rename can undo it.
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return summary


def _assign_kinds(n: int, weights: Mapping[str, float], rng: np.random.Generator) -> list[str]:
    """n kinds in the given fractions (largest remainder rounding), in a seeded order."""
    shares = np.array([weights[k] for k in KINDS]) * n
    counts = np.floor(shares).astype(int)
    short = n - int(counts.sum())
    counts[np.argsort(counts - shares, kind="stable")[:short]] += 1
    return [str(k) for k in rng.permutation(np.repeat(KINDS, counts))]


def _jittered(rng: np.random.Generator, height: int, width: int, jitter: float,
              ) -> tuple[int, int]:
    """The size of one image: each side scaled by up to ±jitter, never below MIN_SIDE."""
    if not jitter:
        return height, width
    h, w = (max(MIN_SIDE, round(side * rng.uniform(1 - jitter, 1 + jitter)))
            for side in (height, width))
    return h, w


def _write_png(image: np.ndarray, path: Path, *, palette: np.ndarray | None = None) -> None:
    """An 8-bit RGB, grey or (with `palette`) palette PNG."""
    img = Image.fromarray(image)
    if palette is not None:
        img.putpalette(palette.tobytes())  # turns the "L" image into "P"
    # RGB noise barely compresses, so more zlib effort costs time and saves ~5%.
    img.save(path, compress_level=1 if image.ndim == 3 else 6)


def _write_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, quality=JPEG_QUALITY)


def _write_mat(path: Path, segmentation: np.ndarray) -> None:
    """An SBD GTcls struct: Segmentation, per-class Boundaries (20x1 cell of sparse HxW) and
    CategoriesPresent (column vector, background excluded)."""
    edge = _edges(segmentation)
    boundaries = np.empty((len(VOC_CLASSES) - 1, 1), dtype=object)
    for c in range(1, len(VOC_CLASSES)):
        boundaries[c - 1, 0] = scipy.sparse.csc_matrix(edge & (segmentation == c))
    present = np.unique(segmentation)
    gtcls = {"Segmentation": segmentation, "Boundaries": boundaries,
             "CategoriesPresent": present[present > 0].astype(np.uint8)[:, None]}
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": gtcls}, do_compression=True)
    data = bytearray(buf.getvalue())
    data[:len(MAT_HEADER)] = MAT_HEADER
    path.write_bytes(bytes(data))


def _edges(regions: np.ndarray) -> np.ndarray:
    """Pixels whose region differs from a 4-neighbour's (both sides of each boundary)."""
    edge = np.zeros(regions.shape, bool)
    down = regions[1:] != regions[:-1]
    right = regions[:, 1:] != regions[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    return edge


def _voc_label(label: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """VOC's SegmentationClass: `label` with 255 on a ~4 px band around every object, between
    touching objects too (background regions among themselves get none)."""
    objects = np.where(label > 0, instance, 0)
    band = binary_dilation(_edges(objects))  # 2 px of edge grown by 1 px on each side
    return np.where(band, np.uint8(VOC_VOID), label)


def _write_cityscapes(root: Path, *, counts: Mapping[str, int], height: int, width: int,
                      seed: int, weights: Mapping[str, float], jitter: float,
                      progress: Progress | None) -> dict[str, Any]:
    total, done = sum(counts.values()), 0
    meta: dict[str, dict[str, Any]] = {}
    code = _DATASET_CODE["cityscapes"]
    for split, n in counts.items():
        cities = CITYSCAPES_CITIES[split]
        kinds = _assign_kinds(n, weights, np.random.default_rng(
            [seed, code, _SPLIT_CODE[split], _KIND_STREAM]))
        for i, kind in enumerate(kinds):
            city = cities[i % len(cities)]
            image_id = f"{city}_{i // len(cities):06d}_{CITYSCAPES_FRAME:06d}"
            rng = np.random.default_rng([seed, code, _SPLIT_CODE[split], i])
            h, w = _jittered(rng, height, width, jitter)
            scene = cityscapes_scene(rng, kind, h, w)
            image = render(scene, cityscapes_looks(), rng)
            for folder, suffix, array in (("leftImg8bit", "leftImg8bit", image),
                                          ("gtFine", "gtFine_labelIds", scene.label)):
                path = root / folder / split / city / f"{image_id}_{suffix}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_png(array, path)
            meta[f"{split}/{image_id}"] = {"kind": kind, "height": h, "width": w}
            done += 1
            if progress is not None:
                progress(done, total)
    _write_meta(root, "cityscapes", seed, height, width, meta)
    return {"images": total, "splits": dict(counts), "kinds": _kind_counts(meta.values())}


def _voc_sets(train: int, val: int, sbd_train: int, sbd_val: int, seed: int,
              ) -> dict[str, list[str]]:
    """VOC and SBD id lists that overlap like the real ones.

    SBD train takes half of VOC train and a quarter of VOC val (the reason the "aug" train split
    is SBD train + val + VOC train − VOC val); SBD val a quarter of each; the rest of SBD is ids
    in no VOC segmentation set."""
    a = min(train // 2, sbd_train)  # VOC train ids in SBD train
    b = min(math.ceil(val / 4), sbd_train - a)  # VOC val ids in SBD train
    c = min(train // 4, sbd_val)  # VOC train ids in SBD val
    d = min(val // 4, sbd_val - c)  # VOC val ids in SBD val
    fresh_train, fresh_val = sbd_train - a - b, sbd_val - c - d
    ids = _voc_ids(train + val + fresh_train + fresh_val, seed)  # a random sample, random order
    voc_train, voc_val = ids[:train], ids[train:train + val]
    fresh = ids[train + val:]
    sets = {
        "voc_train": voc_train,
        "voc_val": voc_val,
        "sbd_train": voc_train[:a] + voc_val[:b] + fresh[:fresh_train],
        "sbd_val": voc_train[a:a + c] + voc_val[b:b + d] + fresh[fresh_train:],
    }
    return {name: sorted(names) for name, names in sets.items()}


def _voc_ids(n: int, seed: int) -> list[str]:
    """n distinct ids in VOC's style, 2008_000123: a year 2007-2011 and a 6-digit number."""
    per_year = max(10_000, 2 * n)  # numbers stay sparse like the real ones
    rng = np.random.default_rng([seed, _DATASET_CODE["voc"], _ID_STREAM])
    picks = rng.choice(len(VOC_YEARS) * per_year, n, replace=False)
    return [f"{VOC_YEARS[p // per_year]}_{p % per_year:06d}" for p in picks]


def _write_voc(root: Path, *, sets: Mapping[str, list[str]], height: int, width: int,
               seed: int, weights: Mapping[str, float], jitter: float, progress: Progress | None,
               ) -> dict[str, Any]:
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    folders = {"jpeg": voc / "JPEGImages", "png": voc / "SegmentationClass",
               "lists": voc / "ImageSets" / "Segmentation", "mat": sbd / "cls", "img": sbd / "img"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    in_voc = set(sets["voc_train"]) | set(sets["voc_val"])
    in_sbd = set(sets["sbd_train"]) | set(sets["sbd_val"])
    ids = sorted(in_voc | in_sbd)
    code = _DATASET_CODE["voc"]
    kinds = _assign_kinds(len(ids), weights, np.random.default_rng([seed, code, _KIND_STREAM]))
    info: dict[str, dict[str, Any]] = {}
    for done, (image_id, kind) in enumerate(zip(ids, kinds, strict=True), start=1):
        year, number = map(int, image_id.split("_"))
        rng = np.random.default_rng([seed, code, year, number])
        h, w = _jittered(rng, height, width, jitter)
        scene = voc_scene(rng, kind, h, w)
        jpeg = folders["jpeg"] / f"{image_id}.jpg"
        _write_jpeg(render(scene, voc_looks(), rng), jpeg)
        if image_id in in_voc:
            _write_png(_voc_label(scene.label, scene.instance), folders["png"] / f"{image_id}.png",
                       palette=voc_colormap())
        if image_id in in_sbd:
            _write_mat(folders["mat"] / f"{image_id}.mat", scene.label)
            shutil.copyfile(jpeg, folders["img"] / f"{image_id}.jpg")
        info[image_id] = {"kind": kind, "height": h, "width": w}
        if progress is not None:
            progress(done, len(ids))
    lists = {folders["lists"] / "train.txt": sets["voc_train"],
             folders["lists"] / "val.txt": sets["voc_val"],
             folders["lists"] / "trainval.txt": sorted(in_voc),
             sbd / "train.txt": sets["sbd_train"], sbd / "val.txt": sets["sbd_val"]}
    for path, names in lists.items():
        path.write_text("".join(f"{n}\n" for n in names))
    meta = {f"{name}/{i}": info[i] for name, names in sets.items() for i in names}
    _write_meta(root, "voc", seed, height, width, meta)
    aug = (in_sbd | set(sets["voc_train"])) - set(sets["voc_val"])
    splits = {name: len(names) for name, names in sets.items()} | {"aug_train": len(aug)}
    return {"images": len(ids), "splits": splits, "kinds": _kind_counts(info.values())}


def _kind_counts(entries: Any) -> dict[str, int]:
    counts = dict.fromkeys(KINDS, 0)
    for entry in entries:
        counts[entry["kind"]] += 1
    return counts


def _write_meta(root: Path, dataset: str, seed: int, height: int, width: int,
                images: Mapping[str, Any]) -> None:
    meta = {"dataset": dataset, "seed": seed, "height": height, "width": width,
            "images": dict(images)}
    (root / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
