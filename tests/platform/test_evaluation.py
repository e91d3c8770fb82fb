"""Evaluation: the confusion matrix by hand, agreement with the Cityscapes benchmark scripts, real
GFLOPs from the routes taken, gate probabilities, TTA, and the files written."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dynroute.models import NetworkConfig, RoutingOutput, build_network
from dynroute.models.gate import pin_gate
from dynroute.models.route_statistics import common_x
from dynroute.models.routing_space import Path as RoutePath
from dynroute.pipelines.labels import CITYSCAPES_CLASSES, VOC_CLASSES
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.synth import synthesize
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_scene_kinds
from dynroute.platform.evaluate.disturbance import (
    MAX_BUSY_ELSEWHERE,
    BusyElsewhere,
    disturbance,
    free_cores,
)
from dynroute.platform.evaluate.evaluation import TTA, ConfusionMatrix, evaluate, infer
from dynroute.platform.evaluate.latency import device_key
from dynroute.platform.evaluate.prediction_files import voc_palette
from dynroute.platform.evaluate.results import PER_IMAGE_COLUMNS

COST = (1024, 2048)
K = len(CITYSCAPES_CLASSES)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    """A tiny synthetic Cityscapes tree (raw/) and its shards (prepared/), made once."""
    root = tmp_path_factory.mktemp("cityscapes")
    synthesize("cityscapes", root / "raw", train=2, val=4, height=64, width=128, seed=1)
    prepare("cityscapes", root / "raw", root / "prepared", workers=1)
    return root


def val_set(root: Path) -> ShardDataset:
    return ShardDataset(root=str(root / "prepared"), split="val", train=False, crop=None)


def tiny_network(seed: int = 0, num_classes: int = K):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(layers=4, base_channels=4, num_classes=num_classes))


def pin_all(network, closed: dict | None = None) -> None:
    """Pin every soft gate open, except the paths listed per node in `closed`."""
    closed = closed or {}
    for node in network.route.cells:
        paths = network.route.paths_of(node)
        pin_gate(network.node(node).gate, [p not in closed.get(node, ()) for p in paths])


def run(network, root: Path, **kwargs):
    return evaluate(network, val_set(root), num_classes=K, class_names=CITYSCAPES_CLASSES,
                    cost_resolution=COST, **kwargs)


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class Wrapped(nn.Module):
    """The tiny network's routing (gates, cost) with logits made by `make_logits(image)`."""

    def __init__(self, network, make_logits) -> None:
        super().__init__()
        self.network = network
        self.make_logits = make_logits
        self.route = network.route
        self.closed_threshold = network.closed_threshold

    def cost_model(self, height: int, width: int):
        return self.network.cost_model(height, width)

    def forward(self, images: torch.Tensor) -> RoutingOutput:
        gates = self.network(images).gates
        return RoutingOutput(logits=self.make_logits(images), gates=gates)


def oracle(network, root: Path) -> Wrapped:
    """Logits = one-hot of the ground truth with every 5th pixel shifted to the next class and
    the road of the left half called sidewalk, so IoUs lie strictly between 0 and 1."""
    labels = {_key(s["image"]): s["label"] for s in val_set(root)}

    def make_logits(images: torch.Tensor) -> torch.Tensor:
        label = labels[_key(images[0])]
        pred = label.clone()
        pred[label == 255] = 3  # ignored by both evaluations
        flat = pred.view(-1)
        flat[::5] = (flat[::5] + 1) % K
        half = pred[:, : pred.shape[1] // 2]
        half[half == CITYSCAPES_CLASSES.index("road")] = CITYSCAPES_CLASSES.index("sidewalk")
        return F.one_hot(pred, K).permute(2, 0, 1)[None].float()  # (1, K, H, W)

    return Wrapped(network, make_logits)


# -- the confusion matrix ---------------------------------------------------------------------
def test_confusion_matrix_by_hand() -> None:
    cm = ConfusionMatrix(5)
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [3, 4, 0, 2]])  # predictions on ignore pixels never count
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    expected = torch.zeros(5, 5, dtype=torch.int64)
    expected[0, 0] = expected[0, 1] = expected[2, 3] = 1
    expected[1, 1] = 2
    assert torch.equal(cm.matrix, expected)
    iou = cm.iou()
    # class 0: 1 / (2 + 1 - 1); class 1: 2 / (2 + 3 - 2); class 2 in GT only, class 3 in the
    # prediction only: 0; class 4 in neither (its prediction fell on an ignore pixel): NaN.
    np.testing.assert_allclose(iou[:4], [0.5, 2 / 3, 0.0, 0.0])
    assert math.isnan(iou[4])
    assert cm.miou == pytest.approx((0.5 + 2 / 3) / 4)
    assert cm.pixel_accuracy == pytest.approx(3 / 5)


