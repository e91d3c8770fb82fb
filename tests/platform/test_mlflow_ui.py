"""The MLflow UI in a real browser: a study's trial runs and the registered Pareto front.

A real `mlflow server` on 127.0.0.1 holds one experiment with a study parent run and four child
trial runs (params `lambda2`, `mu`; metrics `miou`, `gflops_mean`; a tiny routing network logged
as `model`). The registry module registers two successive fronts of that study, which leaves three
versions of one registered model: two on the front and one that left it (tagged pareto=false),
with the aliases `best-miou`, `min-gflops` and `knee`. Headless Chromium (Debian's package, driven
by Playwright) then opens the SPA's own hash routes and the test waits for the rendered text:

* `#/experiments/<id>/runs?workflowType=machine_learning` (what `dynroute ui` prints: the
  Model training view, not the GenAI overview MLflow 3.17.2 opens by default): the study run, and
  its trial runs once the study row is expanded;
* `#/models/<name>`: versions 1-3 and the three aliases.

Routes read from MLflow 3.17.2's bundle (`mlflow/server/js/build/static/js/main.*.js`, a
`createHashRouter` with `/experiments/:experimentId/runs` and `/models/:modelName`).

The browser stays on loopback: every request of the page to a host other than 127.0.0.1 is
aborted (and reported), host names do not resolve, and Chromium's own background services are
switched off. Its processes are followed from launch to exit, so a leaked one fails the test.
Screenshots go to the test's tmp_path and, with DYNROUTE_KEEP_SCREENSHOTS set, to
`artifacts/ui-screenshots/` in the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import torch
from mlflow import MlflowClient

from dynroute.models import NetworkConfig, build_network
from dynroute.platform import metrics
from dynroute.platform.pareto.analysis import Point, write_front
from dynroute.platform.registry.front import ALIAS_BEST_MIOU, ALIAS_KNEE, ALIAS_MIN_GFLOPS
from dynroute.platform.registry.register import register_front
from dynroute.platform.tracking.server import MlflowServer
from dynroute.platform.tracking.tracker import Tracker, experiment_page

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the test fails with the install command (require_playwright)
    expect = sync_playwright = None

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
KEEP_SCREENSHOTS_ENV = "DYNROUTE_KEEP_SCREENSHOTS"
SCREENSHOT_DIR = REPO_ROOT / "artifacts" / "ui-screenshots"

# Debian's launcher /usr/bin/chromium sources /etc/chromium.d, which adds flags such as
# --enable-remote-extensions and Google API keys; the binary behind it takes only ours.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
INSTALL_HINT = "apt-get update && apt-get install -y chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",  # we run as root (CI too); the sandbox refuses root
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--no-pings",
    "--no-proxy-server",  # a proxy from the environment would take loopback traffic elsewhere
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves
)
LOOPBACK = "127.0.0.1"
UI_TIMEOUT_MS = 90_000  # the first load parses MLflow's ~20 MB bundle on a 2-core machine

EXPERIMENT = "ui-study"
STUDY_RUN = "study-ui"
MODEL_TEMPLATE = "dynroute-ui-{dataset}"
DATASET = "cityscapes"
RESOLUTION = [256, 512]
# Trial → (mIoU, mean GFLOPs). The search is registered twice: after FIRST_ROUND its front is
# {t0, t1}; then t2 dominates t1 (more accurate and cheaper), so the front becomes {t0, t2} and t1
# is tagged pareto=false. t3 is dominated throughout and never registered.
TRIALS = {"t0": (0.50, 2.0), "t1": (0.58, 6.0), "t2": (0.62, 5.0), "t3": (0.52, 7.0)}
FIRST_ROUND = ("t0", "t1", "t3")
SECOND_ROUND = ("t0", "t1", "t2", "t3")


def trial_run_name(trial: str) -> str:
    return f"trial-{trial}"


def search_coordinates(trial: str) -> tuple[float, float]:
    """(λ2, μ) of a trial."""
    number = int(trial[1:])
    return round(0.1 * (number + 1), 3), round(0.05 * number, 3)


# ---------------------------------------------------------------------------------------------
# The browser: Chromium from Debian, Playwright for Python


def chromium_executable() -> str:
    """The Chromium binary, or a test failure that says how to install it."""
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium")
    if found:
        return found
    pytest.fail(f"Chromium is not installed (looked for {', '.join(CHROMIUM_CANDIDATES)} and "
                f"`chromium` on PATH). Install Debian's package: `{INSTALL_HINT}`. Never run "
                "`playwright install`: its browser download is not reachable from here.",
                pytrace=False)


def require_playwright() -> None:
    if sync_playwright is None:
        pytest.fail("Playwright for Python is missing; install the dev extra: "
                    "`.venv/bin/pip install -e '.[dev]'` (it pins playwright)", pytrace=False)


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot: tells a process from a later one with the same pid


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of a process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19]), fields[0]


def chromium_processes() -> set[Proc]:
    """This process's live descendants that run Chromium (browser, zygotes, renderers, GPU and
    utility processes, crashpad), whichever launcher started them."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = found[0]
    mine = {os.getpid()}
    grew = True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in mine and pid not in mine}
        mine |= new
        grew = bool(new)
    procs = set()
    for pid in mine - {os.getpid()}:
        try:
            exe = Path(os.readlink(f"/proc/{pid}/exe")).name
        except OSError:
            continue
        found = _stat(pid)
        if exe.startswith(("chrom", "headless_shell")) and found and found[2] not in "ZX":
            procs.add(Proc(pid, found[1]))
    return procs


