"""`dynroute` stopped as a user or a scheduler stops it, and failing as the operating system makes
it fail: real signals to the installed command in a subprocess, real processes and sockets.

SIGTERM (kill, timeout, docker stop, a batch scheduler) and SIGHUP end a command as Ctrl-C does:
the managed MLflow server stops, the MLflow run ends KILLED, `prepare` leaves no temporary folder,
the exit status is 128 + the signal, and one line says how to continue. A SIGKILLed command's
server goes too. A failure of the operating system or of the tracking server is one `error:`
line, the traceback only with --debug.
"""

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dynroute.pipelines.synth import synthesize

DYNROUTE = shutil.which("dynroute", path=str(Path(sys.executable).parent)) or "dynroute"
ENV = os.environ | {"COLUMNS": "400"}  # one error line is one line of output


def write_params(folder: Path, *, tracking: str = "local") -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"layers": 4, "base_channels": 4},
        "train": {"iterations": 400, "batch_size": 2, "crop": [64, 64], "warmup_iterations": 1},
        "run": {"name": "r", "storage": str(folder / "runs"), "checkpoint_every": 2,
                "log_every": 2},
        "tracking": {"uri": tracking, "dir": str(folder / "mlruns")}}))
    return path


def _as_from_a_terminal() -> None:
    """The stop signals' default actions in the command, as a terminal starts it. A test run
    started under `nohup` or as a shell's background job hands SIGHUP / SIGINT down ignored,
    and the command rightly keeps an ignored signal ignored (`test_nohup_keeps_sighup_ignored`)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _under_nohup() -> None:
    _as_from_a_terminal()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def start(*args: str, cwd: Path, preexec=_as_from_a_terminal) -> subprocess.Popen:
    return subprocess.Popen([DYNROUTE, *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)


def _stats() -> list[tuple[int, list[str]]]:
    """(pid, the fields after the command name in /proc/<pid>/stat) of every process."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if entry.name.isdigit():
            found.append((int(entry.name), stat[stat.rindex(")") + 2:].split()))
    return found


def children(pid: int) -> list[int]:
    return [child for child, fields in _stats() if int(fields[1]) == pid]


