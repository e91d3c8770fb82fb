"""The repository's layout contract: one namespace, no shadowed stdlib `platform`, clean models/."""

import ast
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
ORCHESTRATION = {"ray", "mlflow", "optuna", "dvc"}


def _is_stdlib_platform(file: str) -> bool:
    return Path(file).resolve().parent == STDLIB


def test_platform_folder_has_no_init_so_it_cannot_shadow_the_stdlib():
    assert (ROOT / "platform").is_dir()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_platform_under_pytest_is_the_standard_library():
    assert _is_stdlib_platform(platform.__file__)
    assert platform.python_version().startswith("3.")


def test_import_platform_from_the_repo_root_is_the_standard_library():
    # `python -c` puts the current directory first on sys.path, as `python -m` and Ray do.
    code = "import platform, sys; print(sys.path[0] == '', platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert _is_stdlib_platform(out[1])


def test_the_three_folders_are_one_namespace():
    code = ("import dynroute.models, dynroute.pipelines, dynroute.platform.metrics, platform;"
            "print(dynroute.models.__file__); print(dynroute.platform.metrics.__file__);"
            "print(platform.__file__)")
    lines = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert Path(lines[0]).resolve() == (ROOT / "models" / "__init__.py").resolve()
    assert Path(lines[1]).resolve() == (ROOT / "platform" / "metrics.py").resolve()
    assert _is_stdlib_platform(lines[2])


def test_models_imports_no_orchestration_library():
    code = ("import sys, dynroute.models, dynroute.models.static_routes, "
            "dynroute.models.route_statistics, dynroute.models.summary;"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ORCHESTRATION!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"
    for file in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in ORCHESTRATION]
            assert not bad, f"{file.name} imports {bad}"



def test_the_loss_ignores_the_label_the_shards_mark_ignore():
    """models/ stands alone, so it keeps its own copy of the shard format's ignore label."""
    from dynroute.models.losses import IGNORE_INDEX as LOSS_IGNORES
    from dynroute.platform.shards import IGNORE_INDEX

    assert LOSS_IGNORES == IGNORE_INDEX

def test_readme_names_the_test_command_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert "make test" in ci


def test_import_platform_inside_a_ray_worker_is_the_standard_library():
    # A Ray worker started from the repo root imports as the driver does; platform/ must not win.
    code = (
        "import os, ray, platform\n"
        "os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def where():\n"
        "    import platform, dynroute.platform.metrics as m\n"
        "    return platform.__file__, platform.system(), m.__file__\n"
        "print(*ray.get(where.remote()), sep='\\n')\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    file, system, metrics = out.stdout.strip().splitlines()[-3:]
    assert _is_stdlib_platform(file) and system == "Linux"
    assert Path(metrics).resolve() == (ROOT / "platform" / "metrics.py").resolve()
