"""Prediction files the official tools read unchanged (evaluation.py writes them; predict.py
uses the Cityscapes and VOC colours).

- "cityscapes": `{id}_pred.png`, an 8-bit PNG of Cityscapes *label ids* (train id → label id by
  the official table). The official matcher (`getPrediction`) looks for exactly one file matching
  `{city}_{seq}_{frame}*.png` under the results root, and its command-line mode sorts files whose
  path contains "pred" into the prediction list, so `{id}_pred.png` satisfies both; keep no other
  PNG with that prefix in the folder.
- "voc": `{id}.png`, a palette PNG of class indices with the VOC colormap (the devkit's layout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS
from PIL import Image

from dynroute.platform.data.shards import IGNORE_INDEX

PredictionFormat = Literal["cityscapes", "voc"]


def cityscapes_label_ids() -> np.ndarray:
    """(256,) uint8: train id → Cityscapes label id (the official table); 0 elsewhere."""
    table = np.zeros(256, dtype=np.uint8)
    for label in _evaluated_cityscapes_labels():
        table[label.trainId] = label.id
    return table


def cityscapes_colours() -> np.ndarray:
    """(256, 3) uint8: train id → the official Cityscapes colour; black elsewhere."""
    table = np.zeros((256, 3), dtype=np.uint8)
    for label in _evaluated_cityscapes_labels():
        table[label.trainId] = label.color
    return table


def _evaluated_cityscapes_labels() -> list:
    """The official table's labels that have a train id (the 19 classes evaluated)."""
    return [label for label in _CITYSCAPES_LABELS
            if 0 <= label.trainId < IGNORE_INDEX and not label.ignoreInEval]


def voc_palette() -> list[int]:
    """The PASCAL VOC colormap, flat [r, g, b] × 256 (bits of the index spread over r, g, b)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= (c & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_prediction(pred: np.ndarray, sample_id: str, out: Path, fmt: PredictionFormat,
                     lookup: np.ndarray | None) -> None:
    """Write one image's prediction (H, W) of train ids into `out` (atomically); `lookup` is
    `cityscapes_label_ids()` for the "cityscapes" format."""
    if "/" in sample_id or "\\" in sample_id or sample_id.startswith("."):
        raise ValueError(f"sample id {sample_id!r} cannot name a prediction file")
    if fmt == "cityscapes":
        assert lookup is not None
        image, name = Image.fromarray(lookup[pred]), f"{sample_id}_pred.png"
    else:
        image, name = Image.fromarray(pred), f"{sample_id}.png"
        image.putpalette(voc_palette())
    tmp = out / f".{name}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, out / name)
