"""Measured latency per device on the registered versions: how it is recorded, read back, ranked
into a front per device, and chosen from ("the most accurate model that runs in 20 ms at p90 on
this machine").

`dynroute profile` (pipelines/profile_stage.py) times each front version on one device and
records the figures as one version tag per device, `latency/<device key>`, whose value is a
small JSON object: p50 / p90 / mean in ms over the images, the noise (spread of the repeats, cores
busy elsewhere, drifts, whether it was disturbed) and the conditions (processor, threads, torch,
warm-up, repeats, images, resolution, host, when). The device key says what was measured on
(`evaluate/latency.py`, `device_key`), so the figures of several devices live side by side and
a second profile on the same device replaces the first.

This module is pure data apart from `record_latency`, which writes a tag with the fail-fast
client that `registered_versions` also uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynroute.platform.pareto.analysis import Point, pareto_front
from dynroute.platform.registry.front import RegistryError
from dynroute.platform.tracking.client import mlflow_client

if TYPE_CHECKING:  # registered_versions reads the tags with this module's parse_latency_tags
    from dynroute.platform.registry.registered_versions import RegisteredVersion

__all__ = ["LATENCY_TAG_PREFIX", "PERCENTILES", "DeviceLatency", "latency_front",
           "latency_tag", "order_disagreement", "parse_latency_tags", "profiled_devices",
           "record_latency"]

LATENCY_TAG_PREFIX = "latency/"
PERCENTILES = ("p50", "p90")
# The figures a tag must hold to be read back; the rest (conditions, noise) travel along.
_REQUIRED = ("p50_ms", "p90_ms", "mean_ms")


@dataclass(frozen=True)
class DeviceLatency:
    """One version's latency on one device, as its tag records it."""

    device: str  # the device key
    p50_ms: float
    p90_ms: float
    mean_ms: float
    disturbed: bool
    details: Mapping[str, object]  # the whole record: noise and conditions

    def ms(self, percentile: str) -> float:
        if percentile not in PERCENTILES:
            raise RegistryError(f"percentile {percentile!r}: use {' or '.join(PERCENTILES)}")
        return self.p50_ms if percentile == "p50" else self.p90_ms


def latency_tag(device: str, record: Mapping[str, object]) -> tuple[str, str]:
    """The version tag (key, value) that records `record` (at least p50_ms, p90_ms, mean_ms) for
    `device`; per-image lists are left out (they live in the profile stage's JSON)."""
    missing = [k for k in _REQUIRED if not isinstance(record.get(k), int | float)]
    if missing:
        raise ValueError(f"a latency record needs {', '.join(missing)}")
    kept = {k: v for k, v in record.items() if not isinstance(v, list | tuple) or k ==
            "resolution"}
    return LATENCY_TAG_PREFIX + device, json.dumps(kept, sort_keys=True, separators=(",", ":"))


def parse_latency_tags(tags: Mapping[str, str]) -> dict[str, DeviceLatency]:
    """The `latency/<device>` tags of a version, by device key. A tag that does not parse (edited
    by hand, cut short) is left out rather than read as a figure."""
    found = {}
    for key, value in tags.items():
        if not key.startswith(LATENCY_TAG_PREFIX):
            continue
        device = key[len(LATENCY_TAG_PREFIX):]
        try:
            record = json.loads(value)
            figures = [float(record[k]) for k in _REQUIRED]
        except (ValueError, TypeError, KeyError):
            continue
        if not all(math.isfinite(f) and f > 0 for f in figures):
            continue
        found[device] = DeviceLatency(device, *figures, disturbed=bool(record.get("disturbed")),
                                      details=record)
    return found


def record_latency(*, tracking_uri: str, name: str, version: str, device: str,
                   record: Mapping[str, object]) -> None:
    """Set (or replace) version `version` of `name`'s latency tag for `device`."""
    key, value = latency_tag(device, record)
    mlflow_client(tracking_uri).set_model_version_tag(name, version, key, value)


def profiled_devices(versions: Iterable[RegisteredVersion]) -> list[str]:
    """Every device key some version has figures for, sorted."""
    return sorted({d for v in versions for d in v.latency})


def latency_front(versions: Iterable[RegisteredVersion], device: str, *,
                  percentile: str = "p90") -> list[RegisteredVersion]:
    """The versions on the front of (mIoU max, latency at `percentile` on `device` min), fastest
    first, among the GFLOPs front's versions (tag pareto=true) with an undisturbed figure there.

    The pareto functions minimise the cost they find in a point's `gflops`; here it carries the
    latency in ms.
    """
    profiled = {v.version: v for v in versions if v.pareto and device in v.latency
                and not v.latency[device].disturbed and math.isfinite(v.miou)}
    points = [Point(id=v.version, miou=v.miou, gflops=v.latency[device].ms(percentile))
              for v in profiled.values()]
    return [profiled[p.id] for p in sorted(pareto_front(points), key=lambda p: p.gflops)]


def order_disagreement(pairs: Iterable[tuple[float, float]]) -> dict:
    """How far ordering models by GFLOPs and by latency disagree, over (gflops, latency) pairs.

    Returns:
        {"pairs": model pairs compared, "discordant": pairs the two orders rank oppositely,
        "kendall_tau": (concordant − discordant) / pairs, 1 when the orders agree (None with
        fewer than two models)}. Ties on either side count as neither.
    """
    items = list(pairs)
    concordant = discordant = 0
    for i, (g1, t1) in enumerate(items):
        for g2, t2 in items[i + 1:]:
            sign = (g1 - g2) * (t1 - t2)
            concordant += sign > 0
            discordant += sign < 0
    total = len(items) * (len(items) - 1) // 2
    return {"pairs": total, "discordant": discordant,
            "kendall_tau": (concordant - discordant) / total if total else None}
