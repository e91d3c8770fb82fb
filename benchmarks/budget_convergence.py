"""Does the budget loss bring E/C_all to μ on the embedded default? (losses.py, paper Eq. 9–10)

The budget loss L_C = λ2·lambda2_scale · w(t) · (E/C_all − μ)² pulls the expected cost E over the
all-open one C_all towards μ, from `train.budget_start` on. This script trains params.yaml's
model and recipe (the embedded default: L=8, C0=16, 400 iterations, the budget from 40%) under a
list of variants, each a few `train.*` / `model.*` overrides, with the budget `--budget`
(dynamic-a by default), on a synthetic set it makes from params.yaml's `synth:` section (or
`--data`, a prepared set). The training is `dynroute train`'s on one CPU worker, step for step:
the same initial seed, network (`network_for_budget`, the `run:` fast path), optimizer, lr
schedule, data order, `step_seed`, BudgetLoss (λ2·lambda2_scale, as training.py builds it) and
the platform's own `TrainStep`.

Every `--log-every` steps, at the budget's first step and at the last step, a JSON line per
variant (`--out DIR/<variant>.jsonl`) holds, from that step's own forward pass (measured before
the step's backward; the step is checked to compute the same L_seg and L_C):

  step, lr, gate_lr           the base lr (warm-up, then poly) and the gates' (× gate_lr_multiplier)
  w, lambda2, mu              w(t), λ2·lambda2_scale, μ
  seg, budget, penalty        L_seg, L_C, and (E/C_all − μ)² without its weight
  E_over_Call                 E/C_all over the batch: what the budget pulls towards μ
  alpha_mean, alpha_open_frac, alpha_gt_0.9
                              the gates' α over the batch: mean, share open (α > the closed
                              threshold), share above 0.9
  bias_mean, bias_min, bias_max
                              the gates' output biases β (1.5 at init: every path open)
  gnorm_gate_seg, gnorm_gate_budget_w1
                              ‖∂/∂θ‖ over all gate parameters of L_seg and of L_C at w = 1
  gnorm_gatebias_seg, gnorm_gatebias_budget_w1
                              the same over the gate biases β only
  grad_norm, clip_scale       the step's total gradient norm before clipping, and the factor
                              clipping scales the step by (1: not clipped)

Variants that differ only in the budget's weights (train.budget / lambda2 / mu / lambda2_scale /
budget_ramp, with the same network) compute the same steps until the budget acts (w(t) = 0), so
those steps are trained once and each variant goes on from a copy of the model and optimizer
state (the search's warm start does the same, platform/search/warm_start.py); their JSON lines
for those steps share every figure but the budget's.

Each variant is then evaluated on the val split (platform/evaluate/evaluation.py, at
`evaluate.cost_resolution`) and one table sets, per variant, E/C_all at the last step beside μ
(reached within trials_file.BUDGET_TOLERANCE, or above, or below), the budget's gradient on the
gate biases at its first step, the real GFLOPs beside those of the same network with every path
open, the share of paths open and the mIoU.

    python benchmarks/budget_convergence.py                # the three default variants
    python benchmarks/budget_convergence.py --variant paper:train.lambda2_scale=1 \\
        --variant scale20:train.lambda2_scale=20 --out /tmp/budget
    python benchmarks/budget_convergence.py --smoke        # seconds, for CI

A variant is NAME:KEY=VALUE[,KEY=VALUE...] with KEY a field of params.yaml's `train:` or `model:`
section and VALUE in YAML ("NAME:" alone is params.yaml as it is). Run time at full size: not
measured with this script yet (each variant is 400 steps of the L=8, C0=16 network and one val
evaluation; variants that share the budget-free steps train 40% of theirs once between them).
--smoke runs in seconds and is what tests/test_benchmarks.py checks, against `dynroute train`'s
own function too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from dynroute.models import BudgetLoss, BudgetSchedule, NetworkConfig, build_network
from dynroute.models.cost import CostModel
from dynroute.models.gate import SoftConditionalGate
from dynroute.models.losses import segmentation_loss
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.synth import synthesize
from dynroute.platform.config.params import Params, load_params
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_manifest, verify_shards
from dynroute.platform.device import fast_path
from dynroute.platform.evaluate.evaluation import TTA, evaluate
from dynroute.platform.files import write_json_atomic
from dynroute.platform.search.trials_file import BUDGET_TOLERANCE, budget_end
from dynroute.platform.train.recipe import (
    TrainConfig,
    build_optimizer,
    check_finite,
    network_for_budget,
    set_lr,
    steps_per_epoch,
)
from dynroute.platform.train.train_step import TrainStep
from dynroute.platform.train.training import step_seed

ROOT = Path(__file__).resolve().parents[1]
# The paper's budget, params.yaml's (its lambda2_scale), and the gates' lr scaled instead.
DEFAULT_VARIANTS = ("paper:train.lambda2_scale=1", "default:",
                    "glr20:train.lambda2_scale=1,train.gate_lr_multiplier=20")
# TrainConfig fields that act only through the budget loss: variants differing in these alone
# (and building the same network) share the steps before the budget acts.
BUDGET_ONLY = frozenset({"budget", "lambda2", "mu", "lambda2_scale", "budget_ramp"})
_DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class Variant:
    """One training to compare: its name, the overrides as given, and what they make."""

    name: str
    overrides: dict[str, object]
    model: NetworkConfig  # after network_for_budget: the network the budget trains
    recipe: TrainConfig

    @property
    def lambda2(self) -> float:
        """λ2 · lambda2_scale, the weight the budget loss applies."""
        return self.recipe.budget_weights[0] * self.recipe.lambda2_scale

    @property
    def mu(self) -> float:
        return self.recipe.budget_weights[1]

    @property
    def budget_start(self) -> int:
        """The first step at which w(t) > 0 (`iterations` if none)."""
        schedule = BudgetSchedule(self.recipe.budget_start, self.recipe.budget_ramp)
        n = self.recipe.iterations
        return next((s for s in range(n) if schedule(s / n) > 0), n)

    def shared_key(self) -> str:
        """Equal for variants whose steps are the same until the budget acts."""
        recipe = {k: v for k, v in asdict(self.recipe).items() if k not in BUDGET_ONLY}
        return json.dumps({"model": asdict(self.model), "train": recipe}, sort_keys=True,
                          default=str)

    def budget_loss(self, c_all: float) -> BudgetLoss:
        """The budget loss as training.py builds it."""
        return BudgetLoss(lambda2=self.lambda2, mu=self.mu, c_all=c_all,
                          schedule=BudgetSchedule(self.recipe.budget_start,
                                                  self.recipe.budget_ramp))


_SPLIT = re.compile(r",(?=\s*(?:train|model)\.)")  # a value may hold commas: crop=[64,64]


def parse_variant(text: str, params: Params, budget: str) -> Variant:
    """NAME:KEY=VALUE[,KEY=VALUE...] on top of params.yaml's model and train (budget `budget`).

    Raises ValueError with what to change.
    """
    name, sep, rest = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variant {text!r}: write NAME:KEY=VALUE[,KEY=VALUE...] (NAME of "
                         f"letters, digits, '_', '-', '.'), e.g. scale20:train.lambda2_scale=20")
    sections = {"train": replace(params.train, budget=budget), "model": params.model}
    overrides: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in _SPLIT.split(rest))):
        key, eq, raw = item.partition("=")
        section, _, field = key.partition(".")
        known = {f.name for f in fields(sections[section])} if section in sections else set()
        if not eq or field not in known or field == "route":
            raise ValueError(f"--variant {name}: {item!r} is not KEY=VALUE with KEY a field of "
                             f"params.yaml's train: or model: section, e.g. train.mu=0.2")
        value = yaml.safe_load(raw)
        current = getattr(sections[section], field)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            sections[section] = replace(sections[section], **{field: value})
        except (TypeError, ValueError) as err:
            raise ValueError(f"--variant {name}: {key}={raw}: {err}") from None
        overrides[key] = value
    recipe = sections["train"]
    return Variant(name, overrides, network_for_budget(sections["model"], recipe.budget), recipe)


def _norm(grads) -> float:
    """‖g‖₂ over a list of gradients (None: unused)."""
    present = [g for g in grads if g is not None]
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in present))) if present else 0.0


class Probe(nn.Module):
    """The network as TrainStep calls it. When `watch(labels)` was called before a step, the
    step's own forward is measured (losses, gates, gradients on the gate parameters from L_seg
    and from each budget at w = 1) before TrainStep's backward; `autograd.grad` with the graph
    kept leaves the parameters' .grad alone, so the step trains exactly as without the probe."""

    def __init__(self, network: nn.Module, cost: CostModel,
                 budgets: dict[str, BudgetLoss]) -> None:
        super().__init__()
        self.network, self.cost, self.budgets = network, cost, budgets
        self.c_all = cost.all_open_expected()
        gates = [m for m in network.modules() if isinstance(m, SoftConditionalGate)]
        self.gate_params = [p for g in gates for p in g.parameters()]
        self.gate_biases = [g.features[-1].bias for g in gates]  # β of the gate's last conv
        self._bias_ids = {id(b) for b in self.gate_biases}
        self.labels: torch.Tensor | None = None
        self.figures: dict | None = None

    def watch(self, labels: torch.Tensor) -> None:
        self.labels, self.figures = labels, None

    def forward(self, images: torch.Tensor, *, progress: float = 0.0):
        out = self.network(images, progress=progress)
        if self.labels is not None:
            self.figures = self._measure(out, progress)
            self.labels = None
        return out

    def _grad_norms(self, loss: torch.Tensor) -> tuple[float, float]:
        """(‖∂loss/∂θ‖ over the gate parameters, the same over the gate biases)."""
        if not self.gate_params:  # fixed gates: nothing to route
            return 0.0, 0.0
        grads = torch.autograd.grad(loss, self.gate_params, retain_graph=True, allow_unused=True)
        biases = [g for g, p in zip(grads, self.gate_params, strict=True)
                  if id(p) in self._bias_ids]
        return _norm(grads), _norm(biases)

    def _measure(self, out, progress: float) -> dict:
        seg = segmentation_loss(out.logits.float(), self.labels)  # as TrainStep computes them
        expected = self.cost.expected({k: v.float() for k, v in out.gates.items()})  # (B,)
        alpha = torch.cat([a.detach().float().flatten() for a in out.gates.values()])
        threshold = self.network.closed_threshold
        g_seg, g_seg_bias = self._grad_norms(seg)
        shared = {"seg": float(seg.detach()),
                  "E_over_Call": float(expected.detach().mean() / self.c_all),
                  "alpha_mean": float(alpha.mean()),
                  "alpha_open_frac": float((alpha > threshold).float().mean()),
                  "alpha_gt_0.9": float((alpha > 0.9).float().mean()),
                  "gnorm_gate_seg": g_seg, "gnorm_gatebias_seg": g_seg_bias}
        if self.gate_biases:
            beta = torch.cat([b.detach().flatten() for b in self.gate_biases])
            shared |= {"bias_mean": float(beta.mean()), "bias_min": float(beta.min()),
                       "bias_max": float(beta.max())}
        per_budget = {}
        for name, budget in self.budgets.items():
            penalty = budget.penalty(expected)
            g, g_bias = self._grad_norms(budget.lambda2 * penalty)  # L_C at w = 1
            per_budget[name] = {"w": budget.schedule(progress), "lambda2": budget.lambda2,
                                "mu": budget.mu,
                                "budget": float(budget.weight(progress) * penalty.detach()),
                                "penalty": float(penalty.detach()), "gnorm_gate_budget_w1": g,
                                "gnorm_gatebias_budget_w1": g_bias}
        return {"shared": shared, "budgets": per_budget}


