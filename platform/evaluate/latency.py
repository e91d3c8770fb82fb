"""Latency as a measurement with its conditions: which device, how it was timed, how noisy it was.

A latency figure alone says little. The same network on the same 2-core CPU measured a p50 of 27 ms
on a quiet machine and over a second while another job shared the cores (docs/latency.md). So
every profile here carries:

* **the device key**, what was measured on: the processor (CPU model and thread count, or GPU
  name) and the torch version, as one string that names the figures in the registry
  (`device_key`), so several devices' figures live side by side;
* **the conditions**: warm-up passes, repeats, images and their resolution, the layout;
* **the noise**: the spread of each image's repeats, and whether another job disturbed the
  timing (`disturbance.py`: on a CPU the cores other processes kept busy, and on any device the
  drift of a calibration workload timed before every repeat and after the last, and of the
  repeats' totals). A disturbed attempt is measured again, up to `attempts` times; if every
  attempt was disturbed, `profile_latency` refuses (`LatencyDisturbed`) unless the caller
  accepts noisy figures, which are then marked so.

Repeats are *interleaved*: each repeat times every image once, in turn, so a slow spell hits one
repeat of many images instead of every repeat of one image, and the median over an image's repeats
discards it. The images are timed at their own size with hard routing, so each takes its own
route; `split_images` reads a split's images at the cost resolution for it.
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.device import fast_path
from dynroute.platform.evaluate.disturbance import (
    MAX_BUSY_ELSEWHERE,
    MAX_DRIFT,
    BusyElsewhere,
    calibration_ms,
    disturbance,
    sync,
)

__all__ = ["Conditions", "LatencyDisturbed", "LatencyProfile", "LatencySettings", "device_key",
           "processor_name", "profile_latency", "split_images"]

class LatencyDisturbed(RuntimeError):
    """Every attempt at a profile was disturbed (drift above the limit)."""


def processor_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where Linux has it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.")


def device_key(device: torch.device | str, *, threads: int | None = None) -> str:
    """What a latency was measured on, as a registry key: `cpu-<model>-<T>t-torch-<version>` or
    `cuda-<gpu name>-torch-<version>`, lower case, letters, digits, dots and dashes.

    Args:
        device: the device the network runs on.
        threads: torch's intra-op threads on a CPU (default: `torch.get_num_threads()`); the
            same CPU with other threads is another device here.
    """
    device = torch.device(device)
    torch_version = _slug(torch.__version__)
    if device.type == "cuda":
        return f"cuda-{_slug(processor_name(device))}-torch-{torch_version}"
    threads = torch.get_num_threads() if threads is None else threads
    return f"cpu-{_slug(processor_name(device))}-{threads}t-torch-{torch_version}"


@dataclass(frozen=True)
class LatencySettings:
    """How a latency is measured: `params.yaml`'s `profile:` section, used by `dynroute profile`
    and by the search's trials with `tune.cost: latency`."""

    images: int = 0  # the first N images of the split; 0: all
    warmup: int = 3  # untimed passes first
    repeats: int = 5  # interleaved timed passes over every image (at least 3)
    attempts: int = 3  # measurements before refusing a disturbed one
    max_drift: float = MAX_DRIFT  # slowest / fastest calibration or repeat total, undisturbed
    max_busy_elsewhere: float = MAX_BUSY_ELSEWHERE  # cores others may use beyond our free ones
    accept_disturbed: bool = False  # record disturbed figures, marked so, instead of refusing

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"profile.images = {self.images}: 0 (all) or a positive count")
        if self.repeats < 3:
            raise ValueError(f"profile.repeats = {self.repeats}: at least 3, so that one disturbed "
                             f"repeat is never an image's median")
        if self.warmup < 0 or self.attempts < 1:
            raise ValueError(f"profile.warmup = {self.warmup}, profile.attempts = "
                             f"{self.attempts}: warmup >= 0 and attempts >= 1")
        if not self.max_drift > 1 or self.max_busy_elsewhere < 0:
            raise ValueError(f"profile.max_drift = {self.max_drift} (a ratio above 1), "
                             f"profile.max_busy_elsewhere = {self.max_busy_elsewhere} (cores, "
                             f">= 0)")

    @property
    def limit(self) -> int | None:
        """`split_images`'s limit: None for all."""
        return self.images or None

    def options(self) -> dict:
        """`profile_latency`'s keyword arguments."""
        return {"warmup": self.warmup, "repeats": self.repeats, "attempts": self.attempts,
                "max_drift": self.max_drift, "max_busy_elsewhere": self.max_busy_elsewhere,
                "accept_disturbed": self.accept_disturbed}


