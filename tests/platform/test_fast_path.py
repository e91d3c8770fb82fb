"""The fast paths compute what the plain paths compute: same training step, same
evaluation, and they are what users get unless they turn them off."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dynroute.models import BudgetLoss, NetworkConfig, build_network
from dynroute.models.fusion import has_batchnorm
from dynroute.models.losses import segmentation_loss
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.run import train_spec
from dynroute.pipelines.synth import synthesize
from dynroute.platform.config.params import Params
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.device import fast_path
from dynroute.platform.evaluate.evaluation import evaluate, infer
from dynroute.platform.train.recipe import TrainConfig, build_optimizer, clip_gradients

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def diverse_network(seed: int = 0):
    """A small network whose gates close some paths and differ from image to image."""
    torch.manual_seed(seed)
    net = build_network(NetworkConfig(layers=4, base_channels=8, num_classes=19))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for node in net.nodes.values():
            final = node.gate.features[-1]
            final.weight.copy_(torch.randn(final.weight.shape, generator=g) * 3)
            final.bias.zero_()
        for bn in net.modules():  # statistics as after training, so folding them is no no-op
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_(0.0, 0.3, generator=g)
                bn.running_var.uniform_(0.5, 2.0, generator=g)
                bn.weight.uniform_(0.7, 1.3, generator=g)
                bn.bias.normal_(0.0, 0.1, generator=g)
    return net


def test_defaults_are_the_fast_paths_and_can_be_turned_off():
    assert fast_path.for_training(CUDA) == fast_path.FastPath(channels_last=True, cuda_graph=True)
    assert fast_path.for_training(CPU) == fast_path.FastPath(channels_last=True)  # no graph
    assert fast_path.for_training(CUDA, fast=False) == fast_path.FastPath()
    assert fast_path.for_training(CPU, fast=False, channels_last=True, bf16=True) == \
        fast_path.FastPath(channels_last=True, bf16=True)  # explicit settings always apply
    assert fast_path.for_inference(CPU) == fast_path.FastPath(channels_last=True,
                                                              fold_batchnorm=True)
    assert fast_path.for_inference(CUDA, fast=False) == fast_path.FastPath()
    params = Params()
    assert params.run.fast and params.evaluate.fast
    assert train_spec(params, data="d", uri=None).fast


def test_fast_and_plain_inference_give_the_same_logits_and_routes():
    net = diverse_network().eval()
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 96) * 40 + torch.randn(4, 3, 1, 1) * 60
    before = copy.deepcopy(net.state_dict())
    layout = fast_path.for_inference(CPU)
    fast_net = layout.inference_network(net)
    convs = [p for p in fast_net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not has_batchnorm(fast_net), "the fast network has its BN folded"
    assert has_batchnorm(net) and net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items()), \
        "the given network is not changed"
    assert fast_path.FastPath().inference_network(net) is net  # plain: nothing to convert
    with torch.inference_mode():
        plain = net(images)
        fast = fast_net(layout.images(images))
    scale = plain.logits.abs().max()  # fp32 rounding relative to the logits' size
    torch.testing.assert_close(fast.logits / scale, plain.logits / scale, rtol=0, atol=1e-5)
    closed = 0
    for node, alpha in plain.gates.items():
        torch.testing.assert_close(fast.gates[node], alpha, rtol=1e-4, atol=1e-5)
        assert torch.equal(fast.gates[node] > 1e-4, alpha > 1e-4), f"route differs at {node}"
        closed += int((alpha <= 1e-4).sum())
    assert closed > 0, "the check needs closed paths"


def test_fast_and_plain_training_steps_compute_the_same_thing():
    recipe = TrainConfig(iterations=3, crop=(64, 64), budget="dynamic-a")
    torch.manual_seed(2)
    images, labels = torch.randn(2, 3, 64, 64) * 50, torch.randint(0, 19, (2, 64, 64))
    losses = {}
    grads = {}
    for name, layout in (("plain", fast_path.FastPath()),
                         ("fast", fast_path.FastPath(channels_last=True))):
        net = layout.network(diverse_network(seed=3).train())
        convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        form = torch.channels_last if layout.channels_last else torch.contiguous_format
        assert convs and all(p.is_contiguous(memory_format=form) for p in convs)
        if layout.channels_last:
            assert not all(p.is_contiguous() for p in convs), "the fast net is really converted"
        cost = net.cost_model(64, 64)
        budget = BudgetLoss(lambda2=0.8, mu=0.1, c_all=cost.all_open_expected())
        optimizer = build_optimizer(net, recipe)
        losses[name] = []
        for step in range(3):
            out = net(layout.images(images), progress=step / 3)
            loss = segmentation_loss(out.logits, labels) + budget(cost.expected(out.gates), 0.5)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                grads[name] = torch.cat([p.grad.flatten() for p in net.parameters()
                                         if p.grad is not None])
            clip_gradients(net.parameters(), recipe.grad_clip)
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["plain"]),
                               rtol=1e-4, atol=1e-5)
    rel = (grads["fast"] - grads["plain"]).norm() / grads["plain"].norm()
    assert rel < 1e-3, f"first-step gradients differ by {rel:.2e}"


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> ShardDataset:
    root = tmp_path_factory.mktemp("fast-eval")
    synthesize("cityscapes", root / "raw", train=1, val=4, height=64, width=128, seed=4)
    prepare("cityscapes", root / "raw", root / "prepared", workers=1)
    return ShardDataset(root=str(Path(root / "prepared")), split="val", train=False, crop=None)


def test_fast_and_plain_evaluation_agree_and_the_network_is_left_as_it_was(val_set):
    net = diverse_network(seed=5)
    names = [f"c{k}" for k in range(19)]
    kwargs = {"num_classes": 19, "class_names": names, "cost_resolution": (1024, 2048)}
    plain = evaluate(net, val_set, fast=False, **kwargs)
    fast = evaluate(net, val_set, **kwargs)
    assert plain.confusion.matrix.tolist() == fast.confusion.matrix.tolist()
    assert [r.gflops for r in plain.per_image] == [r.gflops for r in fast.per_image]
    assert plain.gate_probability == fast.gate_probability
    weights = [p for p in net.parameters() if p.dim() == 4]
    assert all(p.is_contiguous() for p in weights), "evaluate leaves the network as it found it"
    assert has_batchnorm(net) and net.training, "evaluate folds a copy and restores the mode"
    sample = next(iter(val_set))
    with torch.inference_mode():
        logits = infer(net, sample["image"][None]).logits
    assert logits.is_contiguous()


def test_loader_processes_feed_a_gpu_and_stay_out_of_a_cpus_way():
    assert fast_path.loader_workers(CPU, cores=16, gpus=1) == 0
    assert fast_path.loader_workers(CUDA, cores=16, gpus=1) == fast_path.MAX_LOADER_WORKERS
    assert fast_path.loader_workers(CUDA, cores=16, gpus=4) == 3  # one core per GPU trains
    assert fast_path.loader_workers(CUDA, cores=2, gpus=1) == 1
    assert fast_path.loader_workers(CUDA, cores=4, gpus=8) == 1
    assert Params().run.loader_workers is None, "unset by default: the device decides"


def test_evaluation_reads_ahead_in_loader_processes_with_the_same_result(val_set):
    """On a GPU, evaluation decodes the next images in loader processes while the network runs
    (one core decodes ~11 Cityscapes images/s, a GPU segments ~30): the figures must not change,
    whichever process read which image."""
    from dynroute.platform.evaluate.evaluation import samples

    assert samples(val_set, CPU) is val_set, "a CPU reads in the evaluating process"
    loader = samples(val_set, CUDA)
    assert loader.num_workers == fast_path.loader_workers(CUDA) and loader.pin_memory
    assert samples([{"image": 0}], CUDA, workers=2) == [{"image": 0}], "not a torch Dataset"
    with pytest.raises(ValueError, match="loader_workers=-1"):
        samples(val_set, CPU, workers=-1)
    net = diverse_network(seed=6)
    kwargs = {"num_classes": 19, "class_names": [f"c{k}" for k in range(19)],
              "cost_resolution": (1024, 2048)}
    alone = evaluate(net, val_set, loader_workers=0, **kwargs)
    ahead = evaluate(net, val_set, loader_workers=2, **kwargs)
    assert ahead.confusion.matrix.tolist() == alone.confusion.matrix.tolist()
    rows = {r.id: (r.gflops, r.pixel_accuracy) for r in alone.per_image}
    assert {r.id: (r.gflops, r.pixel_accuracy) for r in ahead.per_image} == rows
    assert len(rows) == 4 and ahead.gate_probability == alone.gate_probability
    limited = evaluate(net, val_set, loader_workers=2, limit=3, **kwargs)
    assert len(limited.per_image) == 3


def test_inference_runs_on_the_gpu_when_there_is_one():
    has_gpu = torch.cuda.is_available()
    assert fast_path.inference_device() == (CUDA if has_gpu else CPU)
    assert fast_path.inference_device("cpu") == CPU
    assert Params().evaluate.device == "auto"
    for bad in ("gpu", "tpu", "cuda:x"):
        with pytest.raises(ValueError, match=rf"evaluate.device = '{bad}': use auto, cpu"):
            fast_path.inference_device(bad, key="evaluate.device")
    with pytest.raises(ValueError, match=r"sees \d+ CUDA device"):
        fast_path.inference_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_on_a_gpu_agrees_with_the_cpu_and_leaves_the_network_there(val_set):
    net = diverse_network(seed=7)
    kwargs = {"num_classes": 19, "class_names": [f"c{k}" for k in range(19)],
              "cost_resolution": (1024, 2048)}
    on_cpu = evaluate(net, val_set, **kwargs)
    on_gpu = evaluate(net, val_set, device="cuda", **kwargs)
    assert next(net.parameters()).device == CPU, "a copy of the network ran on the GPU"
    assert [r.id for r in on_gpu.per_image] == [r.id for r in on_cpu.per_image]
    assert abs(on_gpu.miou - on_cpu.miou) < 1e-3
