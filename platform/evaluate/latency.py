"""Latency as a measurement with its conditions: which device, how it was timed, how noisy it was.

A latency figure alone says little. The same network on the same 2-core CPU measured a p50 of 27 ms
on a quiet machine and over a second while another job shared the cores (docs/latency.md). So
every profile here carries:

* **the device key**, what was measured on: the processor (CPU model and thread count, or GPU
  name) and the torch version, as one string that names the figures in the registry
  (`device_key`), so several devices' figures live side by side;
* **the conditions**: warm-up passes, repeats, images and their resolution, the layout;
* **the noise**: the spread of each image's repeats, and three figures that notice another job
  using the device. On a CPU, the cores other processes kept busy while we timed (from the
  kernel's per-core counters, less our own CPU time): a job that shares the cores throughout
  slows every repeat alike, so no drift shows it, yet it made a 27 ms image take over a second.
  On any device, two drifts: a fixed calibration workload timed before every repeat and after
  the last, and the repeats' total times. A disturbed attempt is measured again, up to
  `attempts` times; if every attempt was disturbed, `profile_latency` refuses
  (`LatencyDisturbed`) unless the caller accepts noisy figures, which are then marked so.

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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.device import fast_path

__all__ = ["BusyElsewhere", "Conditions", "Disturbance", "LatencyDisturbed", "LatencyProfile",
           "LatencyWatch", "calibration_ms", "device_key", "disturbance", "free_cores",
           "processor_name", "profile_latency", "split_images"]

# Drift (slowest / fastest of the calibration timings, or of the repeats' totals) above which a
# measurement counts as disturbed by another job (measured: benchmarks/README.md, "Latency and its
# noise").
MAX_DRIFT = 1.5
# Cores that other processes may keep busy beyond those our threads leave free.
MAX_BUSY_ELSEWHERE = 0.25


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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["conditions"]["resolution"] = list(self.conditions.resolution)
        out["per_image_ms"] = list(self.per_image_ms)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LatencyProfile:
        conditions = dict(data["conditions"])
        conditions["resolution"] = tuple(conditions["resolution"])
        return cls(**{**data, "conditions": Conditions(**conditions),
                      "per_image_ms": tuple(data["per_image_ms"])})


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_ms(device: torch.device, *, rounds: int = 3) -> float:
    """The median time of a fixed workload (matrix products) on `device`, in ms: the same work
    every time, so a change in it is a change in the device's availability, not in the network."""
    size = 256 if device.type == "cpu" else 2048
    a = torch.ones(size, size, device=device)
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a = torch.mm(a, a).mul_(1.0 / size)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cpu_seconds_busy() -> float | None:
    """CPU seconds the cores this process may run on have been busy since boot (Linux), or
    None where the kernel does not say."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if cores is not None and int(name[3:]) not in cores:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        ticks += user + nice + system + irq + softirq + steal  # steal: the hypervisor's
    return ticks / os.sysconf("SC_CLK_TCK")


class _Elsewhere:
    """The CPU cores that other processes kept busy between `__enter__` and `__exit__`."""

    def __enter__(self) -> _Elsewhere:
        self._busy, self._own = _cpu_seconds_busy(), time.process_time()
        self._wall = time.monotonic()
        self.cores = math.nan
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _cpu_seconds_busy(), time.process_time(), time.monotonic()
        if self._busy is not None and busy is not None and wall > self._wall:
            others = (busy - self._busy) - (own - self._own)
            self.cores = max(0.0, others / (wall - self._wall))


def _free_cores(device: torch.device) -> float:
    """Cores our timing leaves to other processes: on a CPU those beyond torch's threads."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    used = torch.get_num_threads() if device.type == "cpu" else 1
    return max(0, cores - used)


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's children: those it has waited for (the kernel's sums) and
    those still running (read from /proc where Linux has it; 0 for them elsewhere)."""
    times = os.times()
    seconds = times.children_user + times.children_system
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return seconds
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)"
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if int(fields[1]) == me:  # ppid; then utime stime cutime cstime at 11..14
            seconds += sum(int(v) for v in fields[11:15]) / tick
    return seconds


class BusyElsewhere(_Elsewhere):
    """The CPU cores that other processes kept busy between `__enter__` and `__exit__` (`cores`,
    NaN where the kernel does not say).

    children: count this process's children as our own work, not as others': an evaluation's
    loader processes decode its images, and are part of how it runs, not another job.
    """

    def __init__(self, *, children: bool = False) -> None:
        self.children = children

    def __enter__(self) -> BusyElsewhere:
        super().__enter__()
        self._children = _children_cpu_seconds() if self.children else 0.0
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.children and math.isfinite(self.cores):
            theirs = _children_cpu_seconds() - self._children
            self.cores = max(0.0, self.cores - theirs / (time.monotonic() - self._wall))


def free_cores(device: torch.device | str) -> float:
    """Cores a timing on `device` leaves to other processes: on a CPU those beyond torch's
    threads (the allowance `profile_latency` grants before `MAX_BUSY_ELSEWHERE`)."""
    return _free_cores(torch.device(device))


def _drift(values: Sequence[float]) -> float:
    low = min(values)
    return math.inf if low <= 0 else max(values) / low


def _attempt(run: Callable[[torch.Tensor], object], images: Sequence[torch.Tensor],
             device: torch.device, *, warmup: int, repeats: int
             ) -> tuple[np.ndarray, list[float], float]:
    """One measurement: (times (repeats, images) in ms, calibration timings, the cores other
    processes kept busy meanwhile)."""
    with torch.inference_mode(), _Elsewhere() as elsewhere:
        for _ in range(warmup):
            run(images[0])
        _sync(device)
        times = np.zeros((repeats, len(images)))
        calibration = []
        for r in range(repeats):
            calibration.append(calibration_ms(device))
            for i, image in enumerate(images):
                _sync(device)
                start = time.perf_counter()
                run(image)
                _sync(device)
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
            calibration_drift = _drift(calibration)
            repeat_drift = _drift(times.sum(axis=1).tolist())
            crowded = (device.type == "cpu" and math.isfinite(elsewhere)
                       and elsewhere > _free_cores(device) + max_busy_elsewhere)
            disturbed = crowded or max(calibration_drift, repeat_drift) > max_drift
            if not disturbed:
                break
    finally:
        network.train(was_training)
    if disturbed and not accept_disturbed:
        busy = (f"other processes kept {elsewhere:.2f} CPU cores busy (limit "
                f"{_free_cores(device) + max_busy_elsewhere:g}), " if device.type == "cpu" else "")
        raise LatencyDisturbed(
            f"latency on {device_key(device)} was disturbed in all {attempts} attempt(s): "
            f"{busy}the calibration timings drifted {calibration_drift:.2f}x and the repeats "
            f"{repeat_drift:.2f}x (limit {max_drift:g}x). Another job is using the "
            f"{device.type.upper()}; stop it and profile again")
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
        calibration_drift=calibration_drift,
        repeat_drift=repeat_drift, attempts=attempt, disturbed=disturbed)


@dataclass(frozen=True)
class Disturbance:
    """What noticed another job on the device while timing, and the verdict, by the rule
    `profile_latency` applies to each attempt."""

    busy_elsewhere: float  # CPU cores other processes kept busy (mean); NaN: unknown or a GPU
    busy_limit: float  # the most they may keep busy (free cores + MAX_BUSY_ELSEWHERE); NaN: GPU
    calibration_drift: float  # slowest / fastest calibration timing (1 = none)
    repeat_drift: float  # slowest / fastest repeat's total time; NaN: a single timed pass
    max_drift: float
    disturbed: bool

    @property
    def reason(self) -> str:
        """Why the timing counts as disturbed, in figures; "" when it does not."""
        if not self.disturbed:
            return ""
        why = []
        if math.isfinite(self.busy_elsewhere) and self.busy_elsewhere > self.busy_limit:
            why.append(f"other processes kept {self.busy_elsewhere:.2f} CPU cores busy (limit "
                       f"{self.busy_limit:g})")
        for name, drift in (("calibration timings", self.calibration_drift),
                            ("repeats", self.repeat_drift)):
            if drift > self.max_drift:
                why.append(f"the {name} drifted {drift:.2f}x (limit {self.max_drift:g}x)")
        return "; ".join(why)


def disturbance(device: torch.device | str, *, busy_elsewhere: float,
                calibration: Sequence[float], repeat_totals: Sequence[float] = (),
                max_drift: float = MAX_DRIFT,
                max_busy_elsewhere: float = MAX_BUSY_ELSEWHERE) -> Disturbance:
    """Judge one timing: disturbed when, on a CPU, other processes kept more cores busy than our
    threads leave free (plus `max_busy_elsewhere`), or when the calibration timings or the
    repeats' totals drifted beyond `max_drift`.

    Args:
        device: what was timed on (a GPU is judged by its drifts alone).
        busy_elsewhere: `BusyElsewhere.cores` over the timing (NaN: unknown).
        calibration: `calibration_ms` timings, at least one before and one after.
        repeat_totals: each repeat's total time; none for a single timed pass.
    """
    device = torch.device(device)
    calibration_drift = _drift(calibration)
    repeat_drift = _drift(repeat_totals) if len(repeat_totals) else math.nan
    on_cpu = device.type == "cpu"
    busy_limit = _free_cores(device) + max_busy_elsewhere if on_cpu else math.nan
    busy = busy_elsewhere if on_cpu else math.nan
    crowded = math.isfinite(busy) and busy > busy_limit
    drifted = max(calibration_drift, repeat_drift if len(repeat_totals) else 0.0) > max_drift
    return Disturbance(busy_elsewhere=busy, busy_limit=busy_limit,
                       calibration_drift=calibration_drift, repeat_drift=repeat_drift,
                       max_drift=max_drift, disturbed=crowded or drifted)


class LatencyWatch:
    """Watches a timed loop for another job on `device`: the calibration workload timed on
    entry and on exit, and (on a CPU) the cores other processes kept busy in between; after the
    block, `calibration` holds the two timings and `disturbance(...)` judges them.

    For a loop that times each item once (as `evaluate` does), where no repeats can show drift.
    children: as `BusyElsewhere`'s (loader processes are our own work).
    """

    def __init__(self, device: torch.device | str, *, children: bool = False) -> None:
        self.device = torch.device(device)
        self.calibration: list[float] = []
        self._busy = BusyElsewhere(children=children)

    def __enter__(self) -> LatencyWatch:
        calibration_ms(self.device, rounds=1)  # untimed: a fresh process starts its thread pool
        self._busy.__enter__()
        self.calibration = [calibration_ms(self.device)]
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:  # a failed loop is not judged: spare it the calibration
            self.calibration.append(calibration_ms(self.device))
        self._busy.__exit__(kind, *exc)

    def disturbance(self, *, max_drift: float = MAX_DRIFT,
                    max_busy_elsewhere: float = MAX_BUSY_ELSEWHERE) -> Disturbance:
        return disturbance(self.device, busy_elsewhere=self._busy.cores,
                           calibration=self.calibration, max_drift=max_drift,
                           max_busy_elsewhere=max_busy_elsewhere)