def alive(proc: Proc) -> bool:
    found = _stat(proc.pid)
    return found is not None and found[1] == proc.start and found[2] not in "ZX"


class Screenshots:
    """Keeps each page's screenshot in tmp_path and, on request, in the repository."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.keep = bool(os.environ.get(KEEP_SCREENSHOTS_ENV))
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, page, name: str) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if self.keep:
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, SCREENSHOT_DIR / path.name)
        return path


# ---------------------------------------------------------------------------------------------
# The data: a study with trial runs, tiny logged models and the registered front


@dataclass(frozen=True)
class Study:
    uri: str
    experiment_id: str
    run_ids: dict[str, str]  # trial → run id
    model: str
    versions: dict[str, str]  # trial → registered version
    pareto: dict[str, bool]  # version → on the front (its pareto tag)
    aliases: dict[str, str]  # alias → version


def trial_point(trial: str, run_id: str) -> Point:
    """A point carrying the trial record the pareto stage writes (what register_front needs)."""
    miou, gflops = TRIALS[trial]
    lambda2, mu = search_coordinates(trial)
    meta = {"study": EXPERIMENT, "params": {"train.lambda2": lambda2, "train.mu": mu},
            "lambda2": lambda2, "mu": mu, "gflops_max": gflops * 1.25,
            "gflops_min": gflops * 0.75, "cost_resolution": RESOLUTION,
            "model_uri": f"runs:/{run_id}/model", "mlflow_run_id": run_id,
            "data_hash": "d" * 64, "git_commit": "c" * 40, "dataset": DATASET}
    return Point(trial, miou, gflops, meta)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    # No usage telemetry from the server or from this process: nothing leaves loopback.
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    saved = {key: os.environ.get(key) for key in quiet}
    os.environ.update(quiet)
    try:
        with MlflowServer(root=tmp_path_factory.mktemp("mlflow"), env=quiet) as running:
            yield running
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def study(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Study:
    tracker = Tracker(uri=server.uri, experiment=EXPERIMENT)
    run_ids = {}
    with tracker.run(run_name=STUDY_RUN) as parent:
        tracker.log_params({"study": EXPERIMENT, "trials": len(TRIALS)})
        for number, (trial, (miou, gflops)) in enumerate(TRIALS.items()):
            lambda2, mu = search_coordinates(trial)
            with tracker.run(run_name=trial_run_name(trial), nested_in_this_process=True) as run:
                tracker.log_params({"lambda2": lambda2, "mu": mu})
                tracker.log_metrics({metrics.MIOU: miou, metrics.GFLOPS_MEAN: gflops}, step=0)
                torch.manual_seed(number)
                config = NetworkConfig(layers=4, base_channels=4)
                tracker.log_network(build_network(config).eval(), config)
            run_ids[trial] = run
    assert parent is not None and all(run_ids.values())

    folder = tmp_path_factory.mktemp("pareto")
    name = MODEL_TEMPLATE.format(dataset=DATASET)
    for round_, trials in enumerate((FIRST_ROUND, SECOND_ROUND)):
        path = folder / f"pareto-{round_}.json"
        write_front(path, path.with_suffix(".csv"), [trial_point(t, run_ids[t]) for t in trials])
        state = register_front(path, tracking_uri=server.uri, name=MODEL_TEMPLATE)
        assert state.name == name
    versions = {v.trial: v.version for v in state.versions}
    # What the browser must show: three versions, t1 off the front, the three fixed aliases.
    assert sorted(versions) == ["t0", "t1", "t2"], versions
    assert {v.trial: v.pareto for v in state.versions} == {"t0": True, "t1": False, "t2": True}
    assert {ALIAS_BEST_MIOU, ALIAS_MIN_GFLOPS, ALIAS_KNEE} <= set(state.aliases)
    assert state.aliases[ALIAS_BEST_MIOU] == versions["t2"]
    assert state.aliases[ALIAS_MIN_GFLOPS] == versions["t0"]
    experiment = MlflowClient(tracking_uri=server.uri).get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    # The tracker declared it a model-training experiment (MLflow 3's experiment type tag).
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    return Study(uri=server.uri, experiment_id=experiment.experiment_id, run_ids=run_ids,
                 model=name, versions=versions,
                 pareto={v.version: v.pareto for v in state.versions}, aliases=dict(state.aliases))


# ---------------------------------------------------------------------------------------------
# The test


def check_runs_page(page, study: Study, shots: Screenshots) -> None:
    """The address `dynroute ui` prints opens the experiment's runs in the Model training view
    (MLflow 3.17.2 opens an experiment on its GenAI overview unless told otherwise); the runs table
    lists the study run and, expanded, every trial run."""
    address = experiment_page(study.uri, EXPERIMENT)
    assert address == (f"{study.uri}/#/experiments/{study.experiment_id}/runs"
                       f"?workflowType=machine_learning")
    page.goto(address)
    try:
        study_row = page.locator("[role=row]", has_text=STUDY_RUN)
        study_row.first.wait_for(timeout=UI_TIMEOUT_MS)
        # Child runs are folded under their parent: the run-name cell's button unfolds them.
        page.get_by_text(f"{len(TRIALS) + 1} matching runs").wait_for(timeout=UI_TIMEOUT_MS)
        first_trial = page.get_by_text(trial_run_name(next(iter(TRIALS))), exact=True)
        if not first_trial.is_visible():
            study_row.first.locator("[role=gridcell][col-id*='Run Name'] button").first.click()
        for trial in TRIALS:
            page.get_by_text(trial_run_name(trial), exact=True).wait_for(timeout=UI_TIMEOUT_MS)
        rows = page.locator("[role=row][row-id]")
        shown = {rows.nth(i).get_attribute("row-id") for i in range(rows.count())}
        # The rows are the runs themselves, not look-alike text.
        assert set(study.run_ids.values()) <= shown, (study.run_ids, shown)
        assert "/runs" in page.url and "/overview" not in page.url, page.url
        assert "workflowType=machine_learning" in page.url, page.url
    finally:
        shots.take(page, "experiment-runs")


def check_model_page(page, study: Study, shots: Screenshots) -> None:
    """The registered model's page lists the three versions, each with its registry aliases
    (as alias chips, `@ name`, in its own row) and its pareto tag."""
    page.set_viewport_size({"width": 1600, "height": 2600})  # every version in the screenshot
    page.goto(f"{study.uri}/#/models/{quote(study.model, safe='')}")
    try:
        page.get_by_role("heading", name=study.model).wait_for(timeout=UI_TIMEOUT_MS)
        fixed = (ALIAS_BEST_MIOU, ALIAS_MIN_GFLOPS, ALIAS_KNEE)
        for version, on_front in sorted(study.pareto.items(), key=lambda item: int(item[0])):
            link = page.get_by_role("link", name=f"Version {version}", exact=True)
            row = page.locator("[role=row]").filter(has=link)
            expect(row).to_have_count(1, timeout=UI_TIMEOUT_MS)
            expect(row).to_contain_text(f"pareto: {str(on_front).lower()}",
                                        timeout=UI_TIMEOUT_MS)
            mine = [a for a in fixed if study.aliases.get(a) == version]
            for alias in mine:
                expect(row).to_contain_text(f"@ {alias}", timeout=UI_TIMEOUT_MS)
            text = " ".join(row.inner_text().split())  # \xa0 and newlines as single spaces
            for alias in set(fixed) - set(mine):
                assert f"@ {alias}" not in text, (alias, version, text)
        links = page.get_by_role("link", name=re.compile(r"^Version \d+$"))
        expected = [f"Version {v}" for v in sorted(study.pareto, key=int)]
        assert sorted(links.all_inner_texts(), key=lambda t: int(t.split()[-1])) == expected
    finally:
        shots.take(page, "registered-model")


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser binary, checked before the (slower) server and data are set up."""
    require_playwright()
    return chromium_executable()


