"""Synthetic scenes: label maps with controlled object scale, rendered into learnable images.

The network routes each image by the scale of what it contains (paper §3.2), so every scene is
drawn as one of three scale kinds:

- `small`: many small objects (Cityscapes: 10-40 objects of 1-4% of the image height) in front of
  a fragmented background;
- `large`: a few large regions covering most of the image, and for Cityscapes 1-3 close vehicles;
- `mixed`: large background regions plus some small objects.

Drawing works on label values of the target format (Cityscapes label ids, VOC class indices). Each
class has a fixed look: a base colour plus a texture whose pattern, period and angle follow from
its value, so a small network can learn the classes but not from one pixel's colour. Per-image
brightness, colour shift, lighting and noise, and a per-instance gain, vary around that look.
Shapes overlap; the one drawn later wins in the label map and so in the image. Everything is
vectorised numpy over windows or whole rows; a 1024x2048 scene takes a fraction of a second.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from cityscapesscripts.helpers.labels import name2label

KINDS = ("small", "large", "mixed")
PATTERNS = ("stripes", "checker", "dots", "grain", "waves")
SHAPES = ("rect", "ellipse", "polygon")


@dataclass(frozen=True)
class KindPlan:
    """How one scale kind is drawn. Sizes are fractions of the image side (see each scene)."""

    segments: tuple[int, int]  # background regions (Cityscapes skyline blocks, VOC tones)
    small: tuple[int, int]  # number of small objects
    small_size: tuple[float, float]
    large: tuple[int, int]  # number of large objects
    large_size: tuple[float, float]
    clutter: tuple[int, int] = (0, 0)  # small patches of background classes (Cityscapes)
    detail: float = 0.06  # period of wavy tree tops, as a fraction of the width (Cityscapes)


CITYSCAPES_PLANS = {
    "small": KindPlan((10, 24), (10, 40), (0.01, 0.04), (0, 0), (0.25, 0.5), (20, 60), 0.02),
    "large": KindPlan((2, 4), (0, 0), (0.01, 0.04), (1, 3), (0.25, 0.5), (0, 0), 0.15),
    "mixed": KindPlan((3, 6), (5, 15), (0.01, 0.04), (0, 1), (0.2, 0.4), (0, 5), 0.06),
}
# VOC images are about 500x375 and its 255 band is ~4 px wide, so small objects are larger here.
VOC_PLANS = {
    "small": KindPlan((1, 3), (8, 25), (0.05, 0.12), (0, 0), (0.35, 0.8)),
    "large": KindPlan((1, 3), (0, 0), (0.05, 0.12), (1, 3), (0.35, 0.8)),
    "mixed": KindPlan((1, 3), (3, 8), (0.05, 0.12), (1, 1), (0.35, 0.7)),
}

CS = {name: name2label[name].id for name in (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic",
    "ground", "road", "sidewalk", "parking", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus",
    "train", "motorcycle", "bicycle")}
# (shape, width/height aspect) of the objects a Cityscapes scene scatters.
CS_SMALL_OBJECTS = {
    "person": ("ellipse", 0.4), "rider": ("polygon", 0.5), "car": ("rect", 1.8),
    "bicycle": ("polygon", 1.4), "motorcycle": ("ellipse", 1.3), "pole": ("rect", 0.08),
    "traffic light": ("rect", 0.4), "traffic sign": ("polygon", 1.0),
}
CS_LARGE_OBJECTS = {
    "car": ("rect", 1.8), "truck": ("rect", 1.4), "bus": ("rect", 1.6), "train": ("rect", 2.6),
}
# Bushes, grass, fences and far facades that break the background up in `small` scenes.
CS_CLUTTER = {
    "vegetation": ("ellipse", 1.0), "terrain": ("polygon", 1.6), "fence": ("rect", 2.5),
    "wall": ("rect", 1.5), "building": ("rect", 0.7), "sidewalk": ("polygon", 2.0),
}
CS_IGNORED_PATCHES = ("static", "dynamic", "ground", "unlabeled")


@dataclass(frozen=True)
class Scene:
    """A drawn scene: `label` (H, W) uint8 values, `instance` (H, W) int32 region numbers."""

    label: np.ndarray
    instance: np.ndarray
    instances: int


class Canvas:
    """A label map and an instance map that shapes are painted onto, later over earlier."""

    def __init__(self, height: int, width: int, fill: int) -> None:
        self.label = np.full((height, width), fill, np.uint8)
        self.instance = np.zeros((height, width), np.int32)
        self.count = 1  # instance 0 is the initial fill

    @property
    def shape(self) -> tuple[int, int]:
        height, width = self.label.shape
        return height, width

    def paint(self, y0: int, x0: int, mask: np.ndarray, value: int) -> None:
        """Give the pixels set in `mask`, a window whose corner is (y0, x0), a new instance."""
        h, w = mask.shape
        self.label[y0:y0 + h, x0:x0 + w][mask] = value
        self.instance[y0:y0 + h, x0:x0 + w][mask] = self.count
        self.count += 1

    def scene(self) -> Scene:
        return Scene(self.label, self.instance, self.count)


def _window(canvas: Canvas, cy: float, cx: float, ry: float, rx: float,
            ) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """Pixel-centre coordinates (rows (h, 1), cols (1, w)) of a box clipped to the canvas."""
    height, width = canvas.shape
    y0, y1 = max(0, math.floor(cy - ry)), min(height, math.ceil(cy + ry))
    x0, x1 = max(0, math.floor(cx - rx)), min(width, math.ceil(cx + rx))
    if y0 >= y1 or x0 >= x1:
        return None
    return np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5, y0, x0


def draw_shape(canvas: Canvas, rng: np.random.Generator, shape: str, value: int, *,
               cy: float, cx: float, h: float, w: float, tilt: float = 0.3) -> None:
    """Paint a rectangle, an ellipse tilted by up to `tilt` radians or a star-shaped polygon,
    of about h x w pixels."""
    h, w = max(h, 2.0), max(w, 2.0)  # keep the smallest objects visible at test sizes
    if shape == "rect":
        win = _window(canvas, cy, cx, h / 2, w / 2)
        if win is not None:
            ys, xs, y0, x0 = win
            canvas.paint(y0, x0, np.ones((ys.size, xs.size), bool), value)
        return
    r = max(h, w) / 2  # a rotated shape may reach this far from its centre
    win = _window(canvas, cy, cx, r, r)
    if win is None:
        return
    ys, xs, y0, x0 = win
    if shape == "ellipse":
        a = rng.uniform(-tilt, tilt)
        u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
        v = (ys - cy) * math.cos(a) - (xs - cx) * math.sin(a)
        mask = (u / (w / 2)) ** 2 + (v / (h / 2)) ** 2 <= 1.0
    else:
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.6, 1.0, n)
        mask = _inside(ys, xs, cy + radii * np.sin(angles) * h / 2,
                       cx + radii * np.cos(angles) * w / 2)
    canvas.paint(y0, x0, mask, value)


def _inside(ys: np.ndarray, xs: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Even-odd test of pixel centres against a polygon; one vectorised pass per edge."""
    inside = np.zeros((ys.size, xs.size), bool)
    for ya, xa, yb, xb in zip(py, px, np.roll(py, -1), np.roll(px, -1), strict=True):
        if ya == yb:
            continue
        crosses = (ya > ys) != (yb > ys)  # (h, 1): rows the edge spans
        x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)  # (h, 1)
        inside ^= crosses & (xs < x_at)
    return inside


