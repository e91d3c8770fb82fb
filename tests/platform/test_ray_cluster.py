"""A Ray cluster of two nodes on one machine: `ray job submit -- dynroute train
--workers 2` places one Ray Train worker on each node; the worker node dies mid-training, a
replacement node joins, and the run resumes from its last checkpoint and completes.

What Ray needs to run like this here (docs/platform.md, "Networking on these machines"):
- Every process runs inside a network namespace of the test's own with only `lo` up
  (`ip netns exec NAME …`, as root). There Ray finds no route out, settles on 127.0.0.1 (also
  given as `--node-ip-address`), and no traffic can leave loopback;
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is not needed and is left unset. Ray logs that it "failed to
  determine local IP via external connectivity": expected, harmless.
- The namespace is empty, so fixed ports cannot clash with anyone else's. Several raylets on one
  host need ports of their own: node manager, object manager, dashboard agent (HTTP and gRPC),
  runtime-env agent, metrics export, and disjoint worker port ranges.
- Each node gets a `--temp-dir` of its own (Ray 2.60 allows it per node), as separate machines
  would have. Sharing the head's folder works too, but then every node's log monitor forwards
  every node's worker output, and a joining node replays all of it into the job's output. The
  folders are short paths under /tmp because Ray's Unix sockets live there (<= 107 characters).
- RAY_DEDUP_LOGS=0: Ray's log deduplication would fold lines of different workers that differ
  only in numbers ("[rank 0] …", "[rank 1] …", a step printed by two attempts) into one.
- Each node is `ray start --block` in a session of its own: its process group holds that node's
  processes (gcs, raylet, agents, workers; Ray also fate-shares them with the `ray start`), so
  SIGKILL to the group is a node failure that leaves the other nodes alone. `ray stop` is never
  used: it finds processes by name on the whole machine (a network namespace does not isolate
  pids) and would stop other people's clusters too. Likewise, leftovers are found through the
  namespace (`ip netns pids`) and stopped by pid.
- Token auth stays on: RAY_AUTH_MODE=token and this cluster's own token file, handed to every
  client (`ray start`, `ray job`, `ray list`) through RAY_AUTH_TOKEN_PATH.
- The object store is capped at 100 MB per node (plasma lives in the machine's shared /dev/shm);
  `--disable-usage-stats` keeps Ray from trying to reach the internet.
- Both nodes see the same disk, so a local storage path is shared storage here; a real
  multi-node cluster needs S3 (docs/platform.md, pitfall 2).

Evidence that the workers ran on both nodes, printed with `-s`: before the kill, the processes
of the two `ray::RayTrainWorker`s descend one from each node's `ray start`; afterwards Ray's
state API (`ray list actors`, `ray list nodes`) records the first attempt's workers on the head
and on the dead node, and the second attempt's on the head and on the replacement.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
IP = shutil.which("ip") or "/usr/sbin/ip"
STEP = re.compile(r"train: step (\d+)/(\d+)")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")
WORKER_LINE = re.compile(r"^\(RayTrainWorker pid=(\d+)[^)]*\) (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # the namespace is ours alone: fixed ports cannot clash
ITERATIONS, EVERY, KILL_AFTER = 30, 5, 10  # kill the worker node once checkpoint 10 is written
TRAIN_WORKER = "ray::RayTrainWorker"


# -- a network namespace with only loopback ---------------------------------------------------
@dataclass(frozen=True)
class Namespace:
    name: str

    def command(self, *args: object) -> list[str]:
        """`args` as a command line that runs inside the namespace."""
        return [IP, "netns", "exec", self.name, *map(str, args)]

    def pids(self) -> list[int]:
        """Every process in the namespace (iproute2 compares each /proc/PID/ns/net)."""
        out = subprocess.run([IP, "netns", "pids", self.name], capture_output=True, text=True,
                             check=True).stdout
        return sorted(int(pid) for pid in out.split())

    def stop_all(self) -> list[int]:
        """Stop every process left in the namespace, by pid; returns those found."""
        found = self.pids()
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            for pid in self.pids():
                _signal(pid, sig)
            if _wait_until(lambda: not self.pids(), wait_s):
                break
        return found


@contextmanager
def network_namespace() -> Iterator[Namespace]:
    """A fresh namespace (unique name) with `lo` up; emptied and deleted on exit, also on
    failure."""
    ns = Namespace(f"dynroute-{os.getpid()}-{secrets.token_hex(3)}")
    subprocess.run([IP, "netns", "add", ns.name], check=True, capture_output=True)
    try:
        subprocess.run(ns.command(IP, "link", "set", "lo", "up"), check=True,
                       capture_output=True)
        yield ns
    finally:
        try:
            ns.stop_all()
        finally:
            subprocess.run([IP, "netns", "delete", ns.name], capture_output=True)


def _signal(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_until(condition, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


# -- a Ray cluster inside it --------------------------------------------------------------------
@dataclass
class RayNode:
    """One node: a `ray start --block` leading its own process group."""

    label: str
    proc: subprocess.Popen
    log: Path
    node_id: str = ""

    def pids(self) -> set[int]:
        """This node's processes: its process group and everything descended from it."""
        found = set()
        if self.proc.poll() is None:  # not reaped yet, so the pid (and its children) are ours
            found.add(self.proc.pid)
            with suppress(psutil.NoSuchProcess):
                found |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        for p in psutil.process_iter():
            with suppress(ProcessLookupError, PermissionError):
                if os.getpgid(p.pid) == self.proc.pid:  # a group lives only while it has members
                    found.add(p.pid)
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole node (process group and descendants), by pid."""
        members = self.pids()
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # all at once: no process is left to react
        for pid in members:
            _signal(pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        self.kill(signal.SIGKILL)  # whatever ignored SIGTERM
        self.proc.wait(timeout=30)


class RayCluster:
    """A head and worker nodes, each with 1 CPU, all on 127.0.0.1 inside `ns`."""

    def __init__(self, ns: Namespace, logs: Path):
        self.ns, self.logs = ns, logs
        # short: Ray's Unix sockets live under it
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dr-ray-", dir="/tmp"))
        token = self.temp_dir / "auth_token"  # this cluster's own token, handed to its clients
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                 "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                                 "RAY_DEDUP_LOGS": "0"}
        for key in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            self.env.pop(key, None)
        self.dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
        self.nodes: list[RayNode] = []

    def start_head(self) -> RayNode:
        return self._start("head", "--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                           "--ray-client-server-port=10001", *self._ports(0))

    def add_node(self) -> RayNode:
        return self._start(f"node{len(self.nodes)}", f"--address=127.0.0.1:{GCS_PORT}",
                           *self._ports(len(self.nodes)))

    def _ports(self, i: int) -> list[str]:
        base = 7000 + 10 * i
        return [f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
                f"--dashboard-agent-listen-port={base + 2}",
                f"--dashboard-agent-grpc-port={base + 3}",
                f"--runtime-env-agent-port={base + 4}", f"--metrics-export-port={base + 5}",
                f"--min-worker-port={11000 + 1000 * i}", f"--max-worker-port={11999 + 1000 * i}"]

    def _start(self, label: str, *args: str) -> RayNode:
        log = self.logs / f"ray-start-{label}.log"
        known = {n["node_id"] for n in self.list("nodes")} if self.nodes else set()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                self.ns.command(BIN / "ray", "start", "--block", "--node-ip-address=127.0.0.1",
                                "--num-cpus=1", "--object-store-memory=100000000",
                                f"--temp-dir={self.temp_dir / label}", "--disable-usage-stats",
                                *args),
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(label, proc, log)
        self.nodes.append(node)

        def joined() -> bool:
            assert proc.poll() is None, f"ray start ({label}) exited:\n{log.read_text()[-3000:]}"
            if "Ray runtime started" not in log.read_text():
                return False
            try:
                listed = self.list("nodes")
            except AssertionError:  # the head's dashboard still starting
                return False
            return len({n["node_id"] for n in listed if n["state"] == "ALIVE"} - known) == 1

        assert _wait_until(joined, 180, 1.0), f"{label} did not join:\n{log.read_text()[-3000:]}"
        new = {n["node_id"] for n in self.list("nodes") if n["state"] == "ALIVE"} - known
        node.node_id = new.pop()
        return node

    def ray(self, *args: object, timeout: int = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI inside the namespace, with this cluster's token."""
        return subprocess.run(self.ns.command(BIN / "ray", *args), env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def list(self, kind: str, *filters: str) -> list[dict]:
        """Ray's state API (`ray list KIND --format json`), dead entries included."""
        args = [a for f in filters for a in ("--filter", f)]
        res = self.ray("list", kind, "--format", "json", "--limit", "1000", "--detail",
                       "--address", f"127.0.0.1:{GCS_PORT}", *args)
        if res.returncode != 0:
            _fail(res)
        return json.loads(res.stdout)

    def submit(self, *entrypoint: object) -> subprocess.Popen:
        """`ray job submit`, following the job's output until it ends."""
        return subprocess.Popen(
            self.ns.command(BIN / "ray", "job", "submit", "--address", self.dashboard, "--",
                            *entrypoint),
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _fail(res: subprocess.CompletedProcess) -> None:
    raise AssertionError(f"{res.args}: {res.returncode}\n{(res.stdout + res.stderr)[-3000:]}")


@pytest.fixture
def cluster(tmp_path) -> Iterator[RayCluster]:
    if os.geteuid() != 0 or not os.access(IP, os.X_OK):
        pytest.skip("needs root and iproute2's `ip` for a network namespace (CI runs as root)")
    with network_namespace() as ns:
        cluster = RayCluster(ns, tmp_path)
        try:
            yield cluster
        finally:
            cluster.stop()


# -- the test -----------------------------------------------------------------------------------
def _lines_by_worker(output: str) -> dict[int, list[str]]:
    """What each Train worker process printed into the job output, in order, each line once.

    Ray 2.60 hands a Train worker's `print` to the job output twice (logging records once), and
    the copies may interleave; the pid prefix keeps attempts apart.
    """
    seen: set[str] = set()
    found: dict[int, list[str]] = {}
    for line in ANSI.sub("", output).splitlines():
        match = WORKER_LINE.match(line)
        if match and line not in seen:
            seen.add(line)
            found.setdefault(int(match.group(1)), []).append(match.group(2))
    return found


def _train_worker_pids(cluster: RayCluster) -> list[int]:
    found = []
    for pid in cluster.ns.pids():
        try:
            if TRAIN_WORKER in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_worker_node_dies_and_the_job_resumes_on_a_replacement(cluster, prepared, tmp_path):
    ns = cluster.ns
    addresses = subprocess.run(ns.command(IP, "-o", "addr"), capture_output=True, text=True,
                               check=True).stdout
    assert re.findall(r"inet6? (\S+)", addresses) == ["127.0.0.1/8", "::1/128"], addresses

    started = time.monotonic()
    head = cluster.start_head()
    node_b = cluster.add_node()
    print(f"\ncluster up in {time.monotonic() - started:.0f}s: head {head.node_id}, "
          f"worker node {node_b.node_id}")

    storage = tmp_path / "runs"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},  # the fewest rows that reach every scale
        "train": {"iterations": ITERATIONS, "batch_size": 2, "crop": [64, 64],
                  "warmup_iterations": 2},
        "run": {"workers": 2, "checkpoint_every": EVERY, "log_every": 1, "max_failures": 3,
                "storage": str(storage), "name": "cluster"},
        "tracking": {"uri": "none"},
    }))
    job = cluster.submit(BIN / "dynroute", "train", "--data", prepared, "--params", params)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    try:
        checkpoint = storage / "cluster" / f"checkpoint_{KILL_AFTER:08d}"
        deadline = time.monotonic() + 400
        while not checkpoint.exists():
            assert job.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared\n" + "".join(lines)[-4000:]
            time.sleep(0.05)
        # Evidence 1 (processes): one Ray Train worker under each node's `ray start`.
        placed = {pid: [n.label for n in cluster.nodes if pid in n.pids()]
                  for pid in _train_worker_pids(cluster)}
        node_b.kill()  # the worker node dies: raylet, agents and its Train worker
        lines.append(f"#### killed node {node_b.node_id} (pids of {node_b.label})\n")
        print(f"train workers by node before the kill: {placed}")
        assert sorted(placed.values()) == [["head"], [node_b.label]], placed
        victim = next(pid for pid, where in placed.items() if where == [node_b.label])
        assert _wait_until(lambda: not psutil.pid_exists(victim), 10), "victim still alive"
        assert job.poll() is None, "the job must survive the loss of a worker node"

        node_c = cluster.add_node()  # room for the second worker again
        print(f"replacement node {node_c.node_id} joined "
              f"{time.monotonic() - started:.0f}s into the test")
        job.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = "".join(lines)
    (tmp_path / "job-output.log").write_text(output)  # kept by pytest for a look afterwards
    assert job.returncode == 0, output[-6000:]
    assert "succeeded" in output, output[-3000:]
    assert f"trained: {ITERATIONS} steps" in output, output[-3000:]

    # The run resumed from a checkpoint (not from zero), went back at most one checkpoint
    # interval and finished. Rank 0 prints the progress; each attempt has its own processes.
    # (Reaching step KILL_AFTER at all took both workers: every step all-reduces gradients.)
    workers = _lines_by_worker(output)
    progress = {pid: [int(m.group(1)) for line in got if (m := STEP.search(line))]
                for pid, got in workers.items()}
    attempts = [steps for steps in progress.values() if steps]  # in order of appearance
    resumed = [int(m.group(1)) for got in workers.values() for line in got
               if (m := RESUMED.search(line))]
    print(f"rank 0 steps by attempt: {[(a[0], a[-1]) for a in attempts]}, resumed {resumed}")
    assert len(attempts) >= 2, f"the kill must force a restart: {attempts}"
    assert attempts[0][0] == 1 and attempts[-1][-1] == ITERATIONS, attempts
    starts = [after[0] - 1 for after in attempts[1:]]  # where each restart's counter starts
    assert sorted(set(resumed)) == sorted(starts), f"resumed {resumed}, restarted at {starts}"
    for before, after in itertools.pairwise(attempts):
        at = after[0] - 1
        assert at >= KILL_AFTER and at % EVERY == 0, (at, resumed)
        assert max(before) - at <= EVERY, f"went back more than one interval: {before} {at}"
        assert after == list(range(at + 1, after[-1] + 1)), f"not step by step: {after}"

    # Evidence 2 (Ray's records): which node ran which Train worker, and the node states.
    nodes = {n["node_id"]: n["state"] for n in cluster.list("nodes")}
    assert nodes == {head.node_id: "ALIVE", node_b.node_id: "DEAD",
                     node_c.node_id: "ALIVE"}, nodes
    actors = cluster.list("actors", "class_name=RayTrainWorker")
    by_node = Counter(a["node_id"] for a in actors)
    print("RayTrainWorker actors by node: " + ", ".join(
        f"{label} {by_node[n.node_id]}" for label, n in
        (("head", head), ("dead", node_b), ("replacement", node_c))))
    assert set(by_node) == {head.node_id, node_b.node_id, node_c.node_id}, by_node
    assert by_node[node_b.node_id] == 1 and by_node[head.node_id] >= 2, by_node
    assert (storage / "cluster" / f"checkpoint_{ITERATIONS:08d}" / "state.pt").is_file()

    # Everything stops by pid and nothing is left behind, in the namespace or elsewhere.
    cluster.stop()
    assert _wait_until(lambda: not ns.pids(), 15), f"left in the namespace: {ns.pids()}"
    leaked = [p.pid for p in psutil.process_iter(["cmdline"])
              if str(cluster.temp_dir) in " ".join(p.info["cmdline"] or [])]
    assert not leaked, f"processes of this cluster still running: {leaked}"
    print(f"test body took {time.monotonic() - started:.0f}s")
