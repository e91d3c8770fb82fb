"""Decoding and augmentation of one sample: bytes → (image, label) tensors (docs/model.md §1, §9).

The network reads BGR images on the 0–255 scale with the pixel mean subtracted (std 1, §1). The
shards hold the dataset's own RGB PNG/JPEG bytes and an 8-bit label PNG of train ids, so every
sample goes through

    decode → [train: scale × s ∈ scales, flip p 0.5, pad to the crop (0 / 255), random crop]
           → BGR − mean → image (3, H, W) float32, label (H, W) int64

Training follows the reference recipe (§9): image bilinear, label nearest, padding by 0 for the raw
image (so −mean after normalisation) and 255 (ignore) for the label, at the bottom and right.
Evaluation keeps the full image and only subtracts the mean. Padding a batch to a multiple of 32 is
the batching code's job, not this module's.

Speed matters: this is the path that keeps a GPU fed. Scale and crop are done in one Pillow resize
of only the source region under the crop window (`box=`), which equals resizing the whole image and
cropping (up to rounding) at a fraction of the cost for the large scales. Everything is a pure
function of its inputs and a `numpy.random.Generator`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dynroute.models.stem import PIXEL_MEAN_BGR
from dynroute.platform.data.shards import IGNORE_INDEX

# The reference implementation's scale set (the paper says "0.5 to 2.0").
SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
FLIP_PROBABILITY = 0.5

_MEAN = np.asarray(PIXEL_MEAN_BGR, dtype=np.float32)  # (3,) BGR
# Pillow raises SyntaxError for some corrupt PNG chunks and EOFError for some truncated streams.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_LABEL_MODES = ("L", "P")  # 8-bit single channel; "P" keeps its indices (VOC's palette PNGs)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the training augmentation.

    `top`/`left` place the crop window in the scaled (and, if `flip`, flipped) image.
    """

    scale: float
    flip: bool
    top: int
    left: int


# ---------------------------------------------------------------------------------------------
# Decoding


def _open(data: bytes, *, id: str, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so truncated data fails here and not in a later resize
    except UnidentifiedImageError:
        raise ValueError(f"sample {id}: its {what} bytes are not a PNG or JPEG image; "
                         f"the shard may be corrupt, prepare the data again") from None
    except _DECODE_ERRORS as err:
        raise ValueError(f"sample {id}: its {what} bytes cannot be decoded ({err}); "
                         f"the shard may be corrupt, prepare the data again") from None
    return img


def _open_image(data: bytes, *, id: str) -> Image.Image:
    img = _open(data, id=id, what="image")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_label(data: bytes, *, id: str) -> Image.Image:
    img = _open(data, id=id, what="label")
    if img.mode not in _LABEL_MODES:
        raise ValueError(f"sample {id}: the label PNG has mode {img.mode!r}; expected 8-bit "
                         f"single channel ({' or '.join(_LABEL_MODES)}) of train ids")
    return img


def _check_sizes(image: tuple[int, int], label: tuple[int, int], *, id: str) -> None:
    if image != label:
        raise ValueError(f"sample {id}: image is {image[0]}x{image[1]} but its label is "
                         f"{label[0]}x{label[1]} (HxW); prepare the data again")


def decode_image(data: bytes, *, id: str = "?") -> np.ndarray:
    """Decode PNG/JPEG bytes (RGB, gray or palette) to a read-only (H, W, 3) uint8 BGR array.

    Raises:
        ValueError: naming `id`, when the bytes are not a decodable image.
    """
    img = _open_image(data, id=id)
    # Pillow's packer writes BGR directly: one pass, no strided channel swap afterwards.
    return np.frombuffer(img.tobytes("raw", "BGR"), np.uint8).reshape(img.height, img.width, 3)


def decode_label(data: bytes, *, id: str = "?") -> np.ndarray:
    """Decode an 8-bit label PNG (gray or palette indices) to a read-only (H, W) uint8 array."""
    return np.asarray(_open_label(data, id=id))


# ---------------------------------------------------------------------------------------------
# Geometry


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(H, W) after scaling by `scale`, rounded half up as the reference does, at least 1."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sample_augmentation(*, height: int, width: int, crop: tuple[int, int] | None,
                        rng: np.random.Generator, scales: Sequence[float] = SCALES,
                        flip: bool = True) -> AugmentParams:
    """Draw scale, flip and crop offset for an image of `height` × `width`.

    Always draws scale, flip, top, left in that order, so the stream does not depend on `flip`.
    """
    if not scales:
        raise ValueError("scales is empty; give at least one factor, e.g. (1.0,)")
    scale = float(scales[int(rng.integers(len(scales)))])
    flipped = bool(rng.random() < FLIP_PROBABILITY) and flip
    sh, sw = scaled_size(height, width, scale)
    ch, cw = crop if crop is not None else (sh, sw)
    top = int(rng.integers(max(sh - ch, 0) + 1))
    left = int(rng.integers(max(sw - cw, 0) + 1))
    return AugmentParams(scale=scale, flip=flipped, top=top, left=left)


