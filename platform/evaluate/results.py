"""What an evaluation measured (`evaluation.evaluate` fills it): the split's summary, one row
per image, and the figures per scene kind where the data records kinds."""

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

if TYPE_CHECKING:
    from dynroute.platform.evaluate.evaluation import TTA, ConfusionMatrix

PER_IMAGE_COLUMNS = ("id", "gflops", "latency_ms", "pixel_accuracy", "paths_open")


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


@dataclass(frozen=True)
class ImageRow:
    id: str
    gflops: float
    latency_ms: float
    pixel_accuracy: float  # NaN for an image whose pixels are all ignored
    paths_open: int = 0  # the routing paths its route opened (summed over TTA passes)


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
        return flat | {
            "cost_height": self.cost_resolution[0], "cost_width": self.cost_resolution[1],
            "tta": None if self.tta is None else {"scales": list(self.tta.scales),
                                                  "flip": self.tta.flip},
            "per_class_iou": dict(self.per_class_iou),
            "gate_probability": {str(p): f for p, f in sorted(self.gate_probability.items())},
            "by_kind": self.by_kind(),
        }

    def write_per_image(self, path: Path) -> Path:
        """One Parquet row per image: PER_IMAGE_COLUMNS, and its scene kind where known
        (atomic)."""
        table = pa.table({
            "id": pa.array([r.id for r in self.per_image], pa.string()),
            **{c: pa.array([getattr(r, c) for r in self.per_image], pa.float64())
               for c in PER_IMAGE_COLUMNS[1:-1]},
            "paths_open": pa.array([r.paths_open for r in self.per_image], pa.int64()),
        })
        if self.scene_kinds:
            table = table.append_column("kind", pa.array(
                [self.scene_kinds.get(r.id) for r in self.per_image], pa.string()))
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path


def finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