def test_confusion_matrix_merge_equals_both_updates() -> None:
    gen = torch.Generator().manual_seed(0)
    a_pred, b_pred = (torch.randint(0, 6, (3, 17, 9), generator=gen) for _ in range(2))
    a_tgt, b_tgt = (torch.randint(0, 7, (3, 17, 9), generator=gen) for _ in range(2))
    a_tgt[a_tgt == 6] = 255
    b_tgt[b_tgt == 6] = 255
    a, b, both = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    a.update(a_pred, a_tgt)
    b.update(b_pred, b_tgt)
    both.update(a_pred, a_tgt)
    both.update(b_pred.flatten(), b_tgt.flatten())
    a.merge(b)
    assert torch.equal(a.matrix, both.matrix)
    assert int(a.matrix.sum()) == int((a_tgt != 255).sum() + (b_tgt != 255).sum())


def test_confusion_matrix_rejects_out_of_range_values() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))


# -- agreement with the Cityscapes benchmark scripts ------------------------------------------
def cityscapes_scripts(raw: Path, predictions: Path, monkeypatch) -> dict:
    """Run `evalPixelLevelSemanticLabeling` on our prediction files, as its users would."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    monkeypatch.setenv("CITYSCAPES_DATASET", str(raw))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(predictions))  # where getPrediction looks
    args = copy.copy(cs.args)  # its module-level settings, not shared with other tests
    args.predictionPath = None
    args.predictionWalk = None
    args.evalInstLevelScore = False  # the synthetic tree has no *_instanceIds.png
    args.JSONOutput = False
    args.quiet = True
    gts = sorted(str(p) for p in (raw / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(gts) == 4
    # The official matcher finds exactly one prediction per ground truth, or exits.
    preds = [cs.getPrediction(args, gt) for gt in gts]
    assert [Path(p).name for p in preds] == [
        Path(gt).name.replace("_gtFine_labelIds.png", "_pred.png") for gt in gts]
    return cs.evaluateImgLists(preds, gts, args)


@pytest.mark.parametrize("kind", ["untrained", "oracle"])
def test_miou_agrees_with_cityscapes_scripts(kind, cityscapes, tmp_path, monkeypatch) -> None:
    network = tiny_network() if kind == "untrained" else oracle(tiny_network(), cityscapes)
    ours = run(network, cityscapes, predictions_dir=tmp_path / "pred",
               prediction_format="cityscapes")
    theirs = cityscapes_scripts(cityscapes / "raw", tmp_path / "pred", monkeypatch)
    assert ours.miou == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    for name in CITYSCAPES_CLASSES:
        score = theirs["classScores"][name]
        if math.isnan(score):
            assert ours.per_class_iou[name] is None, name
        else:
            assert ours.per_class_iou[name] == pytest.approx(score, abs=1e-6), name
    present = [v for v in ours.per_class_iou.values() if v is not None]
    if kind == "oracle":  # the comparison means something: IoUs neither 0 nor 1
        assert 0.3 < ours.miou < 1.0
        assert sum(0.0 < v < 1.0 for v in present) >= 3


# -- cost and routes --------------------------------------------------------------------------
def test_gflops_are_the_real_cost_of_the_routes_taken(cityscapes) -> None:
    network = tiny_network()
    result = run(network, cityscapes)
    sample = next(iter(val_set(cityscapes)))
    with torch.inference_mode():
        gates = network.eval()(sample["image"][None]).gates
    direct = float(network.cost_model(*COST).real(gates)[0]) / 1e9
    row = next(r for r in result.per_image if r.id == sample["id"])
    assert row.gflops == pytest.approx(direct, rel=1e-12)
    values = [r.gflops for r in result.per_image]
    assert result.gflops.mean == pytest.approx(np.mean(values))
    assert (result.gflops.min, result.gflops.max) == (min(values), max(values))
    # Declared resolution, not the 64×128 tensor: the stem alone costs more than that image.
    assert result.gflops.min * 1e9 > network.cost_model(64, 128).all_open_real()


def test_all_gates_open_costs_all_open_real(cityscapes) -> None:
    network = tiny_network()
    pin_all(network)
    result = run(network, cityscapes)
    expected = network.cost_model(*COST).all_open_real() / 1e9
    assert [r.gflops for r in result.per_image] == pytest.approx([expected] * 4, rel=1e-12)
    assert result.gflops.p90 == pytest.approx(expected)


def test_gate_probability_follows_pinned_gates(cityscapes) -> None:
    network = tiny_network()
    down = RoutePath(-1, 0, "down")
    pin_all(network, closed={(-1, 0): [down], (1, 0): [RoutePath(1, 0, "keep")]})
    result = run(network, cityscapes)
    prob = result.gate_probability
    assert result.route_statistics.samples == 4
    assert prob[down] == 0.0
    assert prob[RoutePath(-1, 0, "keep")] == 1.0
    assert prob[RoutePath(1, 0, "keep")] == 0.0
    assert prob[RoutePath(1, 0, "down")] == 1.0
    # Cell (0, 1) is fed only by the init cell's down path: never reached, never open.
    assert all(prob[p] == 0.0 for p in network.route.paths_of((0, 1)))
    assert all(prob[p] == 1.0 for p in network.route.paths_of((0, 0)))
    assert set(prob) == set(network.route.paths)
    common = common_x(result.route_statistics)
    assert down not in common.paths and RoutePath(0, 0, "down") in common.paths


# -- test-time augmentation -------------------------------------------------------------------
def test_tta_single_scale_without_flip_is_plain_evaluation(cityscapes) -> None:
    network = tiny_network()
    image = next(iter(val_set(cityscapes)))["image"][None]
    with torch.inference_mode():
        plain = network.eval()(image).logits
        one = infer(network, image, tta=TTA(scales=(1.0,), flip=False))
    assert torch.equal(one.logits, plain)
    a, b = run(network, cityscapes), run(network, cityscapes, tta=TTA(scales=(1.0,), flip=False))
    assert a.miou == b.miou and a.per_class_iou == b.per_class_iou
    assert [r.gflops for r in a.per_image] == [r.gflops for r in b.per_image]


def test_tta_flip_and_scales(cityscapes) -> None:
    network = tiny_network()
    pin_all(network)
    image = next(iter(val_set(cityscapes)))["image"][None]
    with torch.inference_mode():
        plain = network.eval()(image).logits
        flipped = infer(network, image, tta=TTA(scales=(1.0,), flip=True))
    assert len(flipped.passes) == 2 and flipped.logits.shape == plain.shape
    assert not torch.allclose(flipped.logits, plain)
    full = network.cost_model(*COST).all_open_real() / 1e9
    result = run(network, cityscapes, tta=TTA(scales=(1.0,), flip=True))
    assert [r.gflops for r in result.per_image] == pytest.approx([2 * full] * 4)
    assert result.route_statistics.samples == 8  # one per forward pass
    half = network.cost_model(512, 1024).all_open_real() / 1e9
    result = run(network, cityscapes, tta=TTA(scales=(0.5, 1.0), flip=False))
    assert result.gflops.mean == pytest.approx(half + full)


def test_tta_undoes_the_flip() -> None:
    """With a per-pixel (flip-equivariant) network, flip TTA must give the plain logits back."""
    network = tiny_network()
    pixelwise = Wrapped(network, lambda x: torch.cat([x * (c + 1) for c in range(3)], dim=1))
    image = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        plain = pixelwise.eval()(image).logits
        tta = infer(pixelwise, image, tta=TTA(scales=(1.0,), flip=True))
    torch.testing.assert_close(tta.logits, plain)


# -- outputs ----------------------------------------------------------------------------------
def test_per_image_parquet_and_json(cityscapes, tmp_path) -> None:
    network = tiny_network()
    network.train()
    calls = []
    result = run(network, cityscapes, progress=lambda done, total: calls.append((done, total)))
    assert network.training  # the mode it came in with
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    table = pq.read_table(result.write_per_image(tmp_path / "per_image.parquet"))
    assert table.column_names == list(PER_IMAGE_COLUMNS)
    assert table.num_rows == result.images == 4
    assert table.column("id").to_pylist() == [s["id"] for s in val_set(cityscapes)]
    assert all(v > 0 for v in table.column("latency_ms").to_pylist())  # raw, even if disturbed
    assert table.column("latency_disturbed").to_pylist() == [result.latency.disturbed] * 4
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    for key in ("miou", "pixel_accuracy", "gflops_mean", "gflops_max", "gflops_min", "gflops_p50",
                "gflops_p90"):
        assert isinstance(data[key], float), key
    for key in ("latency_ms_mean", "latency_ms_p50", "latency_ms_p90"):  # withheld if disturbed
        assert isinstance(data[key], type(None) if result.latency.disturbed else float), key
    assert set(data["per_class_iou"]) == set(CITYSCAPES_CLASSES)
    assert data["gate_probability"]["-1:0:keep"] == result.gate_probability[RoutePath(-1, 0,
                                                                                      "keep")]
    assert run(network, cityscapes, limit=2).images == 2


def test_voc_predictions_are_palette_pngs(tmp_path) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    synthesize("voc", raw, train=2, val=3, height=64, width=64, seed=1, sbd_train=1, sbd_val=1)
    prepare("voc", raw, prepared, workers=1)
    dataset = ShardDataset(root=str(prepared), split="val", train=False, crop=None)
    network = tiny_network(num_classes=len(VOC_CLASSES))
    result = evaluate(network, dataset, num_classes=len(VOC_CLASSES), class_names=VOC_CLASSES,
                      cost_resolution=(512, 512), predictions_dir=tmp_path / "pred",
                      prediction_format="voc")
    accuracy = {r.id: r.pixel_accuracy for r in result.per_image}
    assert len(accuracy) == 3
    for sample in dataset:
        png = Image.open(tmp_path / "pred" / f"{sample['id']}.png")
        assert png.mode == "P"
        assert png.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0] == voc_palette()[:9]
        pred = np.asarray(png)
        label = sample["label"].numpy()
        assert pred.shape == label.shape and pred.max() < len(VOC_CLASSES)
        valid = label != 255
        assert (pred[valid] == label[valid]).mean() == pytest.approx(accuracy[sample["id"]])
    assert not list((tmp_path / "pred").glob(".*"))  # no temporary files left


def test_bad_arguments_are_rejected(cityscapes, tmp_path) -> None:
    network = tiny_network()
    with pytest.raises(ValueError, match="19 train ids"):
        evaluate(network, val_set(cityscapes), num_classes=3, class_names=("a", "b", "c"),
                 cost_resolution=COST, predictions_dir=tmp_path, prediction_format="cityscapes")
    with pytest.raises(ValueError, match="class names"):
        evaluate(network, val_set(cityscapes), num_classes=K, class_names=("a",),
                 cost_resolution=COST)
    with pytest.raises(ValueError, match="together"):
        run(network, cityscapes, predictions_dir=tmp_path)


def test_figures_per_scene_kind_where_the_data_records_kinds(cityscapes, tmp_path) -> None:
    """The synthetic set's kinds reach the evaluation through the prepared folder: each image's
    row carries its kind and open paths, and `by_kind` sums them up per kind."""
    kinds = read_scene_kinds(str(cityscapes / "prepared"), "val")
    meta = json.loads((cityscapes / "raw" / "synth_meta.json").read_text())["images"]
    assert kinds == {key.split("/", 1)[1]: entry["kind"] for key, entry in meta.items()
                     if key.startswith("val/")}
    result = run(tiny_network(), cityscapes, scene_kinds=kinds)
    rows = pq.read_table(result.write_per_image(tmp_path / "per_image.parquet")).to_pylist()
    assert [r["kind"] for r in rows] == [kinds[r["id"]] for r in rows]
    paths = len(result.gate_probability)
    assert all(0 <= r["paths_open"] <= paths for r in rows)
    network = tiny_network()
    pin_all(network)  # every path open
    assert run(network, cityscapes, limit=1).per_image[0].paths_open == paths
    some = max(network.route.cells)  # a cell of the last row: closing it starves no other
    pin_all(network, closed={some: network.route.paths_of(some)})
    assert run(network, cityscapes, limit=1).per_image[0].paths_open == \
        paths - len(network.route.paths_of(some))
    by_kind = json.loads(json.dumps(result.to_dict(), allow_nan=False))["by_kind"]
    assert sorted(by_kind) == sorted(set(kinds.values()))
    for kind, entry in by_kind.items():
        mine = [r for r in rows if r["kind"] == kind]
        assert entry["images"] == len(mine)
        assert entry["gflops_mean"] == pytest.approx(np.mean([r["gflops"] for r in mine]))
        assert entry["gflops_min"] == min(r["gflops"] for r in mine)
        assert entry["gflops_max"] == max(r["gflops"] for r in mine)
        assert entry["paths_open_mean"] == pytest.approx(np.mean([r["paths_open"] for r in mine]))


def test_no_kinds_no_figures_per_kind(cityscapes, tmp_path) -> None:
    result = run(tiny_network(), cityscapes)
    table = pq.read_table(result.write_per_image(tmp_path / "per_image.parquet"))
    assert table.column_names == list(PER_IMAGE_COLUMNS)
    assert result.to_dict()["by_kind"] == {}


# -- latency: its conditions, and another job noticed ----------------------------------------
@pytest.fixture
def cpu_hogs():
    """One busy-looping process per core this process may use: another job sharing the cores,
    as `make run` beside an evaluation does. Killed by their pid afterwards."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.5)  # let them start spinning
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def assert_latency_withheld(result) -> None:
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert all(math.isnan(v) for v in vars(result.latency_ms).values())
    assert all(data[f"latency_ms_{s}"] is None for s in ("mean", "min", "max", "p50", "p90"))
    assert data["latency_disturbed"] is True and data["latency"]["reason"]
    assert "DISTURBED, not recorded" in result.latency_line()
    assert "dynroute profile" in result.latency_line()


