"""Prediction on image files: `dynroute predict --model models:/NAME@ALIAS IMAGES…`.

Per image: a colour mask (Cityscapes train-id colours, or a VOC palette PNG), a drawing of the
route that image took on the routing lattice, and in `predictions.json` its size, real GFLOPs at
that size and its open and skipped paths. Every image is decoded in full before any inference,
so a missing, truncated or corrupt file fails the command before anything is written, and each
output file appears whole (a temporary name beside it, then a rename) or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dynroute.models.stem import normalize_bgr
from dynroute.platform.device import fast_path
from dynroute.platform.evaluate.evaluation import infer
from dynroute.platform.evaluate.plots import plot_route, plot_taken_route, taken_route
from dynroute.platform.evaluate.prediction_files import cityscapes_colours, voc_palette
from dynroute.platform.files import replaced_whole, write_json_atomic


class PredictError(ValueError):
    """A prediction cannot run: a bad image, dataset or class count."""



CLASSES = {"cityscapes": 19, "voc": 21}


def _colour_mask(pred: np.ndarray, dataset: str) -> Image.Image:
    """(H, W) class indices → an RGB image (Cityscapes) or a VOC-palette PNG image."""
    if dataset == "cityscapes":
        return Image.fromarray(cityscapes_colours()[pred])

    image = Image.fromarray(pred)
    image.putpalette(voc_palette())
    return image


def _open_image(path: Path) -> Image.Image:
    """Open (lazily) an image file, with a clear error when it is missing or not an image."""
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist; check the path")
    if not path.is_file():
        raise PredictError(f"image {path} is not a file; pass PNG or JPEG files")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise PredictError(f"image {path} is not a PNG or JPEG image Pillow can read") from None
    except OSError as err:
        raise PredictError(f"cannot read image {path}: {err}") from None


def _decode(path: Path) -> np.ndarray:
    """An image file decoded in full → (H, W, 3) uint8 RGB; a truncated or corrupt file fails
    here with an error naming it."""
    with _open_image(path) as image:
        try:
            return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise PredictError(f"image {path} cannot be decoded ({err}): it is truncated or "
                               f"corrupt; copy it again or leave it out") from None


def load_image(path: Path) -> torch.Tensor:
    """An image file → the network's input (1, 3, H, W) float32: BGR, 0–255, mean subtracted,
    as the dataset prepares evaluation images (augment.eval_sample)."""
    rgb = _decode(path)  # (H, W, 3) uint8
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).permute(2, 0, 1)  # (3, H, W)
    return normalize_bgr(bgr.float()).unsqueeze(0)  # (1, 3, H, W)


@dataclass(frozen=True)
class ImagePrediction:
    """What `predict` wrote for one image."""

    image: str
    height: int
    width: int
    gflops: float  # real, analytic, at the image's own size
    mask: str  # file names inside the output folder
    route: str
    valid_route: bool  # the open paths form a valid Route (no skipped cell)
    open_paths: tuple[str, ...]
    skipped_cells: tuple[str, ...]
    decoder_scales: tuple[int, ...]


@dataclass(frozen=True)
class Prediction:
    """A prediction run over image files."""

    model: str
    dataset: str
    images: tuple[ImagePrediction, ...]

    def to_dict(self) -> dict:
        return {"model": self.model, "dataset": self.dataset,
                "images": [{k: list(v) if isinstance(v, tuple) else v
                            for k, v in asdict(p).items()} for p in self.images]}


PREDICTIONS_FILE = "predictions.json"


def _unique_stems(images: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in images:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _cannot_write(path: Path, err: OSError) -> PredictError:
    return PredictError(f"cannot write {path}: {err.strerror or err}; free space in "
                        f"{path.parent} or choose another --out (the files already written "
                        f"there are whole)")


@contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """`files.replaced_whole`, with the system refusing the write (a full disk, a read-only
    folder: an OSError with an errno) told as an error naming the file and what to do."""
    try:
        with replaced_whole(path) as tmp:
            yield tmp
    except OSError as err:
        if err.errno is None:  # not the storage: an encoder's own error
            raise
        raise _cannot_write(path, err) from None


def predict(network, images: Sequence[str | os.PathLike], out: str | os.PathLike, *,
            dataset: str, model: str = "", fast: bool = True) -> Prediction:
    """Segment image files with hard routing; write masks, route drawings and a JSON summary.

    Per image `<stem>`: `<stem>_mask.png` (Cityscapes colours of the 19 train ids, or a VOC
    palette PNG of the 21 classes) and `<stem>_route.png` (the route this image took on the
    lattice); for the run, `predictions.json` (per image: size, real GFLOPs at that size, open
    paths, skipped cells). Repeated stems get `-2`, `-3`, … suffixes.

    Args:
        network: a `DynamicRoutingNetwork` (put in eval mode here, its mode restored after).
        images: PNG or JPEG files, read as RGB.
        out: the output folder (created).
        dataset: "cityscapes" or "voc": the colours, and the class count the network must have.
        model: where the network came from, recorded in the JSON.
        fast: the device's measured fast path (fast_path.py: channels-last, folded BN); False:
            plain.

    Returns:
        What was written.

    Raises:
        FileNotFoundError, PredictError: a missing or unreadable image (checked for all images
            before any inference), an unknown dataset or a network of another class count.
    """
    if dataset not in CLASSES:
        raise PredictError(f"dataset {dataset!r}: choose one of {', '.join(CLASSES)}")
    if network.num_classes != CLASSES[dataset]:
        raise PredictError(f"the network predicts {network.num_classes} classes but {dataset} "
                            f"has {CLASSES[dataset]}; pass the dataset the model was trained on")
    paths = [Path(p) for p in images]
    if not paths:
        raise PredictError("no images given; pass one or more PNG or JPEG files")
    for path in paths:  # decoded in full: a truncated file fails before anything is written
        _decode(path)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(out, err) from None
    device = next(network.parameters()).device
    rows = []
    was_training = network.training
    network.eval()
    layout = fast_path.for_inference(device, fast=fast)
    runner = layout.inference_network(network)  # a folded copy on the fast path
    try:
        for path, stem in zip(paths, _unique_stems(paths), strict=True):
            image = layout.images(load_image(path).to(device))  # (1, 3, H, W)
            height, width = image.shape[-2:]
            with torch.inference_mode():
                result = infer(runner, image)
            pred = result.logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()  # (H, W)
            gates = result.passes[0].gates
            gflops = float(network.cost_model(height, width).real(gates)[0]) / 1e9
            taken = taken_route(network.route, gates, threshold=network.closed_threshold)
            mask_name, route_name = f"{stem}_mask.png", f"{stem}_route.png"
            with _written_whole(out / mask_name) as tmp:
                _colour_mask(pred, dataset).save(tmp, format="PNG")
            route = taken.as_route(name=stem)
            title = f"{path.name}: {gflops:.4g} GFLOPs at {height}x{width}"
            with _written_whole(out / route_name) as tmp:
                if route is not None:
                    plot_route(route, tmp, title=title)
                else:
                    plot_taken_route(taken, tmp, title=title)
            rows.append(ImagePrediction(
                image=str(path), height=int(height), width=int(width), gflops=gflops,
                mask=mask_name, route=route_name, valid_route=route is not None,
                open_paths=tuple(str(p) for p in sorted(taken.open_paths)),
                skipped_cells=tuple(f"{r}:{k}" for r, k in sorted(taken.skipped)),
                decoder_scales=taken.decoder_scales))
    finally:
        network.train(was_training)
    prediction = Prediction(model=model, dataset=dataset, images=tuple(rows))
    try:
        write_json_atomic(out / PREDICTIONS_FILE, prediction.to_dict())
    except OSError as err:
        raise _cannot_write(out / PREDICTIONS_FILE, err) from None
    return prediction
