"""Noticing another job on the device while we time: the rule behind every latency we record.

A job that shares the CPU's cores for the whole timing slows every pass alike, so no drift between
passes shows it, yet on a 2-core CPU it made a 27 ms image take over a second (docs/latency.md).
So a timing is judged by three figures:

* on a CPU, the cores other processes kept busy meanwhile (`BusyElsewhere`: the kernel's per-core
  counters less our own CPU time), against the cores our threads leave free plus
  `MAX_BUSY_ELSEWHERE`;
* the drift of a fixed calibration workload (`calibration_ms`) timed before and after (and, in a
  profile, before every repeat): slowest over fastest, against `MAX_DRIFT`;
* in a profile, the drift of the repeats' total times.

`disturbance` applies the rule; `LatencyWatch` watches a loop that times each image once (an
evaluation); `latency.profile_latency` judges each of its attempts the same way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MAX_BUSY_ELSEWHERE", "MAX_DRIFT", "BusyElsewhere", "Disturbance", "LatencyWatch",
           "calibration_ms", "disturbance", "free_cores", "sync"]

# Drift (slowest / fastest of the calibration timings, or of the repeats' totals) above which a
# measurement counts as disturbed by another job. On a quiet 2-core CPU both reached 1.3 (each
# image's median over interleaved repeats absorbs that); a job taking a core moved the repeats'
# totals 1.4–36× (benchmarks/README.md, "Latency and its noise"), and the busy cores caught it.
MAX_DRIFT = 2.0
# Cores that other processes may keep busy beyond those our threads leave free.
MAX_BUSY_ELSEWHERE = 0.25


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA runs asynchronously: time only finished work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_ms(device: torch.device, *, rounds: int = 3) -> float:
    """The fastest of `rounds` timings of a fixed workload (matrix products) on `device`, in ms:
    the same work every time, so a change in it is a change in the device's availability, not in
    the network. On a quiet 2-core CPU, 30 calls of 384² products (about 1.3 ms) stayed within
    1.07× of each other; 256² (0.4 ms), or the median instead of the fastest, drifted up to 1.37×,
    too close to `MAX_DRIFT`. A job that holds the device for the whole call slows every round,
    fastest included."""
    size = 384 if device.type == "cpu" else 2048
    a = torch.ones(size, size, device=device)
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a = torch.mm(a, a).mul_(1.0 / size)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


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


class BusyElsewhere:
    """The CPU cores that other processes kept busy between `__enter__` and `__exit__` (`cores`,
    NaN where the kernel does not say).

    children: count this process's children as our own work, not as others': an evaluation's
    loader processes decode its images, and are part of how it runs, not another job.
    min_seconds: the shortest window to judge. The kernel counts busy time in ticks of 10 ms, so
        over a timing of a few ms one tick of another process reads as whole cores busy (a
        quiet machine judged crowded), and a job that started a moment before reads as none. A
        shorter block is extended by waiting, which costs our timing nothing: whatever keeps
        cores busy during the wait is still another job.
    """

    def __init__(self, *, children: bool = False, min_seconds: float = 0.5) -> None:
        self.children = children
        self.min_seconds = min_seconds

    def __enter__(self) -> BusyElsewhere:
        self._busy, self._own = _cpu_seconds_busy(), self._own_seconds()
        self._wall = time.monotonic()
        self.cores = math.nan
        return self

    def __exit__(self, *exc) -> None:
        short = self.min_seconds - (time.monotonic() - self._wall)
        if short > 0:
            time.sleep(short)
        busy, own, wall = _cpu_seconds_busy(), self._own_seconds(), time.monotonic()
        if self._busy is not None and busy is not None and wall > self._wall:
            others = (busy - self._busy) - (own - self._own)
            self.cores = max(0.0, others / (wall - self._wall))

    def _own_seconds(self) -> float:
        """CPU seconds of this process (all its threads), and of its children if they count."""
        return time.process_time() + (_children_cpu_seconds() if self.children else 0.0)


def free_cores(device: torch.device | str) -> float:
    """Cores a timing on `device` leaves to other processes: on a CPU those beyond torch's
    threads (the allowance granted before `MAX_BUSY_ELSEWHERE`); on a GPU all but one."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    used = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    return max(0, cores - used)


def _drift(values: Sequence[float]) -> float:
    low = min(values)
    return math.inf if low <= 0 else max(values) / low


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
    busy_limit = free_cores(device) + max_busy_elsewhere if on_cpu else math.nan
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