def test_latency_records_what_it_was_measured_on(cityscapes, tmp_path) -> None:
    """The latency carries its device key and conditions; it is recorded when the machine was
    quiet and withheld when it was not (a CI box may be busy: either, never a mix)."""
    result = run(tiny_network(), cityscapes, warmup=2, fast=False)
    latency = result.latency
    assert latency.key == device_key("cpu")
    c = latency.conditions
    assert (c.device, c.threads, c.torch) == ("cpu", torch.get_num_threads(), torch.__version__)
    assert (c.warmup, c.repeats, c.images, c.resolution, c.fast) == (2, 1, 4, (64, 128), False)
    assert not latency.mixed_sizes and latency.loader_workers == 0
    assert len(latency.calibration_ms) == 2 and min(latency.calibration_ms) > 0
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["latency"]["key"] == device_key("cpu")
    assert data["latency"]["conditions"]["resolution"] == [64, 128]
    assert math.isfinite(data["latency_busy_elsewhere"])
    table = pq.read_table(result.write_per_image(tmp_path / "per_image.parquet"))
    assert table.schema.metadata[b"latency_device"] == device_key("cpu").encode()
    if latency.disturbed:
        assert_latency_withheld(result)
    else:
        assert data["latency_disturbed"] is False and data["latency"]["reason"] is None
        raw = [r.latency_ms for r in result.per_image]
        assert data["latency_ms_p50"] == pytest.approx(float(np.median(raw)))
        assert result.latency_line().startswith("latency p50 ")
        assert device_key("cpu") in result.latency_line()