def group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    return [member for member, fields in _stats()
            if int(fields[2]) == pgid and fields[0] not in "ZX"]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def managed_server(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, int]:
    """(pid, port) of the `mlflow server` the command `proc` started, once it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for pid in children(proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlflow" in argv and b"server" in argv:
                port = int(argv[argv.index(b"--port") + 1])
                if listening(port):
                    return pid, port
        time.sleep(0.2)
    pytest.fail("the command started no MLflow server")


def wait_for_checkpoint(runs: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list(runs.glob("r/checkpoint_*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)


def gone(pgid: int, port: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while (group(pgid) or listening(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not group(pgid) and not listening(port)


def end(proc: subprocess.Popen, server: int | None) -> None:
    """Whatever the test left running: the command, then its server's group (by their ids)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if server is not None and group(server):
        os.killpg(server, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_ends_train_as_ctrl_c_does(prepared, tmp_path, sig):
    params = write_params(tmp_path)
    proc = start("train", "--data", str(prepared), "--params", str(params), cwd=tmp_path)
    server = None
    try:
        server, port = managed_server(proc)
        wait_for_checkpoint(tmp_path / "runs", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err[-3000:]
        assert gone(server, port, within=5), f"server group {group(server)} outlived the command"
        runs = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db").execute(
            "select status from runs").fetchall()
        assert runs == [("KILLED",)]
        lines = [line for line in err.splitlines() if line.startswith("interrupted")]
        assert lines == [f"interrupted by {sig.name} during `dynroute train`: the run folder "
                         f"{tmp_path / 'runs' / 'r'} keeps its checkpoints (one every 2 steps); "
                         f"run the same command again to continue from the last one"]
        assert "Traceback" not in err
    finally:
        end(proc, server)


@pytest.mark.slow
def test_nohup_keeps_sighup_ignored(prepared, tmp_path):
    """`nohup dynroute train` outlives its terminal: SIGHUP stays ignored, SIGTERM still stops."""
    params = write_params(tmp_path)
    proc = start("train", "--data", str(prepared), "--params", str(params), cwd=tmp_path,
                 preexec=_under_nohup)
    server = None
    try:
        server, _ = managed_server(proc)
        wait_for_checkpoint(tmp_path / "runs", proc)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None, "SIGHUP ended a command started under nohup"
        proc.terminate()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
        assert "interrupted by SIGTERM during `dynroute train`" in err
    finally:
        end(proc, server)


@pytest.mark.slow
def test_sigterm_ends_a_ray_training_and_its_ray_cluster(prepared, tmp_path):
    # ray.init makes SIGTERM sys.exit(15) and Ray Train makes SIGINT exit 0: the command's
    # handlers must stay in place.
    params = write_params(tmp_path)
    proc = start("train", "--data", str(prepared), "--params", str(params), "--workers", "1",
                 cwd=tmp_path)
    server = None
    try:
        server, port = managed_server(proc)
        wait_for_checkpoint(tmp_path / "runs", proc, timeout=300)
        ray = [pid for pid in children(proc.pid) if pid != server]
        proc.terminate()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
        assert "interrupted by SIGTERM during `dynroute train`" in err
        assert gone(server, port, within=5)
        assert sqlite3.connect(tmp_path / "mlruns" / "mlflow.db").execute(
            "select status from runs").fetchall() == [("KILLED",)]
        deadline = time.monotonic() + 10
        while [pid for pid in ray if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in ray if alive(pid)], "Ray's processes outlived the command"
    finally:
        end(proc, server)


def test_sigterm_leaves_no_temporary_folder_of_prepare(tmp_path):
    # 480 images, about 4 s of preparing: with 120 (1 s) the command once finished before the
    # SIGTERM sent at its first shard arrived (CI, 2026-12-06)
    synthesize("cityscapes", tmp_path / "raw", train=480, val=4, height=256, width=512, seed=1)
    out = tmp_path / "prepared"
    proc = start("data", "prepare", "--dataset", "cityscapes", "--raw", str(tmp_path / "raw"),
                 "--out", str(out), "--workers", "2", "--rows-per-shard", "8", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".prepared.tmp-*/**/*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        decoders = children(proc.pid)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        end(proc, None)
    assert proc.returncode == 143, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no .prepared.tmp-*, no out
    assert f"interrupted by SIGTERM during `dynroute data prepare`: {out} is unchanged" in err
    assert "Traceback" not in err  # the decoding processes end quietly too
    assert not [pid for pid in decoders if alive(pid)]


def test_a_sigkilled_command_takes_its_mlflow_server_with_it(tmp_path):
    params = write_params(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        ui_port = sock.getsockname()[1]
    proc = start("ui", "--params", str(params), "--port", str(ui_port), cwd=tmp_path)
    server = None
    try:
        server, port = managed_server(proc)
        assert port == ui_port and len(group(server)) >= 2  # the CLI and its uvicorn worker
        proc.kill()
        proc.wait()
        assert gone(server, port, within=15), f"server group {group(server)} outlived SIGKILL"
    finally:
        end(proc, server)


# -- failures of the operating system and of services -----------------------------------------


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DYNROUTE, *args], cwd=cwd, env=ENV | (env or {}), text=True,
                          capture_output=True, timeout=300)


def one_error(res: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command (and nothing of a traceback)."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "╭" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_an_output_folder_that_cannot_be_written_is_named(prepared, tmp_path):
    # Under a regular file: refused to root as well (chmod is not, and tests may run as root).
    (tmp_path / "afile").write_text("a file, not a folder")
    params = write_params(tmp_path, tracking="none")
    line = one_error(run("train", "--data", str(prepared), "--params", str(params),
                         "--storage", str(tmp_path / "afile" / "runs"), cwd=tmp_path))
    assert line == (f"error: {tmp_path / 'afile' / 'runs'}: a part of the path is a file, not a "
                    f"folder: choose another path")
    prepare_under_file = ("data", "prepare", "--dataset", "cityscapes", "--raw",
                          str(prepared.parent / "raw"), "--out", "afile/prepared", "--workers",
                          "1")
    line = one_error(run(*prepare_under_file, cwd=tmp_path))
    assert line == "error: afile: it exists and is not a folder: choose another path"

    for debug in (run("--debug", *prepare_under_file, cwd=tmp_path),
                  run(*prepare_under_file, cwd=tmp_path, env={"DYNROUTE_DEBUG": "1"})):
        assert debug.returncode == 1 and "FileExistsError" in debug.stderr
        assert "Traceback" in debug.stderr or "╭" in debug.stderr


def test_a_read_only_filesystem_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("this process may not mount a read-only tmpfs")
    try:
        synthesize("cityscapes", tmp_path / "raw", train=4, val=2, height=64, width=128, seed=1)
        line = one_error(run("data", "prepare", "--dataset", "cityscapes", "--raw",
                             str(tmp_path / "raw"), "--out", str(ro / "prepared"),
                             "--workers", "1", cwd=tmp_path))
        assert str(ro) in line and "read-only" in line and "remount" in line
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_symlink_loop_as_data_is_named(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    params = write_params(tmp_path, tracking="none")
    line = one_error(run("train", "--data", "loop", "--params", str(params), cwd=tmp_path))
    assert str(tmp_path / "loop") in line and "symbolic link loop" in line


def test_a_path_that_is_not_utf8_is_refused_naming_it(tmp_path):
    synthesize("cityscapes", tmp_path / "raw", train=4, val=2, height=64, width=128, seed=1)
    out = os.fsdecode(b"out-\xff")
    line = one_error(run("data", "prepare", "--dataset", "cityscapes", "--raw", "raw", "--out",
                         out, "--workers", "1", cwd=tmp_path))
    assert line.startswith("error: out-\\xff is not UTF-8: rename it")


def test_an_unreachable_tracking_server_is_one_line_with_its_password_masked(prepared,
                                                                            tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    params = write_params(tmp_path, tracking="none")
    uri = {"MLFLOW_TRACKING_URI": f"http://alice:s3cret-pw@127.0.0.1:{port}"}
    for args in (["train", "--data", str(prepared)], ["select", "--max-gflops", "3"]):
        res = run(*args, "--params", str(params), cwd=tmp_path, env=uri)
        line = one_error(res)
        assert line.startswith(f"error: cannot reach the MLflow tracking server at "
                               f"http://alice:***@127.0.0.1:{port} (connection refused): "), line
        assert "s3cret-pw" not in res.stdout + res.stderr


def test_an_empty_params_file_is_refused_naming_it(prepared, tmp_path):
    (tmp_path / "params.yaml").write_text("# every setting was here\n")
    for args in (["train", "--data", str(prepared)], ["settings"]):
        line = one_error(run(*args, "--params", "params.yaml", cwd=tmp_path))
        assert line.startswith("error: params.yaml is empty"), line
    assert os.listdir(tmp_path) == ["params.yaml"]  # nothing trained, no server started
