"""Evaluation of a segmentation network over a split: accuracy, real cost, latency and routes.

Accuracy follows the Cityscapes benchmark scripts (`evalPixelLevelSemanticLabeling`): one
confusion matrix over all pixels of the split whose ground truth is not ignored, IoU_c =
TP / (TP + FP + FN), NaN for a class absent from both the ground truth and the prediction (on
non-ignored pixels), mIoU = mean over the non-NaN classes. Cost is the analytic *real* FLOPs of
the route each image took, at a declared resolution (docs/model.md §7), not at the tensor's size.

Predictions (optional) are written so that the official tools read them unchanged
(`prediction_files.py`).

Reading: on a GPU, decoding the split's images would otherwise keep it idle most of the time: one
core reads and decodes a Cityscapes val image and its label more slowly than a GPU segments it
(benchmarks/README.md, "Data loading"). So `evaluate` reads through a DataLoader with
loader processes wherever the training would use them (`samples`, `fast_path.loader_workers`:
the cores per GPU less one on CUDA, none on a CPU, where the cores run the network).

Test-time augmentation averages the *logits* of every scale × flip pass, each resized back to
the image size. Its cost is the sum over passes, pass s costed at round(H·s) × round(W·s) of the
declared resolution; its latency is that of all passes together.

Latency follows latency.py's rules, without slowing the accuracy evaluation: each image is timed
once (after `warmup` untimed passes), and the result records what it was measured on (the device
key and conditions) and whether another job shared the device meanwhile (`LatencyWatch`: the
calibration workload before and after the loop, and on a CPU the cores other processes kept
busy). One pass per image cannot discard a slow spell, and another job sharing the cores made a
27 ms image take over a second (latency.py). So a disturbed latency is withheld
(`EvaluationResult.latency` says why), and the accuracy is reported all the same.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dynroute.models import DynamicRoutingNetwork
from dynroute.models.route_statistics import RouteStatistics
from dynroute.models.routing_space import NodeId
from dynroute.platform.data.shards import IGNORE_INDEX
from dynroute.platform.device import fast_path
from dynroute.platform.evaluate.disturbance import LatencyWatch
from dynroute.platform.evaluate.latency import Conditions, device_key, processor_name
from dynroute.platform.evaluate.prediction_files import (
    PredictionFormat,
    cityscapes_label_ids,
    write_prediction,
)
from dynroute.platform.evaluate.results import (
    Distribution,
    EvaluationLatency,
    EvaluationResult,
    ImageRow,
    finite,
)


# -- confusion matrix -------------------------------------------------------------------------
class ConfusionMatrix:
    """Pixel counts `matrix[target, prediction]` (int64), summable across ranks (all-reduce it).

    Args:
        num_classes: K; valid labels are 0..K-1.
        ignore_index: ground-truth value whose pixels are left out entirely.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # (K, K)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count pixels of `pred` against `target` (same shape, integer class indices)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                             f"differ in shape")
        k = self.num_classes
        valid = target != self.ignore_index
        index = target[valid].long() * k + pred[valid].long()
        counts = torch.bincount(index, minlength=k * k)
        if counts.numel() > k * k:  # bincount grew: a value ≥ K slipped in
            raise ValueError(f"labels or predictions outside 0..{k - 1} (ignore "
                             f"{self.ignore_index}); check num_classes and the label mapping")
        self.matrix = self.matrix.to(counts.device)  # follow the data (NCCL needs it on GPU)
        self.matrix += counts.view(k, k)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of `other` (e.g. another worker's)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a "
                             f"{self.num_classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)

    def iou(self) -> np.ndarray:
        """(K,) float64 IoU per class; NaN where the class is in neither GT nor prediction."""
        m = self.matrix.cpu().numpy().astype(np.float64)
        tp = np.diag(m)
        denom = m.sum(axis=0) + m.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    @property
    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else math.nan

    @property
    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return int(self.matrix.diagonal().sum()) / total if total else math.nan


# -- test-time augmentation -------------------------------------------------------------------
@dataclass(frozen=True)
class TTA:
    """Multi-scale (bilinear) and optional horizontal-flip test-time augmentation."""

    scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"TTA scales must be positive factors, got {self.scales}")


@dataclass(frozen=True)
class Pass:
    """One forward pass of an inference: its scale, whether flipped, and the gates it took."""

    scale: float
    flip: bool
    gates: dict[NodeId, torch.Tensor]


