"""`dynroute profile`: time the registered front on this machine's device and record the latency on
each version (the stage after `register`).

Each version is loaded from the registry as data, timed over the evaluation split at the cost
resolution (so each image takes its own route) with `evaluate/latency.py`'s rules (warm-up,
interleaved repeats, the median per image, a refusal when another job disturbs the timings), and
its figures are set as the version's `latency/<device key>` tag (`registry/latency.py`). The
summary (per-image figures included) goes to `out/profile.json`, the plot of mIoU against latency
on every device profiled so far to `out/latency_front.png`, both to an MLflow run of their own,
and the headline to the DVC metrics file.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynroute.platform import metrics as M
from dynroute.platform.config.params import Params
from dynroute.platform.device.fast_path import inference_device
from dynroute.platform.evaluate.latency import (
    LatencyProfile,
    device_key,
    profile_latency,
    split_images,
)
from dynroute.platform.evaluate.results import finite
from dynroute.platform.files import write_json_atomic
from dynroute.platform.pareto.analysis import Point
from dynroute.platform.pareto.plots import plot_fronts
from dynroute.platform.registry.front import RegistryError, model_name
from dynroute.platform.registry.latency import (
    latency_front,
    order_disagreement,
    profiled_devices,
    record_latency,
)
from dynroute.platform.registry.registered_versions import RegisteredVersion, read_versions
from dynroute.platform.tracking.runs import log_evaluation_run
from dynroute.platform.train.checkpoints import load_model

PROFILE_FILE, PLOT_FILE = "profile.json", "latency_front.png"


@dataclass(frozen=True)
class Profiled:
    """One version's profile on this device."""

    version: RegisteredVersion
    profile: LatencyProfile


@dataclass(frozen=True)
class ProfileRun:
    """What `run_profile` did: the device, each version's figures, the front on this device."""

    name: str
    device: str
    profiled: tuple[Profiled, ...]
    front: tuple[str, ...]  # versions on the (mIoU, p90) front here, fastest first
    disagreement: dict  # order_disagreement of GFLOPs against p90 latency
    summary: Path
    plot: Path


def _versions(uri: str, name: str, model: str | None) -> tuple[str, list[RegisteredVersion]]:
    """The front's versions, or the one `model` names (models:/NAME/VERSION or models:/NAME@ALIAS
    of this registered model)."""
    registered, versions = read_versions(tracking_uri=uri, name=name)
    if model is None:
        front = [v for v in versions if v.pareto]
        if not front:
            raise RegistryError(f"{registered} has no version on the front to profile; run "
                                f"`dynroute register` first")
        return registered, front
    prefix = f"models:/{registered}"
    rest = model[len(prefix):] if model.startswith(prefix) else None
    if rest is None or rest[:1] not in ("/", "@") or len(rest) < 2:
        raise RegistryError(f"--model {model}: give {prefix}/VERSION or {prefix}@ALIAS")
    chosen = [v for v in versions if (rest[1:] == v.version if rest[0] == "/"
                                      else rest[1:] in v.aliases)]
    if not chosen:
        known = ", ".join(f"{v.version} ({', '.join(v.aliases) or '-'})" for v in versions)
        raise RegistryError(f"--model {model}: no such version or alias; versions: {known}")
    return registered, chosen