@dataclass(frozen=True)
class Conditions:
    """How a profile was measured."""

    device: str  # torch's name for it, e.g. cpu, cuda:0
    processor: str
    threads: int  # torch intra-op threads (the CPU's; a GPU's host threads)
    torch: str
    warmup: int  # untimed passes over the first image
    repeats: int  # interleaved timed passes over every image
    images: int
    resolution: tuple[int, int]  # (H, W) the images were timed at
    fast: bool  # the inference fast path (fast_path.for_inference)
    host: str  # the machine's name, to tell two machines of one CPU model apart


@dataclass(frozen=True)
class LatencyProfile:
    """Per-image latency of one network on one device, with its conditions and noise.

    Percentiles are over images, of each image's median over its repeats.
    """

    key: str
    conditions: Conditions
    per_image_ms: tuple[float, ...]
    p50_ms: float
    p90_ms: float
    mean_ms: float
    spread: float  # median over images of (slowest − fastest repeat) / median repeat
    busy_elsewhere: float  # CPU cores other processes kept busy while timing (mean); NaN: unknown
    calibration_drift: float  # slowest / fastest calibration timing (1 = none)
    repeat_drift: float  # slowest / fastest repeat's total time
    attempts: int
    disturbed: bool  # the last attempt's drift passed the limit (recorded only if asked)

    def percentile(self, which: str) -> float:
        """`p50` or `p90` in ms."""
        if which not in ("p50", "p90"):
            raise ValueError(f"percentile {which!r}: use p50 or p90")
        return self.p50_ms if which == "p50" else self.p90_ms

    def noise(self) -> dict:
        """How noisy the figures are and whether another job disturbed them, as JSON (None for
        a figure that is not finite: JSON has no NaN)."""
        figures = {"spread": self.spread, "busy_elsewhere": self.busy_elsewhere,
                   "calibration_drift": self.calibration_drift,
                   "repeat_drift": self.repeat_drift}
        return {**{k: v if math.isfinite(v) else None for k, v in figures.items()},
                "attempts": self.attempts, "disturbed": self.disturbed}


def split_images(data: str, split: str, resolution: tuple[int, int], *,
                 limit: int | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """The images of a prepared split, each resized (bilinear) to `resolution` (H, W), the cost
    resolution, so that the time measured is that of the size the GFLOPs are declared at; and
    their ids. `limit`: the first this many (None: all)."""
    images, ids = [], []
    for sample in ShardDataset(root=data, split=split, train=False, crop=None, verify=True):
        image = sample["image"]  # (3, H, W)
        if tuple(image.shape[-2:]) != tuple(resolution):
            image = F.interpolate(image.unsqueeze(0), size=tuple(resolution), mode="bilinear",
                                  align_corners=False)[0]
        images.append(image.contiguous())
        ids.append(str(sample["id"]))
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"the {split} split of {data} has no images to time")
    return images, ids


def _attempt(run: Callable[[torch.Tensor], object], images: Sequence[torch.Tensor],
             device: torch.device, *, warmup: int, repeats: int
             ) -> tuple[np.ndarray, list[float], float]:
    """One measurement: (times (repeats, images) in ms, calibration timings, the cores other
    processes kept busy meanwhile)."""
    with torch.inference_mode(), BusyElsewhere() as elsewhere:
        for _ in range(warmup):
            run(images[0])
        sync(device)
        times = np.zeros((repeats, len(images)))
        calibration = []
        for r in range(repeats):
            calibration.append(calibration_ms(device))
            for i, image in enumerate(images):
                sync(device)
                start = time.perf_counter()
                run(image)
                sync(device)
                times[r, i] = (time.perf_counter() - start) * 1e3
        calibration.append(calibration_ms(device))
    return times, calibration, elsewhere.cores


