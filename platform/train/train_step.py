"""One step of the training recipe: soft forward, L = L_seg + L_C, backward, clipping, SGD.

`TrainStep` runs it eagerly, or (the fast path on one CUDA device) replays it as a CUDA graph
(cuda_graph.py): each batch is copied into fixed tensors, the learning rates and the budget weight
λ2·w(t) into 0-d device tensors, and the update is `sgd_update`. Either way a step returns its
figures (L_seg, L_C, mean expected FLOPs, gradient norm before clipping) as a float64 device
tensor, without waiting for the device.

The graph stands in for the eager step only where it computes the same step: one worker (no DDP
all-reduce to capture), no drop path (its keep probability and draws change every step), SGD with
momentum. `graph_blocker` names what rules it out; the loop prints it.
"""

from __future__ import annotations

import torch
from torch import nn

from dynroute.models import BudgetLoss
from dynroute.models.cost import CostModel
from dynroute.models.losses import segmentation_loss
from dynroute.platform.device.cuda_graph import GraphedStep, sgd_unsupported, sgd_update
from dynroute.platform.device.fast_path import FastPath
from dynroute.platform.train.recipe import TrainConfig, clip_gradients


def graph_blocker(layout: FastPath, device: torch.device, *, distributed: bool,
                  drop_path_prob: float, optimizer: torch.optim.Optimizer) -> str | None:
    """Why this training cannot replay its step as a CUDA graph (None: it can)."""
    if not layout.cuda_graph:
        return "the fast path is off or the device is not CUDA"
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if distributed:
        return "several workers (DDP's all-reduce is not captured here)"
    if drop_path_prob > 0:
        return "network.drop_path_prob > 0 (drop path draws new branches every step)"
    return sgd_unsupported(optimizer)


class TrainStep:
    """The recipe's step on one worker; `graphed` replays it as a CUDA graph after warm-up steps
    (on a CPU a graphed step runs its graph body eagerly, which is what tests compare)."""

    def __init__(self, model: nn.Module, network: nn.Module, cost: CostModel, budget: BudgetLoss,
                 optimizer: torch.optim.Optimizer, recipe: TrainConfig, layout: FastPath,
                 device: torch.device, *, graphed: bool = False) -> None:
        self.model, self.network, self.cost, self.budget = model, network, cost, budget
        self.optimizer, self.recipe, self.layout, self.device = optimizer, recipe, layout, device
        self.graph: GraphedStep | None = None
        if graphed:
            self.graph = GraphedStep(self._body, device)
            self.lrs = [torch.zeros((), device=device) for _ in optimizer.param_groups]
            self.budget_weight = torch.zeros((), device=device)
            self.images: torch.Tensor | None = None
            self.labels: torch.Tensor | None = None

    @property
    def fallback(self) -> str | None:
        """Why a graphed step runs eagerly after all (its capture failed), else None."""
        return self.graph.fallback if self.graph is not None else None

    def __call__(self, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        """Train on `batch` (host or device tensors) at `progress` = step / iterations; returns
        the (4,) figures, valid until the next call."""
        if self.graph is None:
            return self._eager(batch, progress)
        self._load(batch)
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])
        self.budget_weight.fill_(self.budget.weight(progress))
        return self.graph()

    def _eager(self, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        images = self.layout.images(batch["image"].to(self.device, non_blocking=True))
        labels = batch["label"].to(self.device, non_blocking=True)
        with self.layout.autocast(self.device):
            out = self.model(images, progress=progress)
            seg = segmentation_loss(out.logits.float(), labels)
            expected = self.cost.expected({k: v.float() for k, v in out.gates.items()})
            budget_value = self.budget(expected, progress)
        return self._backward_and_update(seg, budget_value, expected, self.optimizer.step)

    def _load(self, batch: dict[str, torch.Tensor]) -> None:
        """Copy the batch into the graph's fixed input tensors (made from the first batch)."""
        images, labels = batch["image"], batch["label"]
        if self.images is None:
            self.images = self.layout.images(torch.empty(images.shape, dtype=images.dtype,
                                                         device=self.device))
            self.labels = torch.empty(labels.shape, dtype=labels.dtype, device=self.device)
        if images.shape != self.images.shape or labels.shape != self.labels.shape:
            raise ValueError(f"batch of images {tuple(images.shape)} and labels "
                             f"{tuple(labels.shape)}; a step replayed as a CUDA graph takes the "
                             f"first batch's shapes {tuple(self.images.shape)} and "
                             f"{tuple(self.labels.shape)} (set run.fast: false to train eagerly)")
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)

    def _body(self) -> torch.Tensor:
        """The step as the graph holds it: inputs and changing numbers read from tensors."""
        with self.layout.autocast(self.device, cache=False):  # autocast's cache outlives capture
            out = self.model(self.images)  # drop path is off for a graphed step
            seg = segmentation_loss(out.logits.float(), self.labels)
            expected = self.cost.expected({k: v.float() for k, v in out.gates.items()})
            budget_value = self.budget_weight * self.budget.penalty(expected)
        return self._backward_and_update(seg, budget_value, expected,
                                         lambda: sgd_update(self.optimizer, self.lrs))

    def _backward_and_update(self, seg: torch.Tensor, budget_value: torch.Tensor,
                             expected: torch.Tensor, update) -> torch.Tensor:
        loss = seg + budget_value
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(self.network.parameters(), self.recipe.grad_clip)
        update()
        return torch.stack([seg.detach(), budget_value.detach(), expected.detach().mean(),
                            norm]).to(torch.float64)