def _record(profile: LatencyProfile) -> dict:
    """The figures a version's tag keeps: the headline, the noise and the conditions."""
    return {"p50_ms": profile.p50_ms, "p90_ms": profile.p90_ms, "mean_ms": profile.mean_ms,
            **profile.noise(), **asdict(profile.conditions),
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def run_profile(params: Params, *, uri: str | None, out: Path, model: str | None = None,
                metrics: Path | None = None,
                progress: Callable[[str], None] | None = None) -> ProfileRun:
    """Profile the front (or `model`) on the device `evaluate.device` names; see the module doc.

    Raises:
        RegistryError: tracking is off, nothing registered, or `model` names no version.
        LatencyDisturbed: another job disturbed every attempt (nothing is recorded for that
            version or any after it; versions before it keep their new figures).
    """
    if uri is None:
        raise RegistryError("profile records latency in the MLflow registry but tracking.uri is "
                            "'none'; set it to 'local' or a tracking server's URI in params.yaml")
    settings, ev = params.profile, params.evaluate
    name = model_name(params.registry.name, params.data.dataset)
    registered, versions = _versions(uri, name, model)
    device = inference_device(ev.device, key="evaluate.device")
    key = device_key(device)
    images, ids = split_images(params.data.prepared, ev.split, tuple(ev.cost_resolution),
                               limit=settings.limit)
    say = progress or (lambda _: None)
    say(f"profiling {len(versions)} version(s) of {registered} on {key}: {len(images)} "
        f"{ev.split} images at {ev.cost_resolution[0]}x{ev.cost_resolution[1]}, "
        f"{settings.warmup} warm-up, {settings.repeats} interleaved repeats")
    profiled = []
    for v in versions:
        network, _ = load_model(f"models:/{registered}/{v.version}", tracking_uri=uri)
        profile = profile_latency(
            network, images, device=device, fast=ev.fast, **settings.options(),
            progress=lambda a, n, v=v: say(f"  version {v.version}: attempt {a} of {n}"))
        record_latency(tracking_uri=uri, name=registered, version=v.version, device=key,
                       record=_record(profile))
        profiled.append(Profiled(v, profile))
        say(f"  version {v.version}: p50 {profile.p50_ms:.4g} ms, p90 {profile.p90_ms:.4g} ms, "
            f"spread {profile.spread:.1%}{' (DISTURBED)' if profile.disturbed else ''}")
    _, everything = read_versions(tracking_uri=uri, name=registered)  # with the new tags
    front = tuple(v.version for v in latency_front(everything, key))
    disagreement = order_disagreement(
        [(p.version.gflops_mean, p.profile.p90_ms) for p in profiled])
    out.mkdir(parents=True, exist_ok=True)
    summary = write_json_atomic(out / PROFILE_FILE, {
        "name": registered, "device": key, "split": ev.split, "image_ids": ids,
        "conditions": asdict(profiled[0].profile.conditions) if profiled else None,
        "versions": [{"version": p.version.version, "trial": p.version.trial,
                      "aliases": list(p.version.aliases), M.MIOU: finite(p.version.miou),
                      M.GFLOPS_MEAN: finite(p.version.gflops_mean), **_record(p.profile),
                      "per_image_ms": list(p.profile.per_image_ms)} for p in profiled],
        "latency_front": list(front), "gflops_vs_latency": disagreement})
    plot = plot_fronts({d: [Point(id=v.version, miou=v.miou, gflops=v.latency[d].p90_ms)
                            for v in everything if v.pareto and d in v.latency
                            and not v.latency[d].disturbed]
                        for d in profiled_devices(everything)},
                       out / PLOT_FILE, xlabel="p90 latency per image (ms)",
                       title=f"{registered}: mIoU against measured latency, per device")
    run = ProfileRun(registered, key, tuple(profiled), front, disagreement, summary, plot)
    if metrics is not None:
        write_json_atomic(metrics, headline(run))
    log_evaluation_run(uri, params.tracking.experiment, run_name=f"profile {key}",
                       tags={"stage": "profile", "device": key, "registered_model": registered},
                       params={"device": key, "torch": torch.__version__,
                               **asdict(params.profile)},
                       metrics={f"{M.LATENCY_P90_MS}.v{p.version.version}": p.profile.p90_ms
                                for p in profiled},
                       artifacts=[summary, plot])
    return run


def headline(run: ProfileRun) -> dict:
    """The DVC metrics: how many versions were profiled here, the front's size on this device,
    how far its order agrees with the GFLOPs order, and the disturbed count."""
    return {"versions_profiled": len(run.profiled), "latency_front_size": len(run.front),
            "kendall_tau_gflops_latency": run.disagreement.get("kendall_tau"),
            "disturbed": sum(p.profile.disturbed for p in run.profiled)}