def _window(image: Image.Image, label: Image.Image, params: AugmentParams,
            crop: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The scaled, flipped pixels under the crop window, and the output (crop) size."""
    width, height = image.size
    sh, sw = scaled_size(height, width, params.scale)
    ch, cw = crop if crop is not None else (sh, sw)
    if not (0 <= params.top <= max(sh - ch, 0) and 0 <= params.left <= max(sw - cw, 0)):
        raise ValueError(f"crop offset ({params.top}, {params.left}) is outside the "
                         f"{sh}x{sw} scaled image for crop {ch}x{cw}")
    h, w = min(ch, sh - params.top), min(cw, sw - params.left)
    # A window at `left` of the flipped image is the mirrored window of the unflipped one.
    x0 = sw - params.left - w if params.flip else params.left
    y0 = params.top
    if (sh, sw) == (height, width):
        box = (x0, y0, x0 + w, y0 + h)
        img, lab = image.crop(box), label.crop(box)
    else:
        # Source coordinates of the window: resizing only this region gives the same pixels as
        # scaling the whole image and cropping, since Pillow clips filters at the image border.
        fx, fy = width / sw, height / sh
        box_f = (x0 * fx, y0 * fy, (x0 + w) * fx, (y0 + h) * fy)
        img = image.resize((w, h), Image.Resampling.BILINEAR, box=box_f)
        lab = label.resize((w, h), Image.Resampling.NEAREST, box=box_f)
    img_a, lab_a = np.asarray(img), np.asarray(lab)  # (h, w, 3), (h, w)
    if params.flip:
        img_a, lab_a = img_a[:, ::-1], lab_a[:, ::-1]
    return img_a, lab_a, (ch, cw)


def _to_tensors(image: np.ndarray, label: np.ndarray, size: tuple[int, int], *,
                rgb: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w, 3) uint8 and (h, w) → mean-subtracted BGR (3, H, W) float32 and (H, W) int64,
    padded at the bottom/right by raw 0 (→ −mean) and by the ignore label."""
    h, w = label.shape
    out_h, out_w = size
    out = np.empty((3, out_h, out_w), np.float32)
    for c in range(3):
        src = image[:, :, 2 - c] if rgb else image[:, :, c]
        np.subtract(src, _MEAN[c], out=out[c, :h, :w], dtype=np.float32)
    if h < out_h:
        out[:, h:, :] = -_MEAN[:, None, None]
    if w < out_w:
        out[:, :h, w:] = -_MEAN[:, None, None]
    lab = np.full((out_h, out_w), IGNORE_INDEX, np.int64)
    lab[:h, :w] = label
    return torch.from_numpy(out), torch.from_numpy(lab)


# ---------------------------------------------------------------------------------------------
# Public transforms over numpy arrays


def _as_images(image: np.ndarray, label: np.ndarray) -> tuple[Image.Image, Image.Image]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 BGR, got {image.shape} {image.dtype}")
    if label.shape != image.shape[:2] or label.dtype != np.uint8:
        raise ValueError(f"label must be (H, W) uint8 matching the image {image.shape[:2]}, "
                         f"got {label.shape} {label.dtype}")
    # Pillow treats the BGR array as an "RGB" container: resizing does not care about order.
    return Image.fromarray(np.ascontiguousarray(image)), Image.fromarray(label)


def apply_augmentation(image: np.ndarray, label: np.ndarray, params: AugmentParams, *,
                       crop: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one drawn augmentation.

    Args:
        image: (H, W, 3) uint8 BGR.
        label: (H, W) uint8 train ids, 255 = ignore.
        params: from `sample_augmentation`.
        crop: output (H, W); None keeps the whole scaled image.

    Returns:
        image (3, crop H, crop W) float32 BGR − mean; label (crop H, crop W) int64.
    """
    img, lab = _as_images(image, label)
    img_a, lab_a, size = _window(img, lab, params, crop)
    return _to_tensors(img_a, lab_a, size, rgb=False)


def augment_train(image: np.ndarray, label: np.ndarray, *, crop: tuple[int, int] | None,
                  rng: np.random.Generator, scales: Sequence[float] = SCALES,
                  flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation (docs/model.md §9): random scale, flip, pad, crop; then BGR − mean.

    Same arguments and outputs as `apply_augmentation`; deterministic given `rng`'s state.
    """
    params = sample_augmentation(height=image.shape[0], width=image.shape[1], crop=crop,
                                 rng=rng, scales=scales, flip=flip)
    return apply_augmentation(image, label, params, crop=crop)


def transform_eval(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: full image, BGR − mean → (3, H, W) float32 and (H, W) int64."""
    img, lab = _as_images(image, label)
    return _to_tensors(np.asarray(img), np.asarray(lab), label.shape, rgb=False)


# ---------------------------------------------------------------------------------------------
# From shard bytes (what the dataset calls: skips the BGR round trip through numpy)


def train_sample(image: bytes, label: bytes, *, id: str, crop: tuple[int, int] | None,
                 rng: np.random.Generator, scales: Sequence[float] = SCALES,
                 flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment_train(decode_image(image), decode_label(label), ...)`, without the extra copies."""
    img, lab = _open_image(image, id=id), _open_label(label, id=id)
    _check_sizes((img.height, img.width), (lab.height, lab.width), id=id)
    params = sample_augmentation(height=img.height, width=img.width, crop=crop, rng=rng,
                                 scales=scales, flip=flip)
    img_a, lab_a, size = _window(img, lab, params, crop)
    return _to_tensors(img_a, lab_a, size, rgb=True)


def eval_sample(image: bytes, label: bytes, *, id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`transform_eval(decode_image(image), decode_label(label))`, without the extra copies."""
    img, lab = _open_image(image, id=id), _open_label(label, id=id)
    _check_sizes((img.height, img.width), (lab.height, lab.width), id=id)
    return _to_tensors(np.asarray(img), np.asarray(lab), (img.height, img.width), rgb=True)
