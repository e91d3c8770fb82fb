"""What an evaluation measured (`evaluation.evaluate` fills it): the split's summary, one row
per image, the figures per scene kind where the data records kinds, and how its latency was
timed and whether another job disturbed it (`EvaluationLatency`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynroute.models.route_statistics import RouteStatistics
from dynroute.models.routing_space import Path as RoutePath
from dynroute.platform import metrics
from dynroute.platform.evaluate.disturbance import Disturbance
from dynroute.platform.evaluate.latency import Conditions

if TYPE_CHECKING:
    from dynroute.platform.evaluate.evaluation import TTA, ConfusionMatrix

PER_IMAGE_COLUMNS = ("id", "gflops", metrics.LATENCY_MS, metrics.LATENCY_DISTURBED,
                     "pixel_accuracy", "paths_open")


@dataclass(frozen=True)
class Distribution:
    """Summary of a per-image quantity over the split."""

    mean: float
    min: float
    max: float
    p50: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        v = np.asarray(values, dtype=np.float64)
        return cls(mean=float(v.mean()), min=float(v.min()), max=float(v.max()),
                   p50=float(np.percentile(v, 50)), p90=float(np.percentile(v, 90)))

    @classmethod
    def withheld(cls) -> Distribution:
        """All NaN: a quantity measured but not to be reported (a disturbed latency), so that
        no caller reads a figure from it and the summary writes nulls."""
        return cls(mean=math.nan, min=math.nan, max=math.nan, p50=math.nan, p90=math.nan)


@dataclass(frozen=True)
class ImageRow:
    id: str
    gflops: float
    latency_ms: float
    pixel_accuracy: float  # NaN for an image whose pixels are all ignored
    paths_open: int = 0  # the routing paths its route opened (summed over TTA passes)


@dataclass(frozen=True)
class EvaluationLatency:
    """How `evaluate` timed its images and whether another job disturbed it, by latency.py's
    rules: the device key, the conditions (one timed pass per image, after `warmup` untimed
    ones), the calibration workload timed before and after the loop, and on a CPU the cores
    other processes kept busy meanwhile. One pass per image cannot discard a slow spell, so a
    disturbed latency is withheld, not reported; `dynroute profile` measures it properly."""

    key: str  # latency.device_key
    conditions: Conditions  # repeats=1; resolution: the first image's (H, W)
    mixed_sizes: bool  # the images were not all of that size
    loader_workers: int  # processes reading ahead (their CPU time counts as ours)
    calibration_ms: tuple[float, ...]  # before and after the loop
    disturbance: Disturbance

    @property
    def disturbed(self) -> bool:
        return self.disturbance.disturbed

    def to_dict(self) -> dict:
        conditions = asdict(self.conditions) | {"resolution": list(self.conditions.resolution)}
        d = self.disturbance
        return {"key": self.key, "conditions": conditions, "mixed_sizes": self.mixed_sizes,
                "loader_workers": self.loader_workers,
                "calibration_ms": [finite(v) for v in self.calibration_ms],
                "busy_elsewhere": finite(d.busy_elsewhere), "busy_limit": finite(d.busy_limit),
                "calibration_drift": finite(d.calibration_drift), "max_drift": d.max_drift,
                "disturbed": d.disturbed, "reason": d.reason or None}


@dataclass
class EvaluationResult:
    """What `evaluate` measured. `gate_probability`: path → fraction of forward passes (one per
    image without TTA) in which it was open."""

    miou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float | None]
    images: int
    gflops: Distribution
    latency_ms: Distribution
    cost_resolution: tuple[int, int]
    gate_probability: dict[RoutePath, float]
    route_statistics: RouteStatistics
    per_image: list[ImageRow] = field(default_factory=list)
    confusion: ConfusionMatrix | None = None
    tta: TTA | None = None
    scene_kinds: Mapping[str, str] | None = None  # image id → kind, where the data records it
    # How the latency was timed; when `latency.disturbed`, `latency_ms` is withheld (all NaN)
    # and only the per-image rows keep the raw timings.
    latency: EvaluationLatency | None = None

    @property
    def latency_disturbed(self) -> bool:
        return self.latency is not None and self.latency.disturbed

    def latency_line(self) -> str:
        """What `dynroute evaluate` says of the latency: its figures and conditions, or that
        it was disturbed (by how much) and not recorded."""
        if self.latency is None:
            return "latency: not timed"
        lat, d = self.latency, self.latency.disturbance
        if lat.disturbed:
            return (f"latency DISTURBED, not recorded: {d.reason} while timing on {lat.key}. "
                    f"One timed pass per image cannot tell the network from another job; "
                    f"`dynroute profile` measures latency properly (interleaved repeats, "
                    f"measured again while disturbed)")
        busy = (f"{d.busy_elsewhere:.2f} cores busy elsewhere, "
                if math.isfinite(d.busy_elsewhere) else "")
        return (f"latency p50 {self.latency_ms.p50:.1f} ms, p90 {self.latency_ms.p90:.1f} ms "
                f"on {lat.key} (one timed pass per image after {lat.conditions.warmup} untimed; "
                f"{busy}calibration drift {d.calibration_drift:.2f}x)")

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Per scene kind (`scene_kinds`): its images, their real GFLOPs (mean, min, max), open
        paths and pixel accuracy (means); {} when the data records no kinds."""
        groups: dict[str, list[ImageRow]] = {}
        for row in self.per_image:
            kind = (self.scene_kinds or {}).get(row.id)
            if kind is not None:
                groups.setdefault(kind, []).append(row)
        summary = {}
        for kind, rows in sorted(groups.items()):
            gflops = [r.gflops for r in rows]
            accuracy = [r.pixel_accuracy for r in rows if not math.isnan(r.pixel_accuracy)]
            summary[kind] = {
                "images": len(rows), "gflops_mean": float(np.mean(gflops)),
                "gflops_min": min(gflops), "gflops_max": max(gflops),
                "paths_open_mean": float(np.mean([r.paths_open for r in rows])),
                "pixel_accuracy_mean": float(np.mean(accuracy)) if accuracy else None}
        return summary

    def to_dict(self) -> dict:
        """JSON-safe, flat where possible; keys from `dynroute.platform.metrics`."""
        flat = {metrics.MIOU: finite(self.miou),
                metrics.PIXEL_ACCURACY: finite(self.pixel_accuracy), "images": self.images}
        for name, dist in (("gflops", self.gflops), (metrics.LATENCY_MS, self.latency_ms)):
            flat |= {f"{name}_{stat}": finite(value) for stat, value in asdict(dist).items()}
        if self.latency is not None:
            d = self.latency.disturbance
            flat |= {metrics.LATENCY_DISTURBED: d.disturbed,
                     metrics.LATENCY_BUSY_ELSEWHERE: finite(d.busy_elsewhere),
                     metrics.LATENCY_CALIBRATION_DRIFT: finite(d.calibration_drift)}
        return flat | {
            "latency": None if self.latency is None else self.latency.to_dict(),
            "cost_height": self.cost_resolution[0], "cost_width": self.cost_resolution[1],
            "tta": None if self.tta is None else {"scales": list(self.tta.scales),
                                                  "flip": self.tta.flip},
            "per_class_iou": dict(self.per_class_iou),
            "gate_probability": {str(p): f for p, f in sorted(self.gate_probability.items())},
            "by_kind": self.by_kind(),
        }

    def write_per_image(self, path: Path) -> Path:
        """One Parquet row per image: PER_IMAGE_COLUMNS, and its scene kind where known
        (atomic). `latency_ms` is the raw timing even when disturbed; `latency_disturbed` (the
        same on every row) says so, and the file's metadata names the device key."""
        rows = self.per_image
        table = pa.table({
            "id": pa.array([r.id for r in rows], pa.string()),
            **{c: pa.array([getattr(r, c) for r in rows], pa.float64())
               for c in ("gflops", "latency_ms")},
            metrics.LATENCY_DISTURBED: pa.array([self.latency_disturbed] * len(rows),
                                                pa.bool_()),
            "pixel_accuracy": pa.array([r.pixel_accuracy for r in rows], pa.float64()),
            "paths_open": pa.array([r.paths_open for r in rows], pa.int64()),
        })
        if self.scene_kinds:
            table = table.append_column("kind", pa.array(
                [self.scene_kinds.get(r.id) for r in rows], pa.string()))
        if self.latency is not None:
            table = table.replace_schema_metadata({
                "latency_device": self.latency.key,
                "latency_reason": self.latency.disturbance.reason})
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path


def finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