def test_mlflow_ui_shows_trial_runs_and_registered_front(chromium: str, study: Study,
                                                        tmp_path: Path) -> None:
    executable = chromium
    shots = Screenshots(tmp_path / "ui-screenshots")
    blocked: list[str] = []

    def only_loopback(route) -> None:
        if urlsplit(route.request.url).hostname == LOOPBACK:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    seen: set[Proc] = set()
    began = time.monotonic()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True,
            args=list(CHROMIUM_ARGS), service_workers="block",
            viewport={"width": 1600, "height": 1000})
        try:
            seen |= chromium_processes()
            assert seen, f"no Chromium process of {executable} found under this test"
            context.route("**/*", only_loopback)
            page = context.pages[0] if context.pages else context.new_page()
            check_runs_page(page, study, shots)
            seen |= chromium_processes()
            check_model_page(page, study, shots)
            seen |= chromium_processes()
        finally:
            context.close()
    print(f"UI checked in {time.monotonic() - began:.1f} s with {executable} ({len(seen)} "
          f"Chromium processes); screenshots in {shots.folder}; requests blocked (not on "
          f"{LOOPBACK}): {blocked or 'none'}")

    deadline = time.monotonic() + 10
    while (left := {p for p in seen if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"Chromium processes outlived the browser: {sorted(p.pid for p in left)}"
    assert (tmp_path / "ui-screenshots" / "experiment-runs.png").stat().st_size > 0
    assert (tmp_path / "ui-screenshots" / "registered-model.png").stat().st_size > 0