def test_latency_shared_with_another_job_is_withheld(cityscapes, tmp_path, cpu_hogs) -> None:
    """A job spinning on every core while the images are timed: the accuracy is reported as
    on a quiet machine, the latency is marked disturbed, with the busy cores as the reason, and
    withheld from the summary; the per-image rows keep the raw timings, flagged."""
    result = run(tiny_network(), cityscapes)
    assert all(hog.poll() is None for hog in cpu_hogs)  # they ran throughout
    latency = result.latency
    assert latency.disturbed
    limit = free_cores("cpu") + MAX_BUSY_ELSEWHERE
    assert latency.disturbance.busy_elsewhere > limit
    assert "CPU cores busy" in latency.disturbance.reason
    assert_latency_withheld(result)
    table = pq.read_table(result.write_per_image(tmp_path / "per_image.parquet"))
    assert table.column("latency_disturbed").to_pylist() == [True] * 4
    assert all(v > 0 for v in table.column("latency_ms").to_pylist())
    for hog in cpu_hogs:
        hog.kill()
        hog.wait()
    quiet = run(tiny_network(), cityscapes)
    assert result.miou == quiet.miou and result.pixel_accuracy == quiet.pixel_accuracy
    assert result.gflops == quiet.gflops


def test_disturbance_rule() -> None:
    """profile_latency's rule: busy cores beyond those our threads leave free (CPU only), or a
    calibration or repeat drift beyond the limit."""
    limit = free_cores("cpu") + MAX_BUSY_ELSEWHERE
    assert not disturbance("cpu", busy_elsewhere=limit - 0.01, calibration=[10, 19]).disturbed
    crowded = disturbance("cpu", busy_elsewhere=limit + 0.5, calibration=[10, 10])
    assert crowded.disturbed and "CPU cores busy" in crowded.reason
    drifted = disturbance("cpu", busy_elsewhere=math.nan, calibration=[10, 21])
    assert drifted.disturbed and "calibration timings drifted 2.10x" in drifted.reason
    assert disturbance("cpu", busy_elsewhere=0.0, calibration=[10, 10],
                       repeat_totals=[100, 210]).disturbed
    on_gpu = disturbance("cuda", busy_elsewhere=9.0, calibration=[10, 11])  # cores: the host's
    assert not on_gpu.disturbed and math.isnan(on_gpu.busy_elsewhere) and not on_gpu.reason


def test_busy_elsewhere_counts_children_as_ours() -> None:
    """An evaluation's loader processes are its own work: with children=True a child's CPU time
    is not another job's (measured over the same window as without)."""
    with BusyElsewhere(children=False) as others, BusyElsewhere(children=True) as ours:
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time\nend = time.time() + 1\nwhile time.time() < end: "
                                  "pass"])
        child.wait()
    assert others.cores - ours.cores > 0.3  # the child's share of a core, about 1