@dataclass
class Training:
    """One network part-way through the recipe: what train_loop holds on one CPU worker."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0


def start_training(model: NetworkConfig, recipe: TrainConfig, layout) -> Training:
    torch.manual_seed(recipe.seed)  # train_loop's initial weights
    network = layout.network(build_network(model)).to(_DEVICE)
    return Training(network, build_optimizer(network, recipe))


def branch(shared: Training, recipe: TrainConfig) -> Training:
    """A copy of `shared` (model and optimizer state) that goes on under `recipe`."""
    network = copy.deepcopy(shared.network)
    optimizer = build_optimizer(network, recipe)
    # load_state_dict keeps tensors that need no cast: without a copy, branches would share
    # their momentum buffers.
    optimizer.load_state_dict(copy.deepcopy(shared.optimizer.state_dict()))
    return Training(network, optimizer, shared.step)


def advance(training: Training, until: int, *, recipe: TrainConfig, variants: list[Variant],
            dataset: ShardDataset, layout, loader_workers: int, log_steps: set[int],
            log, label: str) -> float:
    """Train `training` to step `until` as train_loop does; at `log_steps` call
    log(variant name, record) for each of `variants` (the first one's budget is the one
    trained) and print the first one's progress under `label`. Returns the seconds spent."""
    cost = training.network.cost_model(*recipe.crop)  # C_all at the training resolution
    budgets = {v.name: v.budget_loss(cost.all_open_expected()) for v in variants}
    trained = budgets[variants[0].name]
    probe = Probe(training.network, cost, budgets)
    step_fn = TrainStep(probe, training.network, cost, trained, training.optimizer, recipe,
                        layout, _DEVICE)
    per_epoch = steps_per_epoch(len(dataset), recipe.batch_size)
    training.network.train()
    started = time.monotonic()
    while training.step < until:
        epoch, skip = divmod(training.step, per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, drop_last=True,
                            num_workers=loader_workers)
        for i, batch in enumerate(loader):
            if i < skip:
                continue  # started mid-epoch: these batches were trained before
            if training.step >= until or i >= per_epoch:
                break
            step = training.step
            lr = set_lr(training.optimizer, step, recipe)
            torch.manual_seed(step_seed(recipe.seed, 0, step))
            logged = step in log_steps
            if logged:
                probe.watch(batch["label"])
            seg, budget, _, norm = step_fn(batch, step / recipe.iterations).tolist()
            training.step += 1
            if not logged:
                continue
            check_finite({"loss_seg": seg, "loss_budget": budget, "grad_norm": norm},
                         f"at step {step}")
            figures = probe.figures
            mine = figures["budgets"][variants[0].name]
            if not (math.isclose(figures["shared"]["seg"], seg, rel_tol=1e-6)
                    and math.isclose(mine["budget"], budget, rel_tol=1e-6, abs_tol=1e-12)):
                raise RuntimeError(f"step {step}: the probe measured L_seg "
                                   f"{figures['shared']['seg']} and L_C {mine['budget']}, the "
                                   f"step {seg} and {budget}: it does not see the step trained")
            common = {"step": step, "lr": lr, "gate_lr": lr * recipe.gate_lr_multiplier,
                      **figures["shared"], "grad_norm": norm,
                      "clip_scale": min(1.0, recipe.grad_clip / norm) if norm > 0 else 1.0,
                      "elapsed_s": time.monotonic() - started}
            for v in variants:
                log(v.name, common | figures["budgets"][v.name])
            print(_progress(label, common | mine, recipe.iterations), file=sys.stderr,
                  flush=True)
    return time.monotonic() - started


