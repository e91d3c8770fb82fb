"""(a) Training: images/s of the full step (soft forward, cross-entropy + budget loss, backward,
clipping, SGD) per case, its peak memory and kept activations, and the numerics check against fp32
eager from a fixed seed and batch: the losses of the first steps and the first step's gradient."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from .common import (
    NUM_CLASSES,
    ROOT,
    SEED,
    Clock,
    Device,
    Row,
    Sizes,
    compare,
    compare_l2,
    compile_blocks,
    compile_fn,
    count_ops,
    describe_error,
    dynamo_counts,
    graph_note,
    load_file,
    median_time,
    network_config,
    progress,
    skip_reason,
    tolerance,
)

GRAD_CLIP = 5.0
BUDGET_NAME = "dynamic-b"  # λ2 = 0.5, μ = 0.1: the "SGD + budget loss" of the issue
CHECK_STEPS = 5  # training losses compared with fp32 eager

# The first step's gradient, as ||Δg|| / ||g||: batch norm over the few values of the coarsest
# maps makes it sensitive to rounding (fp32 reorderings give ~4e-4 at CPU sizes, bf16 10-35%),
# so these bounds catch a broken backward pass (missing or zero gradients give 1.0), not rounding.
GRAD_FP32_RTOL = 5e-2
GRAD_BF16_RTOL = 0.5


@dataclass(frozen=True)
class TrainCase:
    name: str
    bf16: bool = False  # autocast; weights, gradients and optimizer stay fp32
    channels_last: bool = False
    compile: bool = False
    mode: str | None = None  # torch.compile mode (inductor only)
    cudnn_benchmark: bool = False
    graph: bool = False  # the step replayed as one CUDA graph (platform/device/cuda_graph.py)
    blocks: bool = False  # with compile: each block compiled (as in inference), not the step
    cuda_only: bool = False
    optional: bool = False  # only when the section has time to spare

TRAIN_CASES = (
    TrainCase("eager fp32 (baseline)"),
    TrainCase("bf16 autocast", bf16=True),
    TrainCase("channels-last", channels_last=True),
    TrainCase("bf16 autocast + channels-last", bf16=True, channels_last=True),
    TrainCase("bf16 + CL + cudnn.benchmark", bf16=True, channels_last=True,
              cudnn_benchmark=True, cuda_only=True),
    TrainCase("CUDA graph + CL (default)", channels_last=True, graph=True, cuda_only=True),
    TrainCase("CUDA graph + bf16 + CL", bf16=True, channels_last=True, graph=True,
              cuda_only=True),
    # Inductor's fused kernels (BN statistics, ReLU, α products) inside the replayed step: the
    # graphed step is bound by its kernels, not the host, and compiling block by block takes far
    # less time than the whole step.
    TrainCase("compile blocks + CUDA graph + CL", channels_last=True, compile=True, blocks=True,
              graph=True, cuda_only=True, optional=True),
    TrainCase("compile + bf16 + CL", bf16=True, channels_last=True, compile=True),
    TrainCase("compile fp32", compile=True),
    TrainCase("compile reduce-overhead (CUDA graphs) + bf16 + CL", bf16=True,
              channels_last=True, compile=True, mode="reduce-overhead", cuda_only=True,
              optional=True),
    TrainCase("compile max-autotune-no-cudagraphs + bf16 + CL", bf16=True, channels_last=True,
              compile=True, mode="max-autotune-no-cudagraphs", cuda_only=True, optional=True),
)


@dataclass
class TrainSetup:
    sizes: Sizes
    device: Device
    images: torch.Tensor  # (B, 3, H, W), BGR mean-subtracted scale
    labels: torch.Tensor  # (B, H, W), 255 = ignore
    recipe: ModuleType


def make_train_setup(sizes: Sizes, device: Device) -> TrainSetup:
    recipe = load_file("_gpu_bench_recipe", ROOT / "platform" / "train" / "recipe.py")
    gen = torch.Generator().manual_seed(SEED)
    b, (h, w) = sizes.train_batch, sizes.crop
    images = torch.randn(b, 3, h, w, generator=gen) * 50.0
    labels = torch.randint(0, NUM_CLASSES, (b, h, w), generator=gen)
    labels[torch.rand(b, h, w, generator=gen) < 0.05] = 255
    # The batch lives on the device for the whole run: this measures the GPU's step, not the
    # data path (benchmarks/data_loader.py measures that).
    return TrainSetup(sizes, device, images.to(device.torch), labels.to(device.torch), recipe)


class TrainStep:
    """One full training step on the fixed batch, as the recipe runs it; calling it returns the
    loss without a host synchronisation. `gradient` holds the first step's flattened gradient
    (before clipping), for the numerics check of the backward pass."""

    def __init__(self, net: nn.Module, case: TrainCase, setup: TrainSetup) -> None:
        from dynroute.models import BudgetLoss, BudgetSchedule, budget, segmentation_loss

        device, sizes, recipe = setup.device, setup.sizes, setup.recipe
        cost = net.cost_model(*sizes.crop)
        chosen = budget(BUDGET_NAME)
        # The budget term on from step 0 (w(t) = 1), so the step pays for it as late training does.
        budget_loss = BudgetLoss(lambda2=chosen.lambda2, mu=chosen.mu,
                                 c_all=cost.all_open_expected(),
                                 schedule=BudgetSchedule(start=0.0, ramp=0.0))
        with torch.no_grad():  # fill the cost model's per-node vectors before Dynamo sees it
            cost.expected({node.node: torch.ones(1, len(node.paths), device=device.torch)
                           for node in net.nodes.values()})

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # autocast's cast cache would outlive a CUDA graph capture
            with device.autocast(case.bf16, cache=not case.graph):
                out = net(images)  # soft forward (training mode)
            with device.autocast(False):  # losses in fp32 whatever the forward ran in
                seg = segmentation_loss(out.logits.float(), labels)
                expected = cost.expected({n: a.float() for n, a in out.gates.items()})  # (B,)
                return seg + budget_loss(expected, 1.0)

        self.loss_fn = loss_fn
        if case.blocks:
            compile_blocks(net, backend=sizes.compile_backend, mode=case.mode)
        elif case.compile:
            self.loss_fn = compile_fn(loss_fn, backend=sizes.compile_backend, mode=case.mode)
        # The recipe's optimizer and schedule (SGD 0.9, no decay on BN and biases, lr 0.05 with
        # the linear warm-up from 0.001x): the first steps of a real run. Their losses check the
        # forward numerics; the backward is checked on the first step's gradient, since after
        # the warm-up lr five steps from scratch amplify fp32 rounding past 1e-4.
        self.recipe = recipe
        self.config = recipe.TrainConfig(batch_size=sizes.train_batch, crop=sizes.crop,
                                         grad_clip=GRAD_CLIP)
        self.optimizer = recipe.build_optimizer(net, self.config)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.images = setup.images
        if case.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = setup.labels
        self.cudagraphs = case.mode == "reduce-overhead"
        self.compiled = case.compile
        self.index = 0
        self.gradient: torch.Tensor | None = None
        self.graphed = None
        if case.graph:  # the training's own graph code, loaded like the recipe
            graphs = load_file("_gpu_bench_cuda_graph",
                               ROOT / "platform" / "device" / "cuda_graph.py")
            self.lrs = [torch.zeros((), device=device.torch) for _ in self.optimizer.param_groups]
            self.update = lambda: graphs.sgd_update(self.optimizer, self.lrs)
            self.graphed = graphs.GraphedStep(self._body, device.torch)
        else:
            self.update = self.optimizer.step

    def saved_mib(self) -> float | None:
        """MiB of activations one forward keeps for the backward pass (distinct storages,
        parameters left out): the step's memory, as countable on a CPU as on a GPU. None when
        compiled (AOTAutograd decides what is kept)."""
        if self.compiled:
            return None
        weights = {p.untyped_storage().data_ptr() for p in self.params}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            # Not `t` itself: a tensor an operator saves of its own output, handed back with
            # its grad_fn, makes a reference cycle through C++ that no collector frees (it kept
            # every case's activations alive on the GPU: +22 GiB per training case on an H200).
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.loss_fn(self.images, self.labels)
        return sum(kept.values()) / 2**20

    def __call__(self) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.recipe.set_lr(self.optimizer, self.index, self.config)
        if self.graphed is not None:
            for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
                lr.fill_(group["lr"])
            loss = self.graphed()
        else:
            loss = self._body()
        self.index += 1
        return loss.clone()  # a CUDA-graph output is overwritten by the next replay

    def _body(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.images, self.labels)
        loss.backward()
        if self.index == 0:  # one host copy, on the (untimed, never captured) first step only
            self.gradient = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                for p in self.params]).cpu()
        self.recipe.clip_gradients(self.params, GRAD_CLIP)  # as training: no host wait
        self.update()
        return loss.detach()


@dataclass
class TrainReference:
    """What fp32 eager gave: the first losses and the first step's gradient."""

    losses: torch.Tensor
    gradient: torch.Tensor