def _scatter(canvas: Canvas, rng: np.random.Generator, objects: dict, values: dict, *,
             count: int, size: tuple[float, float], side: float, rows: tuple[float, float],
             cols: tuple[float, float]) -> None:
    """Draw `count` objects picked from `objects` (name → (shape, aspect)), sizes × `side`."""
    height, width = canvas.shape
    names = list(objects)
    for _ in range(count):
        name = names[rng.integers(len(names))]
        shape, aspect = objects[name]
        aspect *= rng.uniform(0.8, 1.25)
        s = rng.uniform(*size) * side  # sqrt of the area
        h, w = s / math.sqrt(aspect), s * math.sqrt(aspect)
        cy, cx = rng.uniform(*rows) * height, rng.uniform(*cols) * width
        draw_shape(canvas, rng, shape, values[name], cy=cy, cx=cx, h=h, w=w)


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def cityscapes_scene(rng: np.random.Generator, kind: str, height: int, width: int) -> Scene:
    """A street: sky, a skyline of building/vegetation blocks, a road in perspective with
    sidewalks and terrain, objects on it, and the ignore-mapped ids real frames have."""
    plan = CITYSCAPES_PLANS[kind]
    canvas = Canvas(height, width, CS["sky"])
    horizon = int(height * rng.uniform(0.35, 0.55))
    _skyline(canvas, rng, horizon, _count(rng, plan.segments), plan.detail)
    _ground(canvas, rng, horizon)
    horizon_frac = horizon / height
    clutter_size = (2 * plan.small_size[0], 2 * plan.small_size[1])
    _scatter(canvas, rng, CS_CLUTTER, CS, count=_count(rng, plan.clutter), size=clutter_size,
             side=height, rows=(0.3 * horizon_frac, 1), cols=(0, 1))
    _scatter(canvas, rng, CS_LARGE_OBJECTS, CS, count=_count(rng, plan.large),
             size=plan.large_size, side=height, rows=(horizon_frac, 0.85), cols=(0.1, 0.9))
    _scatter(canvas, rng, CS_SMALL_OBJECTS, CS, count=_count(rng, plan.small),
             size=plan.small_size, side=height, rows=(0.6 * horizon_frac, 0.95), cols=(0, 1))
    _ignored(canvas, rng)
    return canvas.scene()


