"""A local run listens on loopback only, started as a user starts it: from an environment without
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (or anything else that would keep Ray on 127.0.0.1).

While `dynroute train --workers 1` runs (a local Ray: GCS, raylet, agents, a Ray Train worker
with its torch process group), every listening TCP socket of every process in the command's
session is collected from /proc; each must be bound to a loopback address.
"""

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
RAY_VARIABLES = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_NODE_IP_ADDRESS")


def _session_pids(sid: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    """socket inode → the process that holds it."""
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:  # the process ended meanwhile
            pass
    return inodes


def process_names(sid: int) -> dict[int, str]:
    """pid → the name (title) each process of session `sid` has now."""
    names = {}
    for pid in _session_pids(sid):
        with contextlib.suppress(OSError):
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    return names


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def listening_addresses(sid: int) -> set[tuple[str, int]]:
    """(local address, pid) of the TCP sockets that processes of session `sid` listen on."""
    inodes = _socket_inodes(_session_pids(sid))
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add((_address(fields[1].split(":")[0]), inodes[fields[9]]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


TRAIN_WORKER = "ray::RayTrainWorker"


@pytest.fixture(scope="module")
def listening(prepared, tmp_path_factory) -> tuple[set[tuple[str, int]], set[int]]:
    """Every (address, pid) a `dynroute train --workers 1` listened on while it ran, and the
    pids of its Ray Train workers (a Ray worker process takes that title once it becomes one)."""
    tmp_path = tmp_path_factory.mktemp("loopback")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 40, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"workers": 1, "checkpoint_every": 20, "log_every": 5, "name": "net",
                "storage": str(tmp_path / "runs")},
        "tracking": {"uri": "none"}}))
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARIABLES}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen([str(BIN / "dynroute"), "train", "--data", str(prepared),
                             "--params", str(params)], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, int]] = set()
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listening_addresses(proc.pid)
            workers |= {pid for pid, name in process_names(proc.pid).items()
                        if name.startswith(TRAIN_WORKER)}
            time.sleep(0.2)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "train: step 40/40" in output
    assert workers, "never saw the Ray Train worker"
    return seen, workers


@pytest.mark.slow
def test_ray_listens_on_loopback_only(listening):
    """The GCS, the raylet, Ray's agents and the driver: loopback whatever the environment."""
    seen, workers = listening
    ray_sockets = {(a, pid) for a, pid in seen if pid not in workers}
    assert len(ray_sockets) >= 3, f"the probe saw too little to judge: {sorted(seen)}"
    beyond = sorted((a, pid) for a, pid in ray_sockets if not is_loopback(a))
    assert not beyond, f"listening beyond loopback (address, pid): {beyond}"


@pytest.mark.slow
def test_the_training_workers_listen_on_loopback_only(listening):
    """The torch process group's store, which Ray Train builds in rank 0's worker."""
    seen, workers = listening
    sockets = {a for a, pid in seen if pid in workers}
    assert sockets, "the probe saw no training worker socket"
    assert all(is_loopback(a) for a in sockets), f"beyond loopback: {sorted(sockets)}"
