"""`ray job submit -- dynroute train …` against a running Ray cluster (one node, on 127.0.0.1),
with Ray's token authentication on, as Ray >= 2.59 sets it up for new clusters."""

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A Ray head started with `ray start`, stopped afterwards."""
    token = tmp_path / "ray_auth_token"  # this cluster's own token, handed to its clients
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    started = subprocess.run(
        [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True,
                       timeout=120)


def test_training_runs_as_a_ray_job(cluster, tmp_path, prepared):
    address, env = cluster
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 8},
        "train": {"iterations": 10, "batch_size": 4, "crop": [64, 64], "warmup_iterations": 2},
        "run": {"workers": 2, "checkpoint_every": 5, "log_every": 5,
                "storage": str(tmp_path / "runs"), "name": "job"},
        "tracking": {"uri": "none"},
    }))
    # The job runs the project's own Python (the entrypoint names it), not Ray's default.
    # `ray start` returns before the head's job agent registers, and the head waits only 10 s
    # for it: on a loaded machine a prompt submission is refused with "No available agent to
    # submit job, please try again later", which is what a user then does.
    for _ in range(3):
        submitted = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", address, "--",
             str(BIN / "dynroute"), "train", "--data", str(prepared), "--params", str(params)],
            env=env, capture_output=True, text=True, timeout=400)
        output = submitted.stdout + submitted.stderr
        if "No available agent to submit job" not in output:
            break
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output
    assert "trained: 10 steps" in output
    assert (tmp_path / "runs" / "job" / "checkpoint_00000010" / "state.pt").is_file()


def test_a_client_without_the_token_is_refused(cluster, tmp_path):
    address, env = cluster
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    anonymous = env | {"RAY_AUTH_TOKEN_PATH": str(wrong)}
    res = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=anonymous,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "401" in res.stdout + res.stderr or "auth" in (res.stdout + res.stderr).lower()