def _skyline(canvas: Canvas, rng: np.random.Generator, horizon: int, blocks: int,
             detail: float) -> None:
    """Building and vegetation blocks side by side between the sky and the horizon."""
    height, width = canvas.shape
    blocks = min(blocks, width)
    bounds = [0, *np.sort(rng.choice(np.arange(1, width), blocks - 1, replace=False)), width]
    rows = np.arange(horizon)[:, None]
    for x0, x1 in itertools.pairwise(bounds):
        value = CS["vegetation"] if rng.random() < 0.3 else CS["building"]
        top = np.full(x1 - x0, horizon * rng.uniform(0.05, 0.8))
        if value == CS["vegetation"]:  # tree crowns: a wavy top
            period = rng.uniform(0.5, 1.5) * detail * width
            top += 0.05 * height * np.sin(2 * math.pi * np.arange(x0, x1) / period)
        canvas.paint(0, x0, rows >= top[None, :], value)
        if rng.random() < 0.25:  # a wall or fence in front of the block's base
            band = max(1, int(height * rng.uniform(0.02, 0.07)))
            front = CS["wall"] if rng.random() < 0.5 else CS["fence"]
            canvas.paint(max(0, horizon - band), x0, np.ones((min(band, horizon), x1 - x0), bool),
                         front)


