"""A local Ray cluster that listens on loopback only, whatever the caller's environment: Ray's
own processes (`loopback_only`) and the torch process group's store that Ray Train builds in its
workers (`torch_config`). ray_train.py uses both when it starts a local cluster or a trainer.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def loopback_only() -> None:
    """Make the local cluster about to start listen on 127.0.0.1 only, whatever the caller's
    environment says.

    Ray decides between loopback and the machine's address from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER,
    read once into `ray_constants.ENABLE_RAY_CLUSTER` when the `ray` package is first imported.
    By the time a local cluster starts here, Ray has usually been imported already (Ray Tune's
    modules import it at the top), so the variable alone would reach only the processes Ray
    starts: the driver would still pick the machine's address, and the GCS and raylet would
    listen on every interface. So both are set: the variable for Ray's processes, the constant
    (a private of Ray 2.60, checked in its source) for this one.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def process_group_on_loopback() -> None:
    """In each Ray Train worker, before its process group is set up: the torch process group's
    store, which rank 0 hosts, listens on its address only when that is a loopback address.

    Ray Train hands torch the master's address (127.0.0.1 on a local cluster), but torch's
    TCPStore binds every interface whatever address it is given. It does accept a socket that
    is already listening (`master_listen_fd`), so rank 0's store gets one bound to the master's
    address. torch builds the store in `rendezvous._create_c10d_store` (torch 2.13, checked in
    its source), which this wraps; other addresses and ranks go through unchanged.
    """
    import importlib
    import ipaddress
    import socket

    # By module name: `torch.distributed.rendezvous` as an attribute is a function of that name.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = rendezvous._create_c10d_store

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        try:
            loopback = ipaddress.ip_address(hostname).is_loopback
        except ValueError:  # a host name
            loopback = False
        if rank != 0 or not loopback or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.create_server((hostname, port), backlog=world_size + 16)
        return dist.TCPStore(host_name=hostname, port=port, world_size=world_size,
                             is_master=True, timeout=timeout, multi_tenant=True,
                             master_listen_fd=listener.detach(), use_libuv=True)

    rendezvous._create_c10d_store = create_store


def torch_config():
    """Ray Train's torch set-up, with `process_group_on_loopback` run on every worker first.

    Not a worker start-up hook of the whole cluster: that imported torch in every Ray worker
    before Ray set the task's OMP_NUM_THREADS, so each search trial ran torch on all the cores
    and two trials on two cores ran ~5× slower. Ray Train's workers have torch loaded already.
    `_TorchBackend` is a private of Ray 2.60's Train (checked in its source).
    """
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(process_group_on_loopback)
            super().on_start(worker_group, backend_config)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackBackend

    return LoopbackTorchConfig()
