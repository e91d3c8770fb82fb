"""Label tables: raw dataset labels → train ids (0..K-1, 255 = ignore).

Cityscapes uses the label table of `cityscapesscripts`, the field's standard: 34 label ids map to
19 train ids or to ignore. VOC and SBD store class indices 0..20 directly (VOC marks object
boundaries with 255, which stays ignore).
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

from dynroute.platform.data.shards import IGNORE_INDEX

INVALID = -1  # in a lookup table: a raw value that is not in the dataset's table

CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    label.name for label in sorted(
        (lb for lb in _CITYSCAPES_LABELS if 0 <= lb.trainId < IGNORE_INDEX),
        key=lambda lb: lb.trainId))

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def cityscapes_lookup() -> np.ndarray:
    """(256,) int16: Cityscapes label id → train id, 255 for ignore, INVALID for unknown ids."""
    table = np.full(256, INVALID, dtype=np.int16)
    for label in _CITYSCAPES_LABELS:
        if 0 <= label.id < 256:  # id -1 (license plate) cannot occur in an 8-bit PNG
            table[label.id] = label.trainId if 0 <= label.trainId < IGNORE_INDEX else IGNORE_INDEX
    return table


def voc_lookup() -> np.ndarray:
    """(256,) int16: VOC/SBD class index → train id (identity), 255 kept, others INVALID."""
    table = np.full(256, INVALID, dtype=np.int16)
    table[: len(VOC_CLASSES)] = np.arange(len(VOC_CLASSES))
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def apply_lookup(raw: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Map a uint8 label map; returns (train ids as uint8, sorted raw values not in the table)."""
    mapped = table[raw]
    bad = sorted(int(v) for v in np.unique(raw[mapped == INVALID]))
    return mapped.astype(np.uint8), bad


def histogram(train_ids: np.ndarray, num_classes: int) -> list[int]:
    """Pixels per train id 0..K-1, then the ignored pixels (K+1 entries)."""
    counts = np.bincount(train_ids.ravel(), minlength=256)
    return [int(c) for c in counts[:num_classes]] + [int(counts[IGNORE_INDEX])]
