"""The training step a CUDA graph replays computes the eager step.

A CPU cannot capture a graph, but everything the graph holds runs here: the body that reads its
batch, learning rates and budget weight from fixed tensors, and the SGD update that takes its lr
from a tensor. These tests compare that body with the eager step, step by step.
"""

import copy

import pytest
import torch
from torch import nn

from dynroute.models import BudgetLoss, BudgetSchedule, NetworkConfig, build_network
from dynroute.platform.device.cuda_graph import GraphedStep, sgd_unsupported, sgd_update
from dynroute.platform.device.fast_path import FastPath, for_training
from dynroute.platform.train.recipe import TrainConfig, build_optimizer, set_lr
from dynroute.platform.train.train_step import TrainStep, graph_blocker

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only its type is read: no GPU needed


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 2, 1))


def _groups(model: nn.Module) -> list[dict]:
    decay = [model[0].weight, model[3].weight]
    no_decay = [model[1].weight, model[1].bias, model[3].bias]
    return [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}]


def test_sgd_update_is_torch_sgd_with_lr_from_tensors():
    ours_model, torch_model = _tiny(), _tiny()
    ours = torch.optim.SGD(_groups(ours_model), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(_groups(torch_model), lr=0.1, momentum=0.9)
    assert sgd_unsupported(ours) is None
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        lr = [0.1 * (step + 1), 0.05 * (step + 1)]  # changes every step, per group
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
        for group, value in zip(theirs.param_groups, lr, strict=True):
            group["lr"] = value
        theirs.step()
        sgd_update(ours, [torch.tensor(v) for v in lr])
    for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    bufs = [ours.state[p]["momentum_buffer"] for p in ours_model.parameters()]
    ref = [theirs.state[p]["momentum_buffer"] for p in torch_model.parameters()]
    for a, b in zip(bufs, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The optimizer's own state: an eager step after the graph's steps continues from it.
    assert set(ours.state_dict()["state"]) == set(theirs.state_dict()["state"])


def test_sgd_unsupported_names_the_reason():
    model = _tiny()
    assert "Adam" in sgd_unsupported(torch.optim.Adam(model.parameters()))
    assert "nesterov" in sgd_unsupported(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    assert "no momentum" in sgd_unsupported(torch.optim.SGD(model.parameters(), lr=0.1))


def _setup(seed: int = 0, *, lambda2: float = 0.5):
    torch.manual_seed(seed)
    network = build_network(NetworkConfig(layers=4, base_channels=4, num_classes=5)).train()
    recipe = TrainConfig(iterations=6, batch_size=2, crop=(64, 64), warmup_iterations=3)
    cost = network.cost_model(64, 64)
    budget = BudgetLoss(lambda2=lambda2, mu=0.3, c_all=cost.all_open_expected(),
                        schedule=BudgetSchedule(start=0.3, ramp=0.2))
    optimizer = build_optimizer(network, recipe)
    return network, cost, budget, optimizer, recipe


def _batches(count: int):
    gen = torch.Generator().manual_seed(7)
    for _ in range(count):
        labels = torch.randint(0, 5, (2, 64, 64), generator=gen)
        labels[torch.rand(2, 64, 64, generator=gen) < 0.1] = 255
        yield {"image": torch.randn(2, 3, 64, 64, generator=gen) * 50.0, "label": labels}


def test_graph_body_trains_as_the_eager_step():
    """Six steps through the budget's ramp (w(t) 0 → 1) and the lr warm-up: the same figures,
    weights and momentum as the eager step (the body runs eagerly on a CPU)."""
    runs = {}
    for graphed in (False, True):
        network, cost, budget, optimizer, recipe = _setup()
        step = TrainStep(network, network, cost, budget, optimizer, recipe, FastPath(), CPU,
                         graphed=graphed)
        figures = []
        for i, batch in enumerate(_batches(recipe.iterations)):
            set_lr(optimizer, i, recipe)
            figures.append(step(batch, i / recipe.iterations).clone())
        runs[graphed] = (torch.stack(figures), network, optimizer)
    (eager, net_e, opt_e), (body, net_b, opt_b) = runs[False], runs[True]
    assert eager[:, 1].count_nonzero() >= 2, "the budget term must be on in some steps"
    assert not torch.equal(eager[0], eager[-1])
    torch.testing.assert_close(body, eager, rtol=1e-5, atol=1e-7)
    for a, b in zip(net_b.state_dict().values(), net_e.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p_b, p_e in zip(net_b.parameters(), net_e.parameters(), strict=True):
        torch.testing.assert_close(opt_b.state[p_b]["momentum_buffer"],
                                   opt_e.state[p_e]["momentum_buffer"], rtol=1e-4, atol=1e-6)


def test_graph_body_reads_the_budget_weight_each_step():
    """A weight frozen at its first value (what a capture of a Python number would do) changes
    the result: with λ2 large the body must follow w(t) as the eager step does."""
    network, cost, budget, optimizer, recipe = _setup(lambda2=50.0)
    frozen = copy.deepcopy(network)
    step = TrainStep(network, network, cost, budget, optimizer, recipe, FastPath(), CPU,
                     graphed=True)
    late = next(_batches(1))
    step(late, progress=0.0)  # w(0) = 0: no budget term
    first = step.budget_weight.item()
    step(late, progress=0.9)  # past the ramp: w = 1
    assert first == 0.0 and step.budget_weight.item() == pytest.approx(50.0)
    assert not all(torch.equal(a, b) for a, b in zip(network.parameters(),
                                                     frozen.parameters(), strict=True))


def test_graphed_step_rejects_a_batch_of_another_shape():
    network, cost, budget, optimizer, recipe = _setup()
    step = TrainStep(network, network, cost, budget, optimizer, recipe, FastPath(), CPU,
                     graphed=True)
    batch = next(_batches(1))
    step(batch, 0.0)
    smaller = {"image": batch["image"][:1], "label": batch["label"][:1]}
    with pytest.raises(ValueError, match=r"first batch's shapes .*run.fast: false"):
        step(smaller, 0.1)


def test_graphed_step_on_cpu_runs_its_body_every_call():
    calls = []
    graphed = GraphedStep(lambda: torch.tensor(float(len(calls.append(1) or calls))), CPU)
    assert [graphed().item() for _ in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not graphed.captured and graphed.fallback is None


def test_graph_blocker():
    network, _, _, optimizer, _ = _setup()
    fast_cuda = for_training(CUDA)
    assert fast_cuda.cuda_graph and not for_training(CPU).cuda_graph
    assert not for_training(CUDA, fast=False).cuda_graph
    assert graph_blocker(fast_cuda, CUDA, distributed=False, drop_path_prob=0.0,
                         optimizer=optimizer) is None
    assert "several workers" in graph_blocker(fast_cuda, CUDA, distributed=True,
                                              drop_path_prob=0.0, optimizer=optimizer)
    assert "drop_path_prob" in graph_blocker(fast_cuda, CUDA, distributed=False,
                                             drop_path_prob=0.1, optimizer=optimizer)
    assert "not CUDA" in graph_blocker(fast_cuda, CPU, distributed=False, drop_path_prob=0.0,
                                       optimizer=optimizer)
    adam = torch.optim.Adam(network.parameters())
    assert "Adam" in graph_blocker(fast_cuda, CUDA, distributed=False, drop_path_prob=0.0,
                                   optimizer=adam)
    assert "fast path is off" in graph_blocker(FastPath(), CUDA, distributed=False,
                                               drop_path_prob=0.0, optimizer=optimizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_step_on_cuda_trains_as_the_eager_step():
    """The capture and its replays (benchmarks/graph_step_check.py measures larger sizes)."""
    runs = {}
    for graphed in (False, True):
        network, cost, budget, optimizer, recipe = _setup()
        network = network.cuda()
        optimizer = build_optimizer(network, recipe)
        step = TrainStep(network, network, cost, budget, optimizer, recipe, FastPath(),
                         CUDA, graphed=graphed)
        figures = []
        for i, batch in enumerate(_batches(recipe.iterations)):
            set_lr(optimizer, i, recipe)
            figures.append(step(batch, i / recipe.iterations).clone())
        runs[graphed] = (torch.stack(figures).cpu(), step)
    assert runs[True][1].graph.captured
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-2, atol=1e-5)
