"""The fast paths users get by default, and the switch that turns them off.

Each was chosen by measurement (`benchmarks/gpu_bench.py`; the figures, by device, are in
benchmarks/README.md, "GPU speed"):

- channels-last for training and inference, on CUDA and on the CPU alike (faster on both; the
  same fp32 arithmetic in another memory layout);
- inference folds every BN into the conv before it (`models/fusion.py`): the same function up to
  fp32 rounding, one kernel and one pass over the activations fewer per BN;
- training on one CUDA device replays the whole step as a CUDA graph (train/train_step.py,
  device/cuda_graph.py): the eager step leaves the GPU waiting for the host's launches.

bf16 autocast measured no faster than channels-last fp32, so it stays opt-in (`run.bf16`). Tests
on the CPU prove the fast and plain paths compute the same thing.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from dynroute.models.fusion import fold_batchnorm


@dataclass(frozen=True)
class FastPath:
    """How a network and its inputs are laid out and cast on one device."""

    channels_last: bool = False
    bf16: bool = False  # autocast; weights and optimizer stay fp32
    fold_batchnorm: bool = False  # inference only: BN folded into the conv before it
    cuda_graph: bool = False  # training only: the step replayed as a CUDA graph (train_step.py)

    def network(self, network: nn.Module) -> nn.Module:
        """The network in this layout (in place, like `Module.to`)."""
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        return network

    def inference_network(self, network: nn.Module) -> nn.Module:
        """The network to run inference with. `network` itself is never changed: it is returned
        as it is when nothing applies, else a converted copy (in eval mode) is."""
        if self.fold_batchnorm:
            return self.network(fold_batchnorm(network))
        if self.channels_last:
            return self.network(copy.deepcopy(network).eval())
        return network

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) batch in this layout."""
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def autocast(self, device: torch.device, *, cache: bool = True) -> torch.autocast:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.bf16,
                              cache_enabled=cache)


def for_training(device: torch.device, *, fast: bool = True, channels_last: bool = False,
                 bf16: bool = False) -> FastPath:
    """Training: channels-last, and on CUDA the step replayed as a CUDA graph, unless `fast` is
    off; explicit settings always apply."""
    return FastPath(channels_last=channels_last or fast, bf16=bf16,
                    cuda_graph=fast and device.type == "cuda")


def for_inference(device: torch.device, *, fast: bool = True) -> FastPath:
    """Inference: channels-last and folded BN unless `fast` is off."""
    del device  # channels-last measured faster on CUDA and on CPU alike
    return FastPath(channels_last=fast, fold_batchnorm=fast)


def inference_device(name: str = "auto", *, key: str = "device") -> torch.device:
    """Where inference runs: "auto" is the first GPU when torch sees one, else the CPU; "cpu",
    "cuda" and "cuda:N" are taken as they are. `key` names the setting in errors.

    In a Ray task or actor, "auto" finds only the GPUs Ray gave it (Ray sets CUDA_VISIBLE_DEVICES),
    so a Tune rung that trained on its own GPU evaluates there too."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key} = {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= visible:
            raise ValueError(f"{key} = {name!r}: this machine's PyTorch sees {visible} CUDA "
                             f"device(s); use auto or cpu")
    return device


# One core decodes and augments far fewer Cityscapes crops a second than one GPU trains, so a GPU
# needs loader processes beside its own (benchmarks/README.md, "Data loading").
MAX_LOADER_WORKERS = 8


def loader_workers(device: torch.device, *, cores: int | None = None,
                   gpus: int | None = None) -> int:
    """DataLoader processes to use when `run.loader_workers` is not set.

    On CUDA, this machine's cores per GPU, less one for the training process, between 1 and
    `MAX_LOADER_WORKERS`; on a CPU none (the cores train there, and measured no faster with
    loader processes competing for them).
    """
    if device.type != "cuda":
        return 0
    cores = cores if cores is not None else _usable_cores()
    gpus = gpus if gpus is not None else machine_gpus()
    return max(1, min(MAX_LOADER_WORKERS, cores // max(1, gpus) - 1))


def _usable_cores() -> int:
    """The cores this process may run on (a container's or `taskset`'s share where the OS says)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_gpus() -> int:
    """The GPUs of this machine that share its cores.

    A Ray Train worker or task sees only the GPUs Ray gave it (CUDA_VISIBLE_DEVICES): torch
    counts one there, while its node's other GPUs feed their own workers from the same cores.
    Under Ray this is the node's GPU count as Ray knows it; elsewhere torch's count.
    """
    if "ray" in sys.modules:  # imported by whoever started or joined a cluster
        import ray

        if ray.is_initialized():
            here = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():
                if node["NodeID"] == here:
                    return int(node["Resources"].get("GPU", 0))
    return torch.cuda.device_count()
