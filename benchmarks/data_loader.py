"""Can one CPU core decode and augment fast enough to feed training? (docs/model.md §1, §9)

Writes synthetic shards with `ShardWriter` into a temporary folder and streams them through
`ShardDataset` on one thread (`torch.set_num_threads(1)`, no DataLoader workers), in one run for

    cityscapes-like   1024x2048 RGB PNG + 8-bit label PNG, crop 768x768, scales 0.5–2.0
    voc-like          375x500 RGB JPEG + palette label PNG (255 borders), crop 512x512

The pictures are smooth gradients, objects and sensor-like noise, so the encoded sizes are near the
real datasets' (Cityscapes PNGs about 2.2 MB, VOC JPEGs about 100 KB; ours come out near 2.2 MB
and 80 KB). Reported per kind:
training images/s on one core (end to end through the dataset, over `--epochs` epochs so the
scales average out), ms per image split into read (Parquet row groups → bytes), decode (Pillow,
image and label) and augment (the rest: scale, flip, pad, crop, BGR − mean, to tensors; the
end-to-end time minus the two measured parts), encoded KB per image, and evaluation images/s.

    python benchmarks/data_loader.py            # 8 images per kind at full size
    python benchmarks/data_loader.py --smoke    # tiny, 2 images per kind, for CI
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from dynroute.platform.data.augment import SCALES
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import ShardWriter


@dataclass(frozen=True)
class Kind:
    name: str
    size: tuple[int, int]  # (H, W)
    crop: tuple[int, int]
    classes: int
    image_format: str  # "png" or "jpeg"
    palette_label: bool  # VOC's labels are palette PNGs with 255 object borders
    noise: float  # standard deviation of the per-pixel noise, 0–255 scale


KINDS = (
    Kind("cityscapes-like", (1024, 2048), (768, 768), 19, "png", False, 1.0),
    Kind("voc-like", (375, 500), (512, 512), 21, "jpeg", True, 14.0),
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def synth_sample(kind: Kind, size: tuple[int, int], rng: np.random.Generator) -> dict:
    """A shard row: objects of random classes on a gradient, with noise."""
    h, w = size
    label = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(label)
    for _ in range(24):
        x0, y0 = int(rng.integers(w)), int(rng.integers(h))
        x1 = x0 + int(rng.integers(w // 16 + 1, w // 3 + 2))
        y1 = y0 + int(rng.integers(h // 16 + 1, h // 3 + 2))
        cls = int(rng.integers(1, kind.classes))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=cls)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=cls,
                         outline=255 if kind.palette_label else cls, width=max(1, w // 100))
    lab = np.asarray(label)
    colours = rng.uniform(40, 200, (256, 3))
    y, x = np.ogrid[0:h, 0:w]
    shade = (40 * x / w + 30 * y / h)[..., None]  # (H, W, 1) smooth light
    rgb = colours[lab] + shade + rng.normal(0, kind.noise, (h, w, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if kind.palette_label:
        label = label.convert("P")
        label.putpalette([v for k in range(256) for v in (k * 37 % 256, k * 91 % 256, k)])
    hist = np.bincount(np.where(lab == 255, kind.classes, lab).ravel(),
                       minlength=kind.classes + 1)
    return {"image": _encode(image, kind.image_format), "image_format": kind.image_format,
            "label": _encode(label, "png"), "height": h, "width": w,
            "histogram": [int(v) for v in hist]}


def write_kind(root: Path, kind: Kind, size: tuple[int, int], count: int) -> None:
    rng = np.random.default_rng(0)
    rows = ({"id": f"{kind.name}_{i:04d}"} | synth_sample(kind, size, rng) for i in range(count))
    writer = ShardWriter(str(root), dataset=kind.name,
                         class_names=tuple(f"class{k}" for k in range(kind.classes)))
    writer.write_split("train", rows, count)
    writer.finish({})


def time_read(root: Path) -> tuple[float, int, int]:
    """Seconds to read every row group's image and label bytes, images, encoded bytes."""
    start = time.perf_counter()
    images = nbytes = 0
    for path in sorted((root / "shards").glob("*.parquet")):
        file = pq.ParquetFile(path)
        for g in range(file.num_row_groups):
            table = file.read_row_group(g, columns=["id", "image", "label"])
            for image, label in zip(table.column("image"), table.column("label"), strict=True):
                nbytes += len(image.as_py()) + len(label.as_py())
                images += 1
    return time.perf_counter() - start, images, nbytes