def profile_latency(network: nn.Module, images: Sequence[torch.Tensor], *,
                    device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 5,
                    fast: bool = True, attempts: int = 3, max_drift: float = MAX_DRIFT,
                    max_busy_elsewhere: float = MAX_BUSY_ELSEWHERE, accept_disturbed: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> LatencyProfile:
    """Time `network` on every image, `repeats` times interleaved, on `device`.

    Args:
        network: the network (eval mode is set on a copy where the fast path converts it; the
            caller's keeps its mode).
        images: (3, H, W) tensors of one size, already at the resolution to time.
        device: where to run; the figures' device key names it.
        warmup: untimed passes first (allocator, thread pools, cuDNN choices).
        repeats: timed passes over all images; the median per image is its figure. At least 3,
            so one disturbed repeat cannot be the median.
        fast: the device's inference fast path (channels-last, folded BN), as `evaluate` uses.
        attempts: how many times to measure while an attempt is disturbed.
        max_drift: the largest slowest/fastest ratio of calibration timings and of repeat totals
            that counts as undisturbed.
        max_busy_elsewhere: the most CPU cores other processes may keep busy beyond those our
            threads leave free (on a CPU; a GPU is judged by its drifts alone).
        accept_disturbed: return the last attempt marked `disturbed` instead of raising.
        progress: called as (attempt, attempts) before each attempt.

    Raises:
        ValueError: no images, images of several sizes, or repeats < 3.
        LatencyDisturbed: every attempt drifted beyond `max_drift` (and not `accept_disturbed`).
    """
    if not images:
        raise ValueError("no images to time")
    if repeats < 3:
        raise ValueError(f"repeats={repeats}: use at least 3 (the median must not be a single "
                         f"disturbed repeat)")
    if warmup < 0 or attempts < 1:
        raise ValueError(f"warmup={warmup}, attempts={attempts}: use warmup >= 0, attempts >= 1")
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of several sizes {sorted(sizes)}: resize them to one")
    device = torch.device(device)
    layout = fast_path.for_inference(device, fast=fast)
    was_training = network.training
    network.eval()
    try:
        runner = layout.inference_network(network).to(device)
        batches = [layout.images(im.unsqueeze(0).to(device)) for im in images]  # (1, 3, H, W)
        for attempt in range(1, attempts + 1):
            if progress is not None:
                progress(attempt, attempts)
            times, calibration, elsewhere = _attempt(runner, batches, device, warmup=warmup,
                                                     repeats=repeats)
            judged = disturbance(device, busy_elsewhere=elsewhere, calibration=calibration,
                                 repeat_totals=times.sum(axis=1).tolist(), max_drift=max_drift,
                                 max_busy_elsewhere=max_busy_elsewhere)
            if not judged.disturbed:
                break
    finally:
        network.train(was_training)
    if judged.disturbed and not accept_disturbed:
        raise LatencyDisturbed(
            f"latency on {device_key(device)} was disturbed in all {attempts} attempt(s): "
            f"{judged.reason}. Another job is using the {device.type.upper()}; stop it and "
            f"profile again")
    median = np.median(times, axis=0)  # (images,)
    spread = float(np.median((times.max(axis=0) - times.min(axis=0)) / median))
    height, width = images[0].shape[-2:]
    conditions = Conditions(
        device=str(device), processor=processor_name(device), threads=torch.get_num_threads(),
        torch=torch.__version__, warmup=warmup, repeats=repeats, images=len(images),
        resolution=(int(height), int(width)), fast=fast, host=platform.node() or os.uname()[1])
    return LatencyProfile(
        key=device_key(device), conditions=conditions,
        per_image_ms=tuple(float(v) for v in median),
        p50_ms=float(np.percentile(median, 50)), p90_ms=float(np.percentile(median, 90)),
        mean_ms=float(median.mean()), spread=spread, busy_elsewhere=elsewhere,
        calibration_drift=judged.calibration_drift, repeat_drift=judged.repeat_drift,
        attempts=attempt, disturbed=judged.disturbed)