def run_train_case(case: TrainCase, setup: TrainSetup, clock: Clock, cases_left: int,
                   baseline: TrainReference | None) -> tuple[Row, TrainReference | None]:
    from dynroute.models import build_network

    device, sizes = setup.device, setup.sizes
    row = Row("train", case.name)
    before = dynamo_counts()
    saved_benchmark = torch.backends.cudnn.benchmark
    device.reset_peak()
    try:
        torch.backends.cudnn.benchmark = case.cudnn_benchmark or saved_benchmark
        torch.manual_seed(SEED)
        net = build_network(network_config(sizes, small_gate=sizes.small_gate))
        net = net.to(device.torch).train()
        if case.channels_last:
            net = net.to(memory_format=torch.channels_last)
        step = TrainStep(net, case, setup)
        device.sync()
        start = time.perf_counter()
        losses = [step()]
        device.sync()
        row.first_s = time.perf_counter() - start
        losses += [step() for _ in range(CHECK_STEPS - 1)]  # also the warm-up
        if step.graphed is not None and not step.graphed.captured:
            why = step.graphed.fallback or "too few steps"
            raise RuntimeError(f"no CUDA graph was captured ({why}); the case ran eagerly")
        ours = TrainReference(torch.stack(losses).float().cpu(), step.gradient)
        one = median_time(step, device, 1)
        row.repeats = clock.repeats(sizes.train_repeats, one, cases_left)
        if not case.graph:  # a graph allocated its memory at capture: keep that in its peak
            device.reset_peak()
        per_step = median_time(step, device, row.repeats)
        row.ms = per_step * 1e3
        row.images_per_s = sizes.train_batch / per_step
        row.peak_mib = device.peak_mib()
        row.extra["saved_mib"] = step.saved_mib()
        # A replayed graph dispatches no operator: count what its eager body runs instead.
        row.extra["ops"] = None if case.compile else count_ops(step._body if case.graph
                                                               else step)
        ref = ours if baseline is None else baseline
        tol = tolerance(case.bf16, device)
        row.check = compare(ours.losses, ref.losses, tol=tol)
        row.grad_check = compare_l2(ours.gradient, ref.gradient,
                                    tol=GRAD_BF16_RTOL if case.bf16 else GRAD_FP32_RTOL)
        row.extra["losses"] = [round(v, 6) for v in ours.losses.tolist()]
        row.extra["grad_norm"] = ours.gradient.norm().item()
        if case.compile:
            row.note = graph_note(before)
        return row, ours
    except Exception as err:  # a failed case is a row, not the end of the run
        row.status = f"failed: {describe_error(err)}"
        if case.compile:
            row.note = graph_note(before)
        return row, None
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
        if case.compile:
            torch._dynamo.reset()  # drop the graphs, which hold on to this case's network
        device.reset_peak()


def run_train(sizes: Sizes, device: Device, clock: Clock, *, no_compile: bool) -> list[Row]:
    setup = make_train_setup(sizes, device)
    cases = [c for c in TRAIN_CASES if device.cuda or not c.cuda_only]
    rows, baseline = [], None
    compile_estimate = max(sizes.compile_floor_s, sizes.train_compile_floor_s)
    blocks_estimate = sizes.compile_floor_s  # doubled for an optional case
    for i, case in enumerate(cases):
        estimate = blocks_estimate if case.blocks else compile_estimate
        skip = skip_reason(case.compile, case.optional, i, clock, estimate, no_compile)
        if i > 0 and baseline is None:
            skip = "the baseline failed"
        if skip:
            rows.append(Row("train", case.name, status=f"skipped: {skip}"))
            continue
        progress(f"train: {case.name}")
        row, ours = run_train_case(case, setup, clock, len(cases) - i, baseline)
        if i == 0:
            baseline = ours
        if case.blocks and row.first_s is not None:
            blocks_estimate = max(blocks_estimate, row.first_s)
        elif case.compile and row.first_s is not None:
            compile_estimate = max(compile_estimate, row.first_s)
        rows.append(row)
    return rows