def time_decode(root: Path) -> float:
    """Seconds to decode every image and label with Pillow (what the data path does first)."""
    total = 0.0
    for path in sorted((root / "shards").glob("*.parquet")):
        table = pq.read_table(path, columns=["image", "label"])
        for column in ("image", "label"):
            for value in table.column(column):
                data = value.as_py()
                start = time.perf_counter()
                img = Image.open(io.BytesIO(data))
                img.load()
                if img.mode not in ("RGB", "L", "P"):
                    img.convert("RGB")
                total += time.perf_counter() - start
    return total


@dataclass(frozen=True)
class Result:
    kind: Kind
    size: tuple[int, int]
    crop: tuple[int, int]
    images: int  # training samples timed (epochs × images)
    train_s: float
    read_s: float  # per image
    decode_s: float  # per image
    bytes_per_image: float
    eval_per_s: float


def bench(kind: Kind, root: Path, *, size: tuple[int, int], crop: tuple[int, int], count: int,
          epochs: int) -> Result:
    write_kind(root, kind, size, count)
    train = ShardDataset(root=str(root), split="train", train=True, crop=crop, scales=SCALES,
                         seed=0, rank=0, world_size=1)
    next(iter(train))  # warm-up: first touches of the files and libraries
    seen = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for sample in train:
            assert sample["image"].shape == (3, *crop)
            seen += 1
    train_s = time.perf_counter() - start
    read_s, images, nbytes = time_read(root)
    decode_s = time_decode(root)
    evaluation = ShardDataset(root=str(root), split="train", train=False, crop=None,
                              rank=0, world_size=1)
    start = time.perf_counter()
    evaluated = sum(1 for _ in evaluation)
    eval_s = time.perf_counter() - start
    return Result(kind=kind, size=size, crop=crop, images=seen, train_s=train_s,
                  read_s=read_s / images, decode_s=decode_s / images,
                  bytes_per_image=nbytes / images, eval_per_s=evaluated / eval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per kind (default 8)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="training epochs timed, each with new augmentations (default 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 images, for CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.images, args.epochs = 2, 1

    results = []
    with tempfile.TemporaryDirectory(prefix="dynroute-bench-") as tmp:
        for kind in KINDS:
            size, crop = kind.size, kind.crop
            if args.smoke:
                size, crop = (max(16, size[0] // 16), max(16, size[1] // 16)), (32, 32)
            print(f"  {kind.name}: writing {args.images} images of {size[0]}x{size[1]}",
                  file=sys.stderr)
            results.append(bench(kind, Path(tmp) / kind.name, size=size, crop=crop,
                                 count=args.images, epochs=args.epochs))

    print(f"data loader on 1 thread (torch {torch.__version__}, Pillow {PIL.__version__}): "
          f"{args.images} images per kind, training epochs: {args.epochs}, scales {SCALES}")
    print(f"{'kind':<17}{'image':>11}{'crop':>9}{'img/s/core':>12}{'ms/img':>8}{'read':>7}"
          f"{'decode':>8}{'augment':>9}{'KB/img':>8}{'eval-img/s':>12}")
    for r in results:
        ms = r.train_s / r.images * 1e3
        read_ms, decode_ms = r.read_s * 1e3, r.decode_s * 1e3
        print(f"{r.kind.name:<17}{f'{r.size[0]}x{r.size[1]}':>11}{f'{r.crop[0]}x{r.crop[1]}':>9}"
              f"{r.images / r.train_s:>12.1f}{ms:>8.1f}{read_ms:>7.1f}{decode_ms:>8.1f}"
              f"{ms - read_ms - decode_ms:>9.1f}{r.bytes_per_image / 1024:>8.0f}"
              f"{r.eval_per_s:>12.1f}")
    print("ms/img is training end to end; read and decode are timed apart, augment is the rest "
          "(scale, flip, pad, crop, BGR − mean, tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
