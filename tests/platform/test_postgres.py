"""The cluster stores on PostgreSQL: MLflow's backend store and Optuna's RDB storage, against a real
PostgreSQL server started for this module on 127.0.0.1 in a temporary folder.

Needs the server binaries (`initdb`, `pg_ctl`; Debian: `apt-get install -y postgresql`, which puts
them in /usr/lib/postgresql/<major>/bin); skipped with that advice when they are missing.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user (or
`nobody`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

INSTALL = ("apt-get install -y postgresql (Debian/Ubuntu; binaries land in "
           "/usr/lib/postgresql/<major>/bin)")


def _bin_dir() -> Path | None:
    """The folder with PostgreSQL's initdb and pg_ctl (newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[3]) if Path(p).parts[3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def _run_as() -> str | None:
    """The user to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root and neither a `postgres` nor a `nobody` user exists; "
                "PostgreSQL refuses to run as root")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str = "dynroute"

    def url(self, database: str) -> str:
        """SQLAlchemy URL (SQLAlchemy 2.1 needs the driver named: psycopg2)."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def query(self, database: str, sql: str, *args: object) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL server binaries (initdb, pg_ctl) found; install: {INSTALL}")
    user = _run_as()
    # Not under pytest's tmp folders: those are private to root, and the server user must
    # reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="dynroute-pg-"))
    data, log = root / "data", root / "server.log"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    prefix = ["runuser", "-u", user, "--"] if user is not None else []

    def pg(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=root, check=False)

    port = _free_port()
    done = pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "dynroute", "--auth=trust",
              "-E", "UTF8", "--locale=C")
    assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
    # TCP on 127.0.0.1 only; the unix socket in our own folder, not /var/run/postgresql.
    options = f"-h 127.0.0.1 -p {port} -k {root}"
    done = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
              "-t", "60", "start")
    try:
        assert done.returncode == 0, (f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n"
                                      f"{log.read_text() if log.exists() else ''}")
        yield Postgres(port=port)
    finally:
        # Stops the postmaster this fixture started (pg_ctl finds it in data/postmaster.pid);
        # immediate: no shutdown checkpoint, the data is thrown away.
        stop = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        if stop.returncode != 0 and done.returncode == 0:
            print(f"pg_ctl stop failed: {stop.stderr}")
        shutil.rmtree(root, ignore_errors=True)


def test_mlflow_records_a_run_in_postgresql(postgres: Postgres, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from dynroute.platform.tracking.server import MlflowServer
    from dynroute.platform.tracking.tracker import Tracker

    postgres.create_database("mlflow")
    with MlflowServer(root=tmp_path, backend_store_uri=postgres.url("mlflow")) as server:
        print(f"mlflow server on PostgreSQL healthy after {server.start_seconds:.1f} s")
        tracker = Tracker(uri=server.uri, experiment="on-postgres")
        with tracker.run(run_name="pg") as run_id:
            tracker.log_params({"train": {"lr": 0.05}})
            tracker.log_metrics({"miou": 0.25}, step=3)
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"train.lr": "0.05"} and run.data.metrics == {"miou": 0.25}
    # It is in PostgreSQL's tables, not in a sqlite file beside the server.
    rows = postgres.query("mlflow", "SELECT name, status FROM runs WHERE run_uuid = %s", run_id)
    assert rows == [("pg", "FINISHED")]
    assert postgres.query("mlflow", "SELECT key, value, step FROM metrics WHERE run_uuid = %s",
                          run_id) == [("miou", 0.25, 3)]
    assert not (tmp_path / "mlflow.db").exists()


def test_an_optuna_study_persists_in_postgresql(postgres: Postgres) -> None:
    import optuna

    postgres.create_database("optuna")
    url = postgres.url("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("lambda2", 0.05, 1.5, log=True)
        return 1 - x / 2, x  # (mIoU-like, GFLOPs-like): a trade-off

    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="budget", storage=storage,
                                directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=4)
    first = [(t.number, t.params, t.values) for t in study.trials]
    storage.engine.dispose()

    # A new process (here: a new storage object) finds the study and goes on with it.
    again = optuna.load_study(study_name="budget", storage=optuna.storages.RDBStorage(url))
    assert [(t.number, t.params, t.values) for t in again.trials] == first
    assert again.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]
    again.optimize(objective, n_trials=2)
    assert len(again.trials) == 6 and [t.number for t in again.trials] == list(range(6))
    assert postgres.query("optuna", "SELECT study_name FROM studies") == [("budget",)]
    assert postgres.query("optuna", "SELECT count(*) FROM trials") == [(6,)]