def _progress(label: str, record: dict, iterations: int) -> str:
    return (f"[{label}] step {record['step']}/{iterations} seg {record['seg']:.3f} "
            f"E/C_all {record['E_over_Call']:.3f} (μ {record['mu']:.2f}, w {record['w']:.2f}) "
            f"α open {record['alpha_open_frac']:.2f} β mean {record.get('bias_mean', 0):.2f} "
            f"‖∇β‖ seg {record['gnorm_gatebias_seg']:.1e} budget(w=1) "
            f"{record['gnorm_gatebias_budget_w1']:.1e} gate lr {record['gate_lr']:.4f} "
            f"clip {record['clip_scale']:.2f} {record['elapsed_s']:.0f}s")


def evaluated(network: nn.Module, data: Path, params: Params) -> dict:
    """The variant's figures on params.evaluate.split, as `dynroute evaluate` computes them."""
    settings = params.evaluate
    manifest = read_manifest(str(data))
    tta = (TTA(scales=settings.tta_scales or (1.0,), flip=settings.tta_flip)
           if settings.tta_scales or settings.tta_flip else None)
    dataset = ShardDataset(root=str(data), split=settings.split, train=False, crop=None)
    result = evaluate(network, dataset, num_classes=manifest.num_classes,
                      class_names=manifest.class_names, cost_resolution=settings.cost_resolution,
                      tta=tta, fast=settings.fast, device=_DEVICE,
                      loader_workers=settings.loader_workers)
    cost = network.cost_model(*settings.cost_resolution)
    all_open = cost.all_open_real() / 1e9
    return {"miou": result.miou, "gflops_mean": result.gflops.mean,
            "gflops_min": result.gflops.min, "gflops_max": result.gflops.max,
            "gflops_all_open": all_open,
            "gflops_floor": all_open - cost.all_open_expected() / 1e9,
            "paths_open": float(np.mean(list(result.gate_probability.values()))),
            "images": result.images}