@dataclass(frozen=True)
class Inference:
    """The logits of one image and the forward passes that made them."""

    logits: torch.Tensor  # (1, K, H, W), averaged over the passes
    passes: tuple[Pass, ...]


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """round(H·s) × round(W·s), at least 1 pixel a side."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def infer(network: DynamicRoutingNetwork, image: torch.Tensor, *, tta: TTA | None = None
          ) -> Inference:
    """Logits of one image (1, 3, H, W), plain or averaged over the TTA passes."""
    size = (image.shape[-2], image.shape[-1])
    plan = [(1.0, False)] if tta is None else [
        (s, f) for s in tta.scales for f in ((False, True) if tta.flip else (False,))]
    total: torch.Tensor | None = None
    passes = []
    for scale, flip in plan:
        x = image if scale == 1.0 else F.interpolate(
            image, size=scaled(size, scale), mode="bilinear", align_corners=False)
        x = x.flip(-1) if flip else x
        out = network(x)
        logits = out.logits.flip(-1) if flip else out.logits  # (1, K, h, w)
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
        passes.append(Pass(scale=scale, flip=flip, gates=out.gates))
    assert total is not None
    return Inference(logits=total / len(plan), passes=tuple(passes))


# -- evaluation -------------------------------------------------------------------------------
def _is_on(module: torch.nn.Module, device: torch.device) -> bool:
    weight = next(module.parameters(), None)
    return weight is None or (weight.device.type == device.type
                              and device.index in (None, weight.device.index))


def samples(dataset: Iterable[Mapping], device: torch.device, *, workers: int | None = None
            ) -> Iterable[Mapping]:
    """What `evaluate` iterates: `dataset` itself, or a DataLoader decoding its samples one by one
    in `workers` background processes (into pinned memory for a GPU) while the network runs.

    workers: None for `fast_path.loader_workers(device)` (none on a CPU); only a torch `Dataset`
    is read through loader processes, any other iterable as it is.
    """
    workers = fast_path.loader_workers(device) if workers is None else workers
    if workers < 0:
        raise ValueError(f"loader_workers={workers}: use 0 (read in this process) or more")
    if workers == 0 or not isinstance(dataset, Dataset):
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      pin_memory=device.type == "cuda")


def evaluate(network: DynamicRoutingNetwork, dataset: Iterable[Mapping], *, num_classes: int,
             class_names: Sequence[str], cost_resolution: tuple[int, int],
             device: str | torch.device = "cpu", tta: TTA | None = None,
             predictions_dir: Path | None = None,
             prediction_format: PredictionFormat | None = None,
             progress: Callable[[int, int], None] | None = None, limit: int | None = None,
             warmup: int = 0, fast: bool = True, loader_workers: int | None = None,
             scene_kinds: Mapping[str, str] | None = None) -> EvaluationResult:
    """Evaluate `network` on every sample of `dataset`, one image at a time, hard routing.

    Returns the accuracy, cost and routes always; the latency only when no other job disturbed
    the timing (else `latency_ms` is all NaN and `latency` says why).

    Args:
        network: a routing network (eval mode is set here and the previous mode restored).
        dataset: yields {"image": (3, H, W) BGR − mean, "label": (H, W) train ids, "id": str},
            e.g. `ShardDataset(train=False)` or a DataLoader over it with batch_size=None.
        num_classes, class_names: K and the K names used for `per_class_iou`.
        cost_resolution: (H, W) at which real FLOPs are declared (1024×2048 Cityscapes, 512×512
            VOC), whatever the image size.
        device: where the network runs (a copy of it, when it is elsewhere); the confusion
            matrix is counted there too. `fast_path.inference_device` picks one.
        tta: test-time augmentation, None for single scale without flip.
        predictions_dir: write the argmax prediction of every image here (see the module doc).
        prediction_format: "cityscapes" (label-id PNGs, needs K = 19) or "voc" (palette PNGs).
        progress: called as (done, total) after each image; total is -1 if unknown.
        limit: stop after this many images.
        warmup: untimed forwards on the first image (CUDA context, cuDNN autotuning).
        fast: the device's measured fast path (fast_path.py: channels-last, folded BN); False
            runs the plain network. Both compute the same fp32 function (up to rounding).
        loader_workers: processes that read and decode samples ahead (`samples`); None: none
            on a CPU, the cores per GPU less one on CUDA.
        scene_kinds: image id → scene kind (`shards.read_scene_kinds`), for `by_kind`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: evaluate at least one image, or pass None for all")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
    if (predictions_dir is None) != (prediction_format is None):
        raise ValueError("give predictions_dir and prediction_format together")
    lookup = None
    if prediction_format == "cityscapes":
        if num_classes != 19:
            raise ValueError(f"Cityscapes predictions need the 19 train ids, got {num_classes}")
        lookup = cityscapes_label_ids()
    elif prediction_format not in (None, "voc"):
        raise ValueError(f"prediction_format={prediction_format!r}: use 'cityscapes' or 'voc'")
    if predictions_dir is not None:
        predictions_dir = Path(predictions_dir)
        predictions_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    total = -1 if not hasattr(dataset, "__len__") else len(dataset)  # type: ignore[arg-type]
    if limit is not None:
        total = limit if total < 0 else min(total, limit)

    def sync() -> None:  # CUDA runs asynchronously: time only finished work
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    confusion = ConfusionMatrix(num_classes)
    stats = RouteStatistics(network.route, threshold=network.closed_threshold)
    rows: list[ImageRow] = []
    sizes: list[tuple[int, int]] = []
    workers = fast_path.loader_workers(device) if loader_workers is None else loader_workers
    was_training = network.training
    network.eval()
    layout = fast_path.for_inference(device, fast=fast)
    runner = layout.inference_network(network)  # a folded copy on the fast path
    if not _is_on(runner, device):  # a copy on `device`; the caller's network stays where it is
        runner = (copy.deepcopy(runner) if runner is network else runner).to(device)
    try:
        with torch.inference_mode(), LatencyWatch(device, children=workers > 0) as watch:
            for sample in samples(dataset, device, workers=workers):
                image = layout.images(  # (1, 3, H, W)
                    sample["image"].to(device, non_blocking=True).unsqueeze(0))
                label = sample["label"].to(device, non_blocking=True)  # (H, W)
                if not rows:
                    for _ in range(warmup):
                        infer(runner, image, tta=tta)
                sync()
                start = time.perf_counter()
                result = infer(runner, image, tta=tta)
                sync()
                latency = (time.perf_counter() - start) * 1e3
                sizes.append((int(image.shape[-2]), int(image.shape[-1])))
                pred = result.logits.argmax(dim=1)[0]  # (H, W)
                confusion.update(pred, label)
                gflops, opened = 0.0, 0
                for p in result.passes:
                    stats.update(p.gates)
                    opened += sum(int((alpha > network.closed_threshold).sum())
                                  for alpha in p.gates.values())
                    cost = network.cost_model(*scaled(cost_resolution, p.scale))
                    gflops += float(cost.real(p.gates)[0]) / 1e9
                valid = label != IGNORE_INDEX
                n_valid = int(valid.sum())
                accuracy = (int(((pred == label) & valid).sum()) / n_valid if n_valid
                            else math.nan)
                rows.append(ImageRow(id=str(sample["id"]), gflops=gflops, latency_ms=latency,
                                     pixel_accuracy=accuracy, paths_open=opened))
                if predictions_dir is not None and prediction_format is not None:
                    write_prediction(pred.to(torch.uint8).cpu().numpy(), str(sample["id"]),
                                      predictions_dir, prediction_format, lookup)
                if progress is not None:
                    progress(len(rows), total)
                if limit is not None and len(rows) >= limit:
                    break
    finally:
        network.train(was_training)
    if not rows:
        raise ValueError("the dataset yielded no samples to evaluate")
    iou = confusion.iou()
    timing = _latency(device, watch, sizes=sizes, warmup=warmup, fast=fast, workers=workers)
    return EvaluationResult(
        miou=confusion.miou, pixel_accuracy=confusion.pixel_accuracy,
        per_class_iou={name: finite(v) for name, v in zip(class_names, iou, strict=True)},
        images=len(rows), gflops=Distribution.of([r.gflops for r in rows]),
        latency_ms=(Distribution.withheld() if timing.disturbed
                    else Distribution.of([r.latency_ms for r in rows])),
        cost_resolution=(int(cost_resolution[0]), int(cost_resolution[1])),
        gate_probability=stats.path_frequency(), route_statistics=stats, per_image=rows,
        confusion=confusion, tta=tta,
        scene_kinds=dict(scene_kinds) if scene_kinds else None, latency=timing)


def _latency(device: torch.device, watch: LatencyWatch, *, sizes: Sequence[tuple[int, int]],
             warmup: int, fast: bool, workers: int) -> EvaluationLatency:
    """What the loop's timings were measured on and under, and the watch's verdict."""
    conditions = Conditions(
        device=str(device), processor=processor_name(device), threads=torch.get_num_threads(),
        torch=torch.__version__, warmup=warmup, repeats=1, images=len(sizes),
        resolution=sizes[0], fast=fast, host=platform.node() or os.uname()[1])
    return EvaluationLatency(
        key=device_key(device), conditions=conditions, mixed_sizes=len(set(sizes)) > 1,
        loader_workers=workers, calibration_ms=tuple(watch.calibration),
        disturbance=watch.disturbance())

