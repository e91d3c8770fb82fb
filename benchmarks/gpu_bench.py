"""One-command speed benchmark of the dynamic routing network: eager fp32 vs each optimisation.

Three sections, each printed as a table with ratios to our eager fp32 baseline:

    train    images/s of the full training step (soft forward, cross-entropy + budget loss,
             backward, clipping at total norm 5.0, SGD), peak memory, the activations kept for
             the backward pass (countable on a CPU too), and the numerics check
             against fp32 eager from a fixed seed and batch: the losses of the first steps and
             the first step's gradient
    infer    every path open (gates pinned): latency at batch 1, images/s at batch 8, peak memory,
             and the logits against fp32 eager
    dynamic  the scenarios of benchmarks/dynamic_inference.py: latency ratio vs real-FLOPs ratio,
             for the eager path and the fastest per-sample-routing path of `infer`

Sizes (the issue's setting on CUDA, small enough for two CPU cores otherwise):

    cuda     train L=16, C0=64, batch 8, 768x768;  infer/dynamic L=16, C0=64, 1024x2048
    cpu      train L=4,  C0=8,  batch 2, 128x128;  infer/dynamic L=4,  C0=8,  128x256
    --smoke  L=4, C0=4, batch 2, 64x64 / 64x128, one repeat, torch.compile with backend "eager"
             (Dynamo capture only: inductor's C++/Triton codegen takes minutes, too long for CI)

CUDA graphs: the training cases "CUDA graph ..." replay the whole step (platform/cuda_graph.py,
as `dynroute train` does on one GPU); "static soft, CUDA graph ..." replays the all-open forward;
"row graphs (b1) ..." replay the per-sample routing forward piece by piece between its per-row
waits (models/graphed_routing.py; on a CPU the pieces run eagerly).

Needs nothing but PyTorch (and numpy): the model code is loaded from ../models, the optimizer
recipe and the graph code from ../platform/{recipe,cuda_graph}.py and the scenarios from
./dynamic_inference.py, without installing dynroute. `--time-budget` (default 420 s) shrinks
repeats and skips compile cases that would not fit, to keep the whole run under 8 minutes on one
GPU (measured: 188 s with --time-budget 290 on an H100, 141 s with --time-budget 250
--no-compile on an H200; compiling the whole L=16 training step took over 400 s, so those cases
need --time-budget of about 1500). CPU runs use one thread unless --threads says otherwise.

    python benchmarks/gpu_bench.py                               # auto device
    python benchmarks/gpu_bench.py --device cpu --only infer
    python benchmarks/gpu_bench.py --smoke --device cpu --json /tmp/gpu_bench.json

Exits 1 when a numerics check fails, 2 when the model code cannot be loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.machinery
import importlib.util
import json
import logging
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS_PACKAGE = "dynroute.models"

SEED = 0
NUM_CLASSES = 19
GRAD_CLIP = 5.0
BUDGET_NAME = "dynamic-b"  # λ2 = 0.5, μ = 0.1: the "SGD + budget loss" of the issue
CHECK_STEPS = 5  # training losses compared with fp32 eager
FP32_RTOL = 1e-4
TF32_RTOL = 1e-2  # cuDNN's TF32 convs keep 10 mantissa bits (~5e-4 per rounding), over 16 rows
BF16_RTOL = 5e-2
# The first step's gradient, as ||Δg|| / ||g||: batch norm over the few values of the coarsest
# maps makes it sensitive to rounding (fp32 reorderings give ~4e-4 at CPU sizes, bf16 10-35%),
# so these bounds catch a broken backward pass (missing or zero gradients give 1.0), not rounding.
GRAD_FP32_RTOL = 5e-2
GRAD_BF16_RTOL = 0.5
DYNAMIC_TOLERANCE = 0.10  # latency ratio within 10% of the real-FLOPs ratio (the goal)
SECTIONS = ("train", "infer", "dynamic")
SECTION_SHARE = {"train": 0.5, "infer": 0.35, "dynamic": 0.15}

# The paper's reference implementation on one H100 80GB, torch 2.11 (quoted in the issue).
REFERENCE = {
    "train": {"eager fp32 (baseline)": 28.6, "bf16 autocast": 28.0,
              "bf16 autocast + channels-last": 28.9},  # images/s, L=16, batch 8, 768x768
    "infer": {"eager fp32 (baseline)": 59.8, "bf16 autocast": 73.9},  # ms, batch 1, 1024x2048
}
GOAL_TRAIN_IPS = 86.0
GOAL_INFER_MS = 15.0


# -- loading the model code without installing dynroute ------------------------------------------
def _cannot_load(message: str) -> SystemExit:
    print(f"gpu_bench: {message}", file=sys.stderr)
    return SystemExit(2)


def load_models(models_dir: Path = ROOT / "models") -> ModuleType:
    """Import `models_dir` as the package `dynroute.models` and return it.

    Why this way: the GPU machine has only PyTorch. The repository is copied there but not
    pip-installed (dynroute's own dependencies include Ray, MLflow and DVC), so `import
    dynroute.models` finds nothing. The folder is called `models`, not `dynroute/models`, and its
    modules import each other relatively (`from .cost import ...`) while the scripts we reuse
    import it as `dynroute.models`; adding the repository root to sys.path would neither give it
    that name nor be safe (our platform/ folder would shadow the standard library's `platform`).
    So the importlib machinery registers it under its real name: an empty `dynroute` package,
    then `dynroute.models` from models/__init__.py with models/ as its submodule search path.
    """
    init = models_dir / "__init__.py"
    if not init.is_file():
        raise _cannot_load(f"{init} not found: run the benchmark from a checkout of the "
                           f"repository")
    loaded = sys.modules.get(MODELS_PACKAGE)
    if loaded is not None:
        where = Path(loaded.__file__ or "").resolve().parent
        if where != models_dir.resolve():
            raise _cannot_load(f"{MODELS_PACKAGE} is already imported from {where}, not "
                               f"{models_dir}; run the benchmark in a fresh interpreter")
        return loaded
    if "dynroute" not in sys.modules:
        spec = importlib.machinery.ModuleSpec("dynroute", None, is_package=True)
        sys.modules["dynroute"] = importlib.util.module_from_spec(spec)  # __path__ = []
    spec = importlib.util.spec_from_file_location(
        MODELS_PACKAGE, init, submodule_search_locations=[str(models_dir)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODELS_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        for name in [n for n in sys.modules if n.startswith(MODELS_PACKAGE)]:
            del sys.modules[name]
        raise _cannot_load(
            f"loading {models_dir} needs the module {err.name!r}, which is not installed here. "
            f"models/ must import only torch and numpy at module level (this benchmark runs "
            f"where only PyTorch is installed); make that import lazy in models/.") from err
    sys.modules["dynroute"].models = module  # type: ignore[attr-defined]
    return module


def load_file(name: str, path: Path) -> ModuleType:
    """Import one script by path (it imports `dynroute.models`, so call `load_models` first)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise _cannot_load(f"{path} not found: run the benchmark from a checkout of the "
                           f"repository")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def configure_torch() -> None:
    # Per-block compilation makes one graph per (block kind, scale), and the dynamic scenarios
    # change routes: both need more than the default 8 entries per code object.
    torch._dynamo.config.recompile_limit = 64
    # Graph-break warnings are counted and reported in the tables instead.
    torch._logging.set_logs(dynamo=logging.ERROR)


# -- device, clock, results ----------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    torch: torch.device

    @property
    def cuda(self) -> bool:
        return self.torch.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_mib(self) -> float | None:
        """Peak allocated since `reset_peak` (CUDA); None on CPU (no per-case figure)."""
        return torch.cuda.max_memory_allocated(self.torch) / 2**20 if self.cuda else None

    def autocast(self, enabled: bool, *, cache: bool = True) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.torch.type, dtype=torch.bfloat16, enabled=enabled,
                              cache_enabled=cache)


class Clock:
    """The run's time budget, split into section shares; unused time flows to later sections."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.section_deadline = self.deadline

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def section_left(self) -> float:
        return self.section_deadline - time.perf_counter()

    def start_section(self, share: float) -> None:
        self.section_deadline = time.perf_counter() + max(0.0, self.left()) * share

    def repeats(self, wanted: int, one_run_s: float, cases_left: int) -> int:
        """As many of `wanted` repeats as this case's share of the section's time allows."""
        share = self.section_left() / max(1, cases_left)
        return max(1, min(wanted, int(share / max(one_run_s, 1e-6))))


@dataclass(frozen=True)
class Check:
    """A result against fp32 eager: the max abs difference and the relative difference `rel`
    (max-based in `compare`, norm-based in `compare_l2`), within `tol` or not."""

    max_abs: float
    rel: float
    tol: float
    ok: bool


def compare(candidate: torch.Tensor, reference: torch.Tensor, *, tol: float) -> Check:
    """The numerics check: max |candidate − reference| / max |reference| ≤ tol (NaN fails)."""
    a, b = candidate.detach().float().cpu(), reference.detach().float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    rel = diff / scale if scale > 0 else diff
    return Check(max_abs=diff, rel=rel, tol=tol, ok=bool(rel <= tol))


def compare_l2(candidate: torch.Tensor, reference: torch.Tensor, *, tol: float) -> Check:
    """||candidate − reference|| / ||reference|| ≤ tol, for gradients (NaN fails)."""
    a, b = candidate.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = a - b
    norm = b.norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    return Check(max_abs=diff.abs().max().item(), rel=rel, tol=tol, ok=bool(rel <= tol))


def tolerance(bf16: bool, device: Device) -> float:
    if bf16:
        return BF16_RTOL
    if device.cuda and torch.backends.cudnn.allow_tf32:
        return TF32_RTOL
    return FP32_RTOL


@dataclass
class Row:
    """One case of one section; `status` is "ok", "failed: <reason>" or "skipped: <reason>"."""

    section: str
    case: str
    status: str = "ok"
    images_per_s: float | None = None  # train: per step; infer: at the throughput batch
    ms: float | None = None  # train: per step; infer: at batch 1
    peak_mib: float | None = None
    first_s: float | None = None  # first step / call: includes compilation
    repeats: int = 0
    check: Check | None = None  # train: the first losses; infer: the logits
    grad_check: Check | None = None  # train: the first step's gradient
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    layers: int
    base_channels: int
    train_batch: int
    crop: tuple[int, int]
    infer_size: tuple[int, int]
    infer_batch: int
    train_repeats: int
    infer_repeats: int
    compile_backend: str
    compile_floor_s: float  # a compile case is tried only with this much section time left
    # Training compiles far longer: on an H100 (torch 2.11) inductor had not finished compiling
    # the L=16 training step after ~410 s (benchmarks/results/*-compile-timeout.log).
    train_compile_floor_s: float = 0.0
    # The budgeted networks' ×0.25 gate. Off at CPU sizes: from a 128 crop the coarsest gate
    # would read a 1×1 map, and batch norm over 2 numbers makes the gradient ill-conditioned
    # (norm ~170 instead of ~0.6, fp32 and bf16 gradients uncorrelated).
    small_gate: bool = False


def sizes_for(device: Device, smoke: bool) -> Sizes:
    if smoke:
        return Sizes(4, 4, 2, (64, 64), (64, 128), 2, 1, 1, "eager", 0.0)
    if device.cuda:
        return Sizes(16, 64, 8, (768, 768), (1024, 2048), 8, 20, 30, "inductor", 90.0,
                     train_compile_floor_s=600.0, small_gate=True)
    return Sizes(4, 8, 2, (128, 128), (128, 256), 8, 20, 40, "inductor", 30.0)


def median_time(fn: Callable[[], object], device: Device, repeats: int) -> float:
    """Median wall time of `fn` over `repeats`, synchronising the device around each call."""
    times = []
    for _ in range(repeats):
        device.sync()
        start = time.perf_counter()
        fn()
        device.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Operators that launch no kernel: views and aliases, and allocation.
_NO_KERNEL = {"empty", "empty_strided", "lift_fresh", "_to_copy_noop"}


def count_ops(fn: Callable[[], object]) -> int:
    """ATen operators `fn` dispatches that compute something (views, aliases and allocations
    left out): about the kernels it launches eagerly, the same on every device, so a CPU run
    shows what removes launches on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:140] if text else ''}"


def _dynamo_counts() -> tuple[int, Counter]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], Counter(counters["graph_break"])


def _graph_note(before: tuple[int, Counter]) -> str:
    graphs, breaks = _dynamo_counts()
    new = breaks - before[1]
    note = f"{graphs - before[0]} graphs, {sum(new.values())} graph breaks"
    if new:
        reason, count = new.most_common(1)[0]
        note += f" (most: {count}x {reason.splitlines()[0][:70]})"
    return note


def _compile(fn, *, backend: str, mode: str | None):
    return torch.compile(fn, backend=backend, mode=mode if backend == "inductor" else None,
                         dynamic=False)


def _network_config(sizes: Sizes, *, small_gate: bool):
    from dynroute.models import NetworkConfig

    return NetworkConfig(layers=sizes.layers, base_channels=sizes.base_channels,
                         num_classes=NUM_CLASSES, small_gate=small_gate)


# -- (a) training ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainCase:
    name: str
    bf16: bool = False  # autocast; weights, gradients and optimizer stay fp32
    channels_last: bool = False
    compile: bool = False
    mode: str | None = None  # torch.compile mode (inductor only)
    cudnn_benchmark: bool = False
    graph: bool = False  # the step replayed as one CUDA graph (platform/cuda_graph.py)
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
    recipe = load_file("_gpu_bench_recipe", ROOT / "platform" / "recipe.py")
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
            self.loss_fn = _compile(loss_fn, backend=sizes.compile_backend, mode=case.mode)
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
            graphs = load_file("_gpu_bench_cuda_graph", ROOT / "platform" / "cuda_graph.py")
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
    before = _dynamo_counts()
    saved_benchmark = torch.backends.cudnn.benchmark
    device.reset_peak()
    try:
        torch.backends.cudnn.benchmark = case.cudnn_benchmark or saved_benchmark
        torch.manual_seed(SEED)
        net = build_network(_network_config(sizes, small_gate=sizes.small_gate))
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
            row.note = _graph_note(before)
        return row, ours
    except Exception as err:  # a failed case is a row, not the end of the run
        row.status = f"failed: {_reason(err)}"
        if case.compile:
            row.note = _graph_note(before)
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
        skip = _skip_reason(case.compile, case.optional, i, clock, estimate, no_compile)
        if i > 0 and baseline is None:
            skip = "the baseline failed"
        if skip:
            rows.append(Row("train", case.name, status=f"skipped: {skip}"))
            continue
        _progress(f"train: {case.name}")
        row, ours = run_train_case(case, setup, clock, len(cases) - i, baseline)
        if i == 0:
            baseline = ours
        if case.blocks and row.first_s is not None:
            blocks_estimate = max(blocks_estimate, row.first_s)
        elif case.compile and row.first_s is not None:
            compile_estimate = max(compile_estimate, row.first_s)
        rows.append(row)
    return rows


def _skip_reason(compiled: bool, optional: bool, index: int, clock: Clock, estimate: float,
                 no_compile: bool) -> str:
    if index == 0:
        return ""  # the baseline always runs
    if compiled and no_compile:
        return "--no-compile"
    if clock.left() <= 0:
        return "time budget spent"
    need = estimate * (2 if optional else 1) if compiled else 0.0
    if compiled and clock.section_left() < need:
        return f"time budget ({clock.section_left():.0f}s left, compiling needs ~{need:.0f}s)"
    return ""


# -- (b) inference --------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferCase:
    """How to run inference: precision, layout, compilation and which forward.

    compile: None, "whole" (torch.compile of the network's forward) or "blocks" (each stem,
    cell, gate, transform, decoder level and the head compiled; the routing stays eager).
    hard: the per-sample routing forward (`skip=True`); False runs the soft forward, a static
    graph that computes every path (equal to the hard one only while every path is open).
    """

    name: str
    autocast_bf16: bool = False
    bf16_weights: bool = False
    channels_last: bool = False
    compile: str | None = None
    mode: str | None = None
    hard: bool = True
    fold_bn: bool = False  # every BN folded into its conv (models/fusion.py)
    # then each folded conv → ReLU, and each cell's last conv + residual + ReLU, as one cuDNN
    # call (fusion.fuse_conv_relu)
    fuse_relu: bool = False
    cudnn_benchmark: bool = False
    graph: bool = False  # the (static) forward captured once per batch shape as a CUDA graph
    # Batch 1: the routing forward's pieces replayed as CUDA graphs (models/graphed_routing.py);
    # larger batches run the eager routing forward.
    row_graphs: bool = False
    cuda_only: bool = False
    optional: bool = False

    @property
    def bf16(self) -> bool:
        return self.autocast_bf16 or self.bf16_weights


INFER_BASELINE = InferCase("eager fp32 (baseline)")
INFER_CASES = (
    INFER_BASELINE,
    InferCase("bf16 autocast", autocast_bf16=True),
    InferCase("channels-last", channels_last=True),
    InferCase("bf16 autocast + channels-last", autocast_bf16=True, channels_last=True),
    InferCase("bf16 weights + channels-last", bf16_weights=True, channels_last=True),
    InferCase("bf16 w + CL + cudnn.benchmark", bf16_weights=True, channels_last=True,
              cudnn_benchmark=True, cuda_only=True),
    InferCase("folded BN + CL (default)", channels_last=True, fold_bn=True),
    # On the H200 channels-last alone was slower than NCHW at batch 1 (39.9 vs 35.8 ms), faster
    # on the H100 (52.9 vs 70.1): which layout the folded default should use is per card.
    InferCase("folded BN (NCHW)", fold_bn=True),
    InferCase("folded BN + bf16 w + CL + cudnn.bm", bf16_weights=True, channels_last=True,
              fold_bn=True, cudnn_benchmark=True, cuda_only=True),
    # (On a CPU nothing is captured: the pieces run eagerly, which checks their numerics.)
    InferCase("row graphs (b1) + folded BN + CL", channels_last=True, fold_bn=True,
              row_graphs=True),
    InferCase("row graphs (b1) + folded BN + bf16 w + CL", bf16_weights=True, channels_last=True,
              fold_bn=True, row_graphs=True),
    InferCase("row graphs (b1) + folded BN (NCHW)", fold_bn=True, row_graphs=True),
    InferCase("folded BN + conv·ReLU fused + CL", channels_last=True, fold_bn=True,
              fuse_relu=True),
    InferCase("row graphs (b1) + folded BN + conv·ReLU fused + CL", channels_last=True,
              fold_bn=True, fuse_relu=True, row_graphs=True),
    InferCase("compile blocks + bf16 w + CL", bf16_weights=True, channels_last=True,
              compile="blocks"),
    InferCase("static soft forward fp32", hard=False),
    # What removing every launch gap gives: the soft forward is static (every path computed),
    # so it replays as one graph; the per-sample routing forward waits for routes on the host.
    InferCase("static soft, CUDA graph, folded BN + bf16 w + CL", bf16_weights=True,
              channels_last=True, fold_bn=True, hard=False, graph=True, cuda_only=True),
    InferCase("static soft, compile + bf16 w + CL", bf16_weights=True, channels_last=True,
              compile="whole", hard=False),
    InferCase("static soft, compile reduce-overhead (CUDA graphs) + bf16 w + CL",
              bf16_weights=True, channels_last=True, compile="whole", mode="reduce-overhead",
              hard=False, cuda_only=True, optional=True),
    # Last: Dynamo breaks the graph at every routing decision (a host sync), so this compiles
    # many small graphs; it runs only when their estimated compile time fits.
    InferCase("compile whole forward fp32", compile="whole"),
)
# Seconds inductor needs per small graph (a guess for the skip decision, not a measurement).
SECONDS_PER_GRAPH = {"cuda": 1.0, "cpu": 2.5}


def compile_blocks(net: nn.Module, *, backend: str, mode: str | None) -> None:
    """Compile every block in place; the routing between them stays eager Python."""
    blocks: list[nn.Module] = [net.stem, *net.decoder.levels, net.head]
    for node in net.nodes.values():
        blocks += [node.cell, node.gate, *node.transforms.values()]
    for block in blocks:
        block.compile(backend=backend, mode=mode if backend == "inductor" else None,
                      dynamic=False)


class InferRunner:
    """A copy of `net` converted and compiled as `case` says; calling it runs inference.

    The copy keeps the source's (pinned) gates; `self.net` is the copy, for pinning routes.
    """

    def __init__(self, net: nn.Module, case: InferCase, *, backend: str = "inductor") -> None:
        from dynroute.models.fusion import fold_batchnorm, fuse_conv_relu

        self.case = case
        if case.fuse_relu and not case.fold_bn:
            raise ValueError("conv·ReLU fusion works on a network with its BN folded")
        self.net = fold_batchnorm(net) if case.fold_bn else copy.deepcopy(net).eval()
        if case.fuse_relu:
            self.net = fuse_conv_relu(self.net)
        if case.bf16_weights:
            self.net = self.net.to(torch.bfloat16)
        if case.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device_type = next(self.net.parameters()).device.type
        self.forward: Callable = self.net
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}
        if case.graph and (case.hard or case.compile or case.autocast_bf16):
            raise ValueError("a CUDA graph case runs the static soft forward, eagerly built")
        self.row_graphs = None
        if case.row_graphs:
            from dynroute.models.graphed_routing import GraphedRouting

            if not case.hard or case.compile or case.autocast_bf16:
                raise ValueError("row graphs run the routing forward, eagerly built")
            self.row_graphs = GraphedRouting(self.net)
        if case.compile == "blocks":
            compile_blocks(self.net, backend=backend, mode=case.mode)
        elif case.compile == "whole":
            self.forward = _compile(self.net, backend=backend, mode=case.mode)

    def __call__(self, images: torch.Tensor):
        """RoutingOutput of the images (B, 3, H, W) float32."""
        x = images.to(torch.bfloat16) if self.case.bf16_weights else images
        if self.case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.case.graph:
            return self._replay(x)
        if self.row_graphs is not None and x.shape[0] == 1:
            return self.row_graphs(x)
        with torch.inference_mode(), torch.autocast(
                device_type=self.device_type, dtype=torch.bfloat16,
                enabled=self.case.autocast_bf16):
            return self.forward(x, skip=self.case.hard)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).logits.float().clone()  # clone: CUDA-graph outputs get overwritten

    def _replay(self, x: torch.Tensor):
        """The forward of `x` replayed from the graph captured for its shape (captured on the
        first call with that shape, after two warm-up calls on a side stream)."""
        key = tuple(x.shape)
        if key not in self.graphs:
            static = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    self.forward(static, skip=False)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                out = self.forward(static, skip=False)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        static.copy_(x)
        graph.replay()
        return out


def count_graphs(net: nn.Module, images: torch.Tensor, *, hard: bool) -> tuple[int, Counter]:
    """Graphs and graph-break reasons of one forward under Dynamo, without code generation."""
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    before = _dynamo_counts()[1]
    traced = torch.compile(copy.deepcopy(net), backend=backend, dynamic=False)
    with torch.inference_mode():
        traced(images, skip=hard)
    return len(graphs), _dynamo_counts()[1] - before


def _compile_estimate_skip(case: InferCase, net: nn.Module, images: torch.Tensor, sizes: Sizes,
                           device: Device, clock: Clock) -> str:
    """Why not to compile a graph-breaking forward now ("" to go ahead)."""
    if case.compile != "whole" or not case.hard or sizes.compile_backend != "inductor":
        return ""
    graphs, breaks = count_graphs(net, images, hard=case.hard)
    estimate = 2 * graphs * SECONDS_PER_GRAPH[device.torch.type]  # two batch sizes
    if estimate <= clock.section_left():
        return ""
    most = breaks.most_common(1)[0][0].splitlines()[0][:70] if breaks else "-"
    return (f"{graphs} graphs per forward ({sum(breaks.values())} graph breaks, most: {most}); "
            f"compiling ~{estimate:.0f}s > {max(0.0, clock.section_left()):.0f}s left")


def open_network(sizes: Sizes, device: Device) -> nn.Module:
    """The inference network from the fixed seed, every gate pinned open."""
    from dynroute.models import build_network
    from dynroute.models.gate import pin_gate

    torch.manual_seed(SEED)
    net = build_network(_network_config(sizes, small_gate=False)).to(device.torch).eval()
    for node in net.nodes.values():
        pin_gate(node.gate, [True] * len(node.paths))
    return net


def inference_images(sizes: Sizes, device: Device, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return (torch.randn(batch, 3, *sizes.infer_size, generator=gen) * 50.0).to(device.torch)


def run_infer_case(case: InferCase, net: nn.Module, sizes: Sizes, device: Device, clock: Clock,
                   reference: torch.Tensor | None
                   ) -> tuple[Row, InferRunner | None, torch.Tensor | None]:
    """Build, warm up and check one case (its timing is `time_infer_cases`'s)."""
    row = Row("infer", case.name, note="" if case.hard else "static: every path computed")
    before = _dynamo_counts()
    saved_benchmark = torch.backends.cudnn.benchmark
    device.reset_peak()
    one = inference_images(sizes, device, 1)
    batch = inference_images(sizes, device, sizes.infer_batch)
    try:
        skip = _compile_estimate_skip(case, net, one, sizes, device, clock)
        if skip:
            row.status = f"skipped: {skip}"
            return row, None, None
        torch.backends.cudnn.benchmark = case.cudnn_benchmark or saved_benchmark
        runner = InferRunner(net, case, backend=sizes.compile_backend)
        device.sync()
        start = time.perf_counter()
        logits = runner.logits(one)
        device.sync()
        row.first_s = time.perf_counter() - start
        runner(one)  # warm-up
        runner(batch)  # warm-up (and compile) at the throughput batch
        runner(batch)
        row.peak_mib = device.peak_mib()
        row.extra["ops"] = None if case.compile else count_ops(lambda: runner(one))
        ref = logits if reference is None else reference
        row.check = compare(logits, ref, tol=tolerance(case.bf16, device))
        if case.compile:
            row.note = "; ".join(filter(None, [row.note, _graph_note(before)]))
        return row, runner, logits
    except Exception as err:
        row.status = f"failed: {_reason(err)}"
        if case.compile:
            row.note = "; ".join(filter(None, [row.note, _graph_note(before)]))
        return row, None, None
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark


def run_infer(sizes: Sizes, device: Device, clock: Clock, *, no_compile: bool
              ) -> tuple[list[Row], dict[str, InferRunner]]:
    net = open_network(sizes, device)
    cases = [c for c in INFER_CASES if device.cuda or not c.cuda_only]
    rows, runners, reference = [], {}, None
    timed: dict[str, tuple[Row, InferRunner]] = {}
    compile_estimate = sizes.compile_floor_s
    for i, case in enumerate(cases):
        skip = _skip_reason(case.compile is not None, case.optional, i, clock, compile_estimate,
                            no_compile)
        if i > 0 and reference is None:
            skip = "the baseline failed"
        if skip:
            rows.append(Row("infer", case.name, status=f"skipped: {skip}"))
            continue
        _progress(f"infer: {case.name}")
        row, runner, logits = run_infer_case(case, net, sizes, device, clock, reference)
        if i == 0:
            reference = logits
        if case.compile and row.first_s is not None:
            compile_estimate = max(compile_estimate, row.first_s)
        if runner is not None:
            timed[case.name] = (row, runner)
            if case.hard:
                runners[case.name] = runner  # candidates for the dynamic section
        rows.append(row)
    time_infer_cases(list(timed.values()), sizes, device, clock)
    return rows, runners


def time_infer_cases(timed: list[tuple[Row, InferRunner]], sizes: Sizes, device: Device,
                     clock: Clock) -> None:
    """Latency at batch 1 and throughput at the batch, in interleaved rounds over the cases:
    noise on the machine then hits every case alike (measured on a busy 2-core VM, back-to-back
    blocks of repeats ranked the same two cases differently from one run to the next)."""
    if not timed:
        return
    one = inference_images(sizes, device, 1)
    batch = inference_images(sizes, device, sizes.infer_batch)
    saved_benchmark = torch.backends.cudnn.benchmark
    ones: dict[str, list[float]] = {row.case: [] for row, _ in timed}
    batches: dict[str, list[float]] = {row.case: [] for row, _ in timed}
    try:
        def one_round() -> None:
            for row, runner in timed:
                torch.backends.cudnn.benchmark = runner.case.cudnn_benchmark or saved_benchmark
                ones[row.case].append(median_time(lambda r=runner: r(one), device, 1))
                batches[row.case].append(median_time(lambda r=runner: r(batch), device, 1))

        start = time.perf_counter()
        one_round()
        repeats = clock.repeats(sizes.infer_repeats, time.perf_counter() - start, 1)
        for _ in range(repeats - 1):
            one_round()
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    for row, _ in timed:
        row.repeats = len(ones[row.case])
        row.ms = statistics.median(ones[row.case]) * 1e3
        row.images_per_s = sizes.infer_batch / statistics.median(batches[row.case])


# -- (c) dynamic savings --------------------------------------------------------------------------
def count_host_waits(fn: Callable[[], object], device: Device) -> int | None:
    """How many times `fn` makes the host wait for the GPU (CUDA's sync debug mode flags each
    one); None on CPU, where nothing is asynchronous."""
    if not device.cuda:
        return None
    device.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def copy_pins(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the pinned gates of `source` (same architecture), so both take one route."""
    with torch.no_grad():
        for key, node in source.nodes.items():
            final_src = node.gate.features[-1]
            final_dst = target.nodes[key].gate.features[-1]
            final_dst.weight.copy_(final_src.weight)
            final_dst.bias.copy_(final_src.bias)


MIXED_CASE = "mixed routes in one batch vs each image alone (float64)"


def check_mixed_routes(device: Device) -> Row:
    """Per-sample routing on this device: a batch whose images take different routes must give
    each image what it gives alone (float64, so only a routing mistake can differ)."""
    from dynroute.models import NetworkConfig, build_network

    torch.manual_seed(SEED)
    net = build_network(NetworkConfig(layers=4, base_channels=8, num_classes=NUM_CLASSES))
    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for node in net.nodes.values():  # strong random gates, no bias: routes differ by image
            final = node.gate.features[-1]
            final.weight.copy_(torch.randn(final.weight.shape, generator=gen) * 3)
            final.bias.zero_()
    net = net.double().to(device.torch).eval()
    images = (torch.randn(6, 3, 64, 96, generator=gen) * 30
              + torch.randn(6, 3, 1, 1, generator=gen) * 60).double().to(device.torch)
    with torch.inference_mode():
        batched = net(images)
        alone = torch.cat([net(images[i:i + 1]).logits for i in range(len(images))])
    routes = {tuple(bool(v) for n in sorted(batched.gates) for v in batched.gates[n][i] > 1e-4)
              for i in range(len(images))}
    return Row("dynamic", MIXED_CASE, check=compare(batched.logits, alone, tol=1e-9),
               note=f"{len(routes)} distinct routes among {len(images)} images")


def run_dynamic(sizes: Sizes, device: Device, clock: Clock, candidates: dict[str, InferRunner],
                infer_rows: list[Row]) -> list[Row]:
    scenarios_mod = load_file("_gpu_bench_dynamic_inference", HERE / "dynamic_inference.py")
    net = open_network(sizes, device)
    size = sizes.infer_size
    images = inference_images(sizes, device, 1)
    probe = images[:, :, : min(size[0], 64), : min(size[1], 128)]
    full = scenarios_mod.real_flops(net, scenarios_mod.all_open, images, size)
    random_pin, _ = scenarios_mod.find_random_route(net, probe, size, full, target=0.4)
    scenarios = {"all-open": scenarios_mod.all_open, "no-up-down": scenarios_mod.no_up_down,
                 "alternate-rows": scenarios_mod.alternate_rows, "random-40": random_pin}
    flops = {name: scenarios_mod.real_flops(net, pin, images, size)
             for name, pin in scenarios.items()}

    paths: dict[str, InferRunner] = {INFER_BASELINE.name: InferRunner(net, INFER_BASELINE)}
    best = _best_routing_path(infer_rows, candidates)
    if best is not None:
        paths[best] = candidates[best]
    cost = net.cost_model(*size)
    rows: list[Row] = [check_mixed_routes(device)]
    waits: dict[tuple[str, str], int | None] = {}
    for name, pin in scenarios.items():  # route check and warm-up (compiles new routes)
        pin(net)
        for path, runner in paths.items():
            copy_pins(net, runner.net)
            real = cost.real(runner(images).gates).mean().item()
            runner(images)
            waits[path, name] = count_host_waits(lambda r=runner: r(images), device)
            if abs(real - flops[name]) > 1e-6 * flops[name]:
                rows.append(Row("dynamic", f"{path} / {name}",
                                status=f"failed: took another route ({real:.3g} vs "
                                       f"{flops[name]:.3g} FLOPs)"))
    per_run = median_time(lambda: paths[INFER_BASELINE.name](images), device, 1)
    repeats = clock.repeats(sizes.infer_repeats, per_run * len(paths) * len(scenarios), 1)
    times: dict[tuple[str, str], list[float]] = {(p, s): [] for p in paths for s in scenarios}
    for _ in range(repeats):  # interleaved, so machine noise hits every scenario alike
        for name, pin in scenarios.items():
            pin(net)
            for path, runner in paths.items():
                copy_pins(net, runner.net)
                times[path, name].append(median_time(lambda r=runner: r(images), device, 1))
    for path in paths:
        base_ms = statistics.median(times[path, "all-open"]) * 1e3
        for name in scenarios:
            ms = statistics.median(times[path, name]) * 1e3
            flops_ratio = flops[name] / flops["all-open"]
            latency_ratio = ms / base_ms
            follows = latency_ratio / flops_ratio
            rows.append(Row("dynamic", f"{path} / {name}", ms=ms, repeats=repeats, extra={
                "path": path, "scenario": name, "gflops": flops[name] / 1e9,
                "flops_ratio": flops_ratio, "latency_ratio": latency_ratio,
                "latency_over_flops": follows, "host_waits": waits[path, name],
                "within_tolerance": abs(follows - 1) <= DYNAMIC_TOLERANCE}))
    return rows


def _best_routing_path(infer_rows: list[Row], candidates: dict[str, InferRunner]) -> str | None:
    """The fastest per-sample-routing inference path at batch 1 that passed its check."""
    fastest = [r for r in infer_rows if r.case in candidates and r.case != INFER_BASELINE.name
               and r.ms is not None and r.check is not None and r.check.ok]
    return min(fastest, key=lambda r: r.ms).case if fastest else None  # type: ignore[arg-type]


# -- report ---------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "n/a" if not numerator or not denominator else f"{numerator / denominator:.2f}x"


def _ref(refs: dict[str, float], case: str) -> str:
    return f"{refs[case]:.1f}" if case in refs else ""


def _check_cells(check: Check | None) -> list[str]:
    if check is None:
        return ["", "", ""]
    mark = "✓" if check.ok else "✗"
    return [f"{check.max_abs:.2e}", f"{check.rel:.2e}", f"{mark} ≤{check.tol:.0e}"]


def _train_check_cells(row: Row) -> list[str]:
    cells = []
    for check in (row.check, row.grad_check):
        mark = "" if check is None else "✓" if check.ok else "✗"
        cells.append("n/a" if check is None else f"{check.rel:.2e} {mark}≤{check.tol:.0e}")
    return cells


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    full = [r for r in rows if len(r) == len(headers)]
    widths = [max(len(h), *(len(r[i]) for r in full)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for r in rows:
        if len(r) == 2:  # a failed or skipped case: its status spans the row
            print(f"{r[0].ljust(widths[0])}  {r[1]}")
            continue
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def report_train(rows: list[Row], sizes: Sizes, device: Device, reference_sizes: bool) -> None:
    base = rows[0]
    refs = REFERENCE["train"] if device.cuda and reference_sizes else {}
    headers = ["case", "img/s", "speedup", "ms/step", "ops", "peak MiB", "saved MiB", "1st step s",
               "losses Δ rel", "grad Δ rel (L2)"] + (["ref img/s"] if refs else [])
    table = []
    for r in rows:
        if r.case == MIXED_CASE:
            continue
        if r.status != "ok":
            table.append([r.case, r.status])
            continue
        table.append([r.case, _fmt(r.images_per_s, ".2f"),
                      _ratio(r.images_per_s, base.images_per_s), _fmt(r.ms, ".1f"),
                      _fmt(r.extra.get("ops"), "d"), _fmt(r.peak_mib, ".0f"),
                      _fmt(r.extra.get("saved_mib"), ".1f"),
                      _fmt(r.first_s, ".1f"), *_train_check_cells(r)]
                     + ([_ref(refs, r.case)] if refs else []))
    h, w = sizes.crop
    print_table(f"(a) training step: L={sizes.layers}, C0={sizes.base_channels}, batch "
                f"{sizes.train_batch}, {h}x{w}, SGD + {BUDGET_NAME} budget loss + clip "
                f"{GRAD_CLIP}{', small gate' if sizes.small_gate else ''}; vs fp32 eager: losses "
                f"of the first {CHECK_STEPS} steps (max |Δ| / max |ref|) and the first step's "
                f"gradient (||Δ|| / ||ref||); ops: operators run per step (views left out); "
                f"saved MiB: activations kept for the backward pass",
                headers, table)
    for r in rows:
        if r.note:
            print(f"  {r.case}: {r.note}")
    if refs:
        best = max((r.images_per_s for r in rows if r.images_per_s and r.check and r.check.ok
                    and r.grad_check and r.grad_check.ok), default=0.0)
        print(f"  reference (paper impl., H100, torch 2.11): fp32 28.6, bf16 28.0, bf16+CL 28.9 "
              f"img/s; goal >= {GOAL_TRAIN_IPS:.0f} img/s: best here {best:.1f} "
              f"{'✓' if best >= GOAL_TRAIN_IPS else '✗'}")


def report_infer(rows: list[Row], sizes: Sizes, device: Device, reference_sizes: bool) -> None:
    base = rows[0]
    refs = REFERENCE["infer"] if device.cuda and reference_sizes else {}
    headers = ["case", "b1 ms", "speedup", f"b{sizes.infer_batch} img/s", "speedup", "b1 ops",
               "peak MiB", "1st call s", "logits Δ abs", "Δ rel", "check"] + (
                   ["ref ms"] if refs else [])
    table = []
    for r in rows:
        if r.case == MIXED_CASE:
            continue
        if r.status != "ok":
            table.append([r.case, r.status])
            continue
        table.append([r.case, _fmt(r.ms, ".2f"), _ratio(base.ms, r.ms),
                      _fmt(r.images_per_s, ".2f"), _ratio(r.images_per_s, base.images_per_s),
                      _fmt(r.extra.get("ops"), "d"), _fmt(r.peak_mib, ".0f"),
                      _fmt(r.first_s, ".1f"), *_check_cells(r.check)]
                     + ([_ref(refs, r.case)] if refs else []))
    h, w = sizes.infer_size
    print_table(f"(b) inference, every path open: L={sizes.layers}, C0={sizes.base_channels}, "
                f"{h}x{w}; latency at batch 1, throughput at batch {sizes.infer_batch}, median "
                f"of {base.repeats} interleaved rounds; logits Δ vs fp32 eager", headers, table)
    for r in rows:
        if r.note:
            print(f"  {r.case}: {r.note}")
    if refs:
        passed = [r for r in rows if r.ms and r.check and r.check.ok]
        routed = [r.ms for r in passed if "static" not in r.note]
        static = [r.ms for r in passed if "static" in r.note]
        best = min(routed, default=float("inf"))
        print(f"  reference (paper impl., H100, torch 2.11): fp32 59.8 ms, bf16 73.9 ms; goal <= "
              f"{GOAL_INFER_MS:.0f} ms: best per-sample routing {best:.1f} ms "
              f"{'✓' if best <= GOAL_INFER_MS else '✗'}, best static "
              f"{min(static, default=float('nan')):.1f} ms")


def report_dynamic(rows: list[Row], sizes: Sizes) -> None:
    headers = ["path / scenario", "GFLOPs", "FLOPs ratio", "ms", "latency ratio", "lat/FLOPs",
               f"within {DYNAMIC_TOLERANCE:.0%}", "host waits"]
    table = []
    for r in rows:
        if r.case == MIXED_CASE:
            continue
        if r.status != "ok":
            table.append([r.case, r.status])
            continue
        e = r.extra
        table.append([r.case, f"{e['gflops']:.3g}", f"{e['flops_ratio']:.3f}", f"{r.ms:.2f}",
                      f"{e['latency_ratio']:.3f}", f"{e['latency_over_flops']:.3f}",
                      "✓" if e["within_tolerance"] else "✗", _fmt(e["host_waits"], "d")])
    h, w = sizes.infer_size
    repeats = max((r.repeats for r in rows), default=0)
    print_table(f"(c) dynamic savings: routes pinned through the real gates, batch 1, {h}x{w}, "
                f"median of {repeats} interleaved repeats", headers, table)
    for r in rows:
        if r.case == MIXED_CASE and r.check is not None:
            print(f"  {r.case}: max |Δ| / max |ref| {r.check.rel:.1e} "
                  f"{'✓' if r.check.ok else '✗'} ({r.note})")
    measured = [r for r in rows if r.status == "ok" and r.case != MIXED_CASE]
    within = sum(r.extra["within_tolerance"] for r in measured)
    print(f"  latency follows real FLOPs within {DYNAMIC_TOLERANCE:.0%} for {within} of "
          f"{len(measured)} path/scenario pairs")


def _progress(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


def environment(device: Device, models: ModuleType) -> dict:
    env = {"torch": torch.__version__, "device": str(device.torch),
           "threads": torch.get_num_threads(), "models": str(Path(models.__file__).parent),
           "pyyaml": importlib.util.find_spec("yaml") is not None}
    if device.cuda:
        env |= {"gpu": torch.cuda.get_device_name(device.torch), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "tf32_conv": torch.backends.cudnn.allow_tf32,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    else:
        env["cpu_memory"] = "peak memory per case is n/a on CPU"
    return env


def _select_device(name: str) -> Device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this PyTorch build")
    return Device(torch.device(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat, Dynamo-only compilation (for CI)")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds for the whole run; repeats shrink and compile cases are "
                             "skipped to fit (default 420)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default 1 on CPU, torch's own with CUDA): "
                             "on a busy 2-core host two OpenMP threads made a 40 ms CPU step "
                             "take 10 s, and the CPU figures are checks, not speed claims")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--models", type=Path, default=ROOT / "models",
                        help="load the model code from this folder instead of ../models (to "
                             "compare two versions of it with the same script)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    clock = Clock(args.time_budget)
    device = _select_device(args.device)
    threads = args.threads or (None if device.cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    models = load_models(args.models)
    configure_torch()
    sizes = sizes_for(device, args.smoke)
    reference_sizes = sizes == sizes_for(Device(torch.device("cuda")), False)
    env = environment(device, models)

    print(f"gpu_bench: torch {env['torch']} on {env.get('gpu', 'CPU')} ({device.torch}), "
          f"{env['threads']} CPU threads" + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
                                             f"TF32 conv {env['tf32_conv']} / matmul "
                                             f"{env['tf32_matmul']}" if device.cuda else ""))
    print(f"models loaded from {env['models']} (as {MODELS_PACKAGE}); PyYAML "
          f"{'present' if env['pyyaml'] else 'absent (not needed)'}")
    print(f"time budget {args.time_budget:.0f}s; compile backend {sizes.compile_backend}"
          + ("; smoke sizes" if args.smoke else ""))

    sections = [s for s in SECTIONS if not args.only or s in args.only]
    results: dict[str, list[Row]] = {}
    candidates: dict[str, InferRunner] = {}
    for i, section in enumerate(sections):
        clock.start_section(SECTION_SHARE[section] / sum(SECTION_SHARE[s]
                                                         for s in sections[i:]))
        if section == "train":
            results["train"] = run_train(sizes, device, clock, no_compile=args.no_compile)
            report_train(results["train"], sizes, device, reference_sizes)
        elif section == "infer":
            results["infer"], candidates = run_infer(sizes, device, clock,
                                                     no_compile=args.no_compile)
            report_infer(results["infer"], sizes, device, reference_sizes)
        else:
            try:
                results["dynamic"] = run_dynamic(sizes, device, clock, candidates,
                                                 results.get("infer", []))
            except Exception as err:  # e.g. out of memory: report it, keep the other sections
                results["dynamic"] = [Row("dynamic", "eager fp32 (baseline)",
                                          status=f"failed: {_reason(err)}")]
            report_dynamic(results["dynamic"], sizes)
        sys.stdout.flush()

    failed = [f"{r.section}: {r.case}" for rows in results.values() for r in rows
              if any(c is not None and not c.ok for c in (r.check, r.grad_check))]
    runtime = time.perf_counter() - started
    print(f"\nruntime {runtime:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(
            {"environment": env, "sizes": asdict(sizes), "runtime_s": runtime,
             "results": {k: [asdict(r) for r in v] for k, v in results.items()}}, indent=1))
    if failed:
        print(f"FAIL: numerics outside tolerance for {', '.join(failed)}")
        return 1
    print("numerics: every check within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