def run(variants: list[Variant], data: Path, params: Params, args: argparse.Namespace,
        out: Path | None) -> tuple[list[dict], list[dict]]:
    """Train and evaluate every variant; (one result per variant, the shared prefixes)."""
    manifest = read_manifest(str(data))
    verify_shards(str(data), manifest, splits=("train",))  # as `dynroute train` does
    run_settings = params.run
    layout = fast_path.for_training(_DEVICE, fast=run_settings.fast,
                                    channels_last=run_settings.channels_last,
                                    bf16=run_settings.bf16)
    workers = (run_settings.loader_workers if run_settings.loader_workers is not None
               else fast_path.loader_workers(_DEVICE))
    records: dict[str, list[dict]] = {v.name: [] for v in variants}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for v in variants:
            (out / f"{v.name}.jsonl").write_text("")

    def log(name: str, record: dict) -> None:
        records[name].append(record)
        if out is not None:
            with open(out / f"{name}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.shared_key(), []).append(v)
    results, prefixes = {}, []
    for group in groups.values():
        recipe = group[0].recipe  # every field the shared steps read is the same in the group
        n = recipe.iterations
        # A variant alone in its group has no one to share with: it trains every step itself.
        shared_steps = min(v.budget_start for v in group) if len(group) > 1 else 0
        log_steps = {s for s in range(n) if s % args.log_every == 0} | {n - 1}
        log_steps |= {v.budget_start for v in group if v.budget_start < n}
        dataset = ShardDataset(root=str(data), split="train", train=True, crop=recipe.crop,
                               seed=recipe.seed, rank=0, world_size=1)
        shared = start_training(group[0].model, recipe, layout)
        shared_s = advance(shared, shared_steps, recipe=recipe, variants=group, dataset=dataset,
                           layout=layout, loader_workers=workers, log_steps=log_steps, log=log,
                           label=f"shared: {', '.join(v.name for v in group)}")
        if len(group) > 1:
            prefixes.append({"variants": [v.name for v in group], "steps": shared_steps,
                             "seconds": shared_s})
        for v in group:
            training = branch(shared, v.recipe) if len(group) > 1 else shared
            seconds = advance(training, n, recipe=v.recipe, variants=[v], dataset=dataset,
                              layout=layout, loader_workers=workers, log_steps=log_steps,
                              log=log, label=v.name)
            figures = evaluated(training.network, data, params)
            results[v.name] = summarize(v, records[v.name], figures, shared_steps=shared_steps,
                                        seconds=seconds, shared_seconds=shared_s)
            print(f"[{v.name}] trained {n - shared_steps} own + {shared_steps} shared steps in "
                  f"{seconds:.0f}s; mIoU {figures['miou']:.4f}, real GFLOPs "
                  f"{figures['gflops_mean']:.4f}", file=sys.stderr, flush=True)
    return [results[v.name] for v in variants], prefixes


def summarize(variant: Variant, records: list[dict], figures: dict, *, shared_steps: int,
              seconds: float, shared_seconds: float) -> dict:
    """One row of the table: where the budget ended, its start, the evaluation."""
    last = records[-1]
    at_start = next((r for r in records if r["step"] == variant.budget_start), None)
    end = budget_end(lambda2=variant.lambda2, mu=variant.mu, cost_ratio=last["E_over_Call"],
                     gflops=figures["gflops_mean"], floor=figures["gflops_floor"],
                     all_open=figures["gflops_all_open"])
    return {"variant": variant.name, "overrides": variant.overrides,
            "budget": variant.recipe.budget, "lambda2": variant.lambda2, "mu": variant.mu,
            "lambda2_scale": variant.recipe.lambda2_scale,
            "gate_lr_multiplier": variant.recipe.gate_lr_multiplier,
            "iterations": variant.recipe.iterations, "budget_start_step": variant.budget_start,
            "last_step": last["step"], "E_over_Call_last": last["E_over_Call"],
            "budget_end": end, "status": end["status"] if end else "none",
            "gnorm_gatebias_budget_w1_at_start":
                at_start["gnorm_gatebias_budget_w1"] if at_start else None,
            "gnorm_gatebias_seg_at_start": at_start["gnorm_gatebias_seg"] if at_start else None,
            **figures, "gflops_ratio": figures["gflops_mean"] / figures["gflops_all_open"],
            "shared_steps": shared_steps, "train_seconds": seconds,
            "shared_seconds": shared_seconds}


def print_table(rows: list[dict], prefixes: list[dict], params: Params, data_note: str,
                budget: str, *, smoke: bool) -> None:
    train, model = params.train, params.model
    source = "--smoke sizes of params.yaml's" if smoke else "params.yaml's"
    print(f"budget convergence: {source} model (L={model.layers}, C0={model.base_channels})"
          f" and recipe ({train.iterations} iterations, batch {train.batch_size}, crop "
          f"{train.crop[0]}x{train.crop[1]}, budget from {train.budget_start:.0%}), budget "
          f"{budget}; data: {data_note}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for p in prefixes:
        print(f"shared budget-free steps: {p['steps']} trained once for "
              f"{', '.join(p['variants'])} ({p['seconds']:.0f}s)")
    print(f"{'variant':<12}{'λ2·scale':>9}{'μ':>6}{'E/C_all last':>13}  {'budget':<8}"
          f"{'‖∇β L_C‖ start':>15}{'GFLOPs mean [min, max]':>31}{'×all-open':>10}"
          f"{'paths open':>11}{'mIoU':>8}")
    for r in rows:
        grad = r["gnorm_gatebias_budget_w1_at_start"]
        spread = f"{r['gflops_mean']:.4f} [{r['gflops_min']:.4f}, {r['gflops_max']:.4f}]"
        print(f"{r['variant']:<12}{r['lambda2']:>9.3g}{r['mu']:>6.2f}"
              f"{r['E_over_Call_last']:>13.3f}  {r['status']:<8}"
              f"{(f'{grad:.2e}' if grad is not None else '-'):>15}{spread:>31}"
              f"{r['gflops_ratio']:>10.3f}{r['paths_open']:>11.3f}{r['miou']:>8.4f}")
    reference = rows[0]
    print(f"E/C_all last: the expected cost over the all-open one on the last step's batch, "
          f"beside μ, where the budget pulls it (reached: within {BUDGET_TOLERANCE} of μ); "
          f"‖∇β L_C‖ start: the budget's gradient at w = 1 on the gate biases at its first "
          f"step (w > 0); ×all-open: real GFLOPs over the {reference['gflops_all_open']:.4f} of "
          f"the network with every path open (every gate closed still costs "
          f"{reference['gflops_floor']:.4f}: stem, decoder, head, gates), at "
          f"{params.evaluate.cost_resolution[0]}x{params.evaluate.cost_resolution[1]} on "
          f"{reference['images']} {params.evaluate.split} images")


def smoke_params(params: Params) -> Params:
    """Tiny sizes: seconds on a CPU."""
    return replace(
        params, model=replace(params.model, layers=4, base_channels=4),
        train=replace(params.train, iterations=8, batch_size=4, crop=(64, 64),
                      warmup_iterations=1),
        synth=replace(params.synth, train=8, val=4, height=64, width=128),
        evaluate=replace(params.evaluate, cost_resolution=(64, 128)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                        help=f"a training to compare (repeat); default: "
                             f"{' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--budget", default="dynamic-a",
                        help="train.budget of every variant unless it sets its own")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepared set; default: synthesize params.yaml's synth: set")
    parser.add_argument("--log-every", type=int, default=None,
                        help="steps between JSON lines (default: run.log_every; 1 with --smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write DIR/<variant>.jsonl and DIR/summary.json here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ValueError as err:
        parser.error(str(err))
    if args.smoke:
        params = smoke_params(params)
    if args.log_every is None:
        args.log_every = 1 if args.smoke else params.run.log_every
    if args.log_every < 1 or args.threads < 1:
        parser.error("--log-every and --threads must be at least 1")
    try:
        variants = [parse_variant(t, params, args.budget)
                    for t in (args.variant or DEFAULT_VARIANTS)]
    except ValueError as err:
        parser.error(str(err))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        parser.error(f"--variant names {names}: give each name once")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="dynroute-budget-") as tmp:
        data = args.data
        if data is None:
            synth = params.synth
            print(f"synthesizing and preparing {synth.train}+{synth.val} images ...",
                  file=sys.stderr, flush=True)
            synthesize(synth.dataset, Path(tmp) / "raw", train=synth.train, val=synth.val,
                       height=synth.height, width=synth.width, seed=synth.seed)
            data = Path(tmp) / "prepared"
            prepare(synth.dataset, Path(tmp) / "raw", data, workers=1,
                    rows_per_shard=params.data.rows_per_shard,
                    rows_per_group=params.data.rows_per_group)
            note = (f"synthetic {synth.dataset} {synth.train}/{synth.val} images "
                    f"{synth.height}x{synth.width}, seed {synth.seed}")
        else:
            note = str(data)
        rows, prefixes = run(variants, data, params, args, args.out)
    print_table(rows, prefixes, params, note, args.budget, smoke=args.smoke)
    if args.out is not None:
        write_json_atomic(args.out / "summary.json", {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "data": note, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "tolerance": BUDGET_TOLERANCE, "shared": prefixes, "variants": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