def _ground(canvas: Canvas, rng: np.random.Generator, horizon: int) -> None:
    """Below the horizon: a road widening towards the camera, sidewalks, then terrain or
    ignore-mapped ground on each side."""
    height, width = canvas.shape
    depth = (np.arange(horizon, height)[:, None] - horizon) / max(1, height - horizon)  # (h, 1)
    cols = np.arange(width)[None, :] + 0.5
    centre = width * rng.uniform(0.3, 0.7)
    road = width * (0.01 + depth * rng.uniform(0.25, 0.6))  # half width per row
    walk = road * rng.uniform(1.3, 1.8)
    outer = (CS["terrain"], CS["sidewalk"], CS["parking"], CS["ground"])
    for side in (cols < centre, cols >= centre):
        value = outer[rng.choice(len(outer), p=(0.5, 0.3, 0.1, 0.1))]
        canvas.paint(horizon, 0, np.broadcast_to(side, (height - horizon, width)), value)
    canvas.paint(horizon, 0, np.abs(cols - centre) < walk, CS["sidewalk"])
    canvas.paint(horizon, 0, np.abs(cols - centre) < road, CS["road"])


def _ignored(canvas: Canvas, rng: np.random.Generator) -> None:
    """Ids that map to ignore: small patches, an out-of-roi border, an ego-vehicle hood."""
    height, width = canvas.shape
    for _ in range(int(rng.integers(0, 4))):
        name = CS_IGNORED_PATCHES[rng.integers(len(CS_IGNORED_PATCHES))]
        s = rng.uniform(0.02, 0.06) * height
        draw_shape(canvas, rng, "polygon", CS[name], cy=rng.uniform(0.3, 1) * height,
                   cx=rng.uniform(0, 1) * width, h=s, w=s * rng.uniform(0.5, 2))
    if rng.random() < 0.5:
        hood = rng.uniform(0.05, 0.12) * height
        draw_shape(canvas, rng, "ellipse", CS["ego vehicle"], cy=height + 0.3 * hood,
                   cx=width / 2, h=2.6 * hood, w=1.6 * width, tilt=0.0)
    if rng.random() < 0.3:
        b = max(1, round(rng.uniform(0.005, 0.015) * min(height, width)))
        border = np.ones((height, width), bool)
        border[b:-b, b:-b] = False
        canvas.paint(0, 0, border, CS["out of roi"])


def voc_scene(rng: np.random.Generator, kind: str, height: int, width: int) -> Scene:
    """Objects of 1-3 VOC classes (1..20) over a background (0) of a few tones."""
    plan = VOC_PLANS[kind]
    canvas = Canvas(height, width, 0)
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    for _ in range(_count(rng, plan.segments) - 1):  # background tones: half-planes, still 0
        a = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(a) + ys * math.sin(a)
        canvas.paint(0, 0, proj > rng.uniform(proj.min(), proj.max()), 0)
    classes = rng.choice(np.arange(1, 21), int(rng.integers(1, 4)), replace=False)
    objects = {int(c): (SHAPES[c % 3], (0.5, 0.7, 1.0, 1.4, 2.0)[c % 5]) for c in classes}
    values = {c: c for c in objects}
    side = min(height, width)
    _scatter(canvas, rng, objects, values, count=_count(rng, plan.large), size=plan.large_size,
             side=side, rows=(0.25, 0.75), cols=(0.25, 0.75))
    _scatter(canvas, rng, objects, values, count=_count(rng, plan.small), size=plan.small_size,
             side=side, rows=(0.05, 0.95), cols=(0.05, 0.95))
    return canvas.scene()


@dataclass(frozen=True)
class Looks:
    """Per label value: base colour (256, 3), and the texture each value gets."""

    colour: np.ndarray
    pattern: tuple[str, ...]
    period: np.ndarray  # pixels
    angle: np.ndarray  # radians
    contrast: np.ndarray  # intensity amplitude


def make_looks(colours: dict[int, tuple[int, int, int]]) -> Looks:
    """Looks for label values 0..255. Pattern and period cycle with coprime steps (5 and 7), so
    values below 35 never share both; the angle varies too."""
    colour = np.full((256, 3), 128.0, np.float32)
    for value, rgb in colours.items():
        colour[value] = rgb
    values = np.arange(256)
    return Looks(colour=colour, pattern=tuple(PATTERNS[v % 5] for v in values),
                 period=4.0 + 3.0 * (values % 7), angle=math.pi * ((5 * values) % 12) / 12,
                 contrast=18.0 + 6.0 * (values % 3))


