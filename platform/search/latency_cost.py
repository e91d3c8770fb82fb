"""The latency cost of the budget search (`tune.cost: latency`): each trial's measured p90
latency per image, in ms, replaces its mean real GFLOPs as the study's second objective.

GFLOPs are a property of the network alone: the same on every device and free of noise. A
latency is what a deployment pays on one device, and only while nothing else uses that device
(platform/evaluate/latency.py times it and says when something did). The p90 over images is
the objective because a routing network's cost differs per image and a deployment budgets for
its slow images, not its average one; p50 and the mean are recorded beside it.

**Concurrent trials.** Ray Tune runs up to `tune.max_concurrent` trials at once, each with
`tune.trial_cpus` CPUs reserved, but Ray does not pin a trial to its cores. While one trial is
timed, its neighbours train flat out:

* On a CPU they take cores, memory bandwidth and cache from the timing. A job sharing the cores
  made one network tens of times slower (docs/latency.md), and a trial timed
  beside a training is not comparable with one timed alone: the sampler would learn the
  neighbours' schedule, not the network. So with trials on the CPU (`run.use_gpu` off)
  `check_concurrency` refuses any `tune.max_concurrent` but 1 (0, "as many as fit",
  included), and the lone trial is timed with torch's threads set to its `trial_cpus`: the
  device key names that thread count, and `profile_latency` judges the cores other processes
  kept busy against the ones those threads leave free (Ray's own processes fit in that margin).
* On GPUs Ray gives each trial's evaluation a GPU of its own, so trials run concurrently; what
  they still share, the host, shows as calibration or repeat drift, which `profile_latency`
  judges.

A measurement still disturbed after `profile.attempts` (the `profile:` section of params.yaml,
`LatencySettings`, is how every latency here is measured) fails the trial's evaluation with
`LatencyDisturbed` and its reason; Tune runs the trial again (`run.max_failures`), from its
checkpoints. Recording a disturbed figure as the objective instead would put a 40x error into
the front. Only `profile.accept_disturbed` records such figures, marked `disturbed` in their
noise.

**When.** Every stop of a trial is timed, MO-ASHA's rungs as well as the end: MO-ASHA ranks the
trials at a rung on the study's two objectives, and ranking them there on GFLOPs would stop
trials by an objective the study does not optimise. A profile costs `profile.images` ·
`profile.repeats` forward passes, seconds beside a rung's training; with `cost: gflops` nothing
is timed.
"""

from __future__ import annotations

import torch
from torch import nn

from dynroute.platform import metrics as M
from dynroute.platform.evaluate.latency import (
    LatencyDisturbed,
    LatencySettings,
    profile_latency,
    split_images,
)

# The latency figures a report carries with cost: latency (p90 is the objective).
LATENCY_KEYS = (M.LATENCY_P90_MS, M.LATENCY_P50_MS, M.LATENCY_MEAN_MS)
# Report keys beside them: the device key the figures were measured on, and their noise.
LATENCY_DEVICE = "latency_device"
LATENCY_NOISE = "latency_noise"


class LatencyConcurrencyError(ValueError):
    """`tune.cost: latency` with trials that would time each other on one CPU."""


def check_concurrency(*, cost: str, max_concurrent: int, on_gpu: bool) -> None:
    """Refuse concurrent trials on a CPU when they are to be timed (module docstring)."""
    if cost != "latency" or on_gpu or max_concurrent == 1:
        return
    given = ("0 (as many as the CPUs hold)" if max_concurrent == 0 else str(max_concurrent))
    raise LatencyConcurrencyError(
        f"tune.cost: latency times each trial on the CPU it trains on, and tune.max_concurrent "
        f"= {given} would run other trials' trainings there meanwhile: a timing beside them can "
        f"be 40x off. Set tune.max_concurrent: 1, or train on GPUs (run.use_gpu), or use "
        f"tune.cost: gflops")


def trial_threads(trial_cpus: float) -> int:
    """torch's intra-op threads for timing a trial on a CPU: its reserved CPUs (at least 1)."""
    return max(1, int(trial_cpus))


def measure_latency(network: nn.Module, *, data: str, split: str,
                    resolution: tuple[int, int], device: torch.device | str, threads: int,
                    timing: LatencySettings) -> dict:
    """The latency figures of `network` on `split`'s first `timing.images` images (0: all) at
    the cost `resolution` (H, W), on `device` (with `threads` torch threads on a CPU).

    Returns:
        {latency_p90_ms, latency_p50_ms, latency_mean_ms: floats; latency_device: the device
        key; latency_noise: {spread, busy_elsewhere, calibration_drift, repeat_drift, attempts,
        disturbed, threads, images, repeats, warmup}}, with None for a non-finite figure.

    Raises:
        LatencyDisturbed: every attempt was disturbed (and not `timing.accept_disturbed`).
    """
    images, _ = split_images(data, split, tuple(resolution), limit=timing.limit)
    device = torch.device(device)
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        profile = profile_latency(network, images, device=device, **timing.options())
    except LatencyDisturbed as error:
        raise LatencyDisturbed(f"{error}. The trial fails and Tune runs it again "
                               f"(run.max_failures); see platform/search/latency_cost.py"
                               ) from error
    finally:
        torch.set_num_threads(before)
    c = profile.conditions
    return {M.LATENCY_P90_MS: profile.p90_ms, M.LATENCY_P50_MS: profile.p50_ms,
            M.LATENCY_MEAN_MS: profile.mean_ms, LATENCY_DEVICE: profile.key,
            LATENCY_NOISE: profile.noise() | {"threads": c.threads, "images": c.images,
                                              "repeats": c.repeats, "warmup": c.warmup}}