@cache
def cityscapes_looks() -> Looks:
    """The official label colours, except the black void ids, which get visible ones."""
    colours = {label.id: label.color for label in name2label.values() if label.id >= 0}
    colours |= {CS["unlabeled"]: (20, 20, 20), CS["ego vehicle"]: (35, 35, 45),
                CS["static"]: (90, 80, 70), CS["out of roi"]: (5, 5, 5)}
    return make_looks(colours)


def voc_colormap() -> np.ndarray:
    """The (256, 3) uint8 VOC palette: bits of the index interleaved into R, G, B, high first."""
    index = np.arange(256)
    cmap = np.zeros((256, 3), np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1  # empty bits past 8 just give 0
            cmap[:, channel] |= bit << (7 - shift)
    return cmap.astype(np.uint8)


@cache
def voc_looks() -> Looks:
    """The VOC palette colours for the classes; background a neutral grey-brown."""
    table = voc_colormap()
    colours = {v: tuple(int(c) for c in table[v]) for v in range(1, 21)}
    return make_looks(colours | {0: (112, 104, 96)})


def _texture(looks: Looks, value: int, ys: np.ndarray, xs: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Texture in [-1, 1] of `value` at the given pixels, with a per-image random phase."""
    p = float(looks.period[value])
    a = float(looks.angle[value])
    u = xs * math.cos(a) + ys * math.sin(a) + rng.uniform(0, p)
    v = ys * math.cos(a) - xs * math.sin(a) + rng.uniform(0, p)
    k = 2 * math.pi / p
    match looks.pattern[value]:
        case "stripes":
            return np.sin(k * u)
        case "checker":
            return np.sign(np.sin(k * u) * np.sin(k * v))
        case "dots":
            du, dv = u % p - p / 2, v % p - p / 2
            return np.where(du * du + dv * dv < (p / 3.5) ** 2, 1.0, -0.4)
        case "grain":  # blocks of random intensity, a third of the period wide
            cell = max(1.0, p / 3)
            gy, gx = (ys / cell).astype(np.int64), (xs / cell).astype(np.int64)
            grid = rng.uniform(-1, 1, (int(gy.max()) + 1, int(gx.max()) + 1))
            return grid[gy, gx]
        case _:  # waves
            return np.sin(k * u + 2 * np.sin(k * v / 3))


def render(scene: Scene, looks: Looks, rng: np.random.Generator) -> np.ndarray:
    """The (H, W, 3) uint8 image of a scene."""
    height, width = scene.label.shape
    flat = scene.label.ravel()
    # Group pixels by value once (a radix sort for uint8), so each texture runs on its pixels.
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=256)
    tex = np.empty(flat.size, np.float32)
    start = 0
    for value in np.flatnonzero(counts):
        idx = order[start:start + counts[value]]
        start += counts[value]
        ys, xs = np.divmod(idx, width)
        tex[idx] = looks.contrast[value] * _texture(looks, int(value), ys.astype(np.float32),
                                                    xs.astype(np.float32), rng)
    gain = rng.uniform(0.85, 1.15, scene.instances).astype(np.float32)  # per instance
    pix = looks.colour[flat] * gain[scene.instance.ravel()][:, None] + tex[:, None]  # (HW, 3)
    pix *= rng.uniform(0.8, 1.2)  # brightness
    pix += rng.normal(0, 10, 3).astype(np.float32)  # colour cast
    img = pix.reshape(height, width, 3)
    light = 1 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, height, dtype=np.float32)
    img *= light[:, None, None]
    img += rng.standard_normal((height, width, 3), np.float32) * rng.uniform(3, 8)
    return np.clip(img, 0, 255).astype(np.uint8)
