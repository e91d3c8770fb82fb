"""The repository's layout contract: one namespace, no shadowed stdlib `platform`, clean models/."""

import ast
import platform
import re
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
    from dynroute.platform.data.shards import IGNORE_INDEX

    assert LOSS_IGNORES == IGNORE_INDEX

def test_readme_names_the_test_command_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert "make test" in ci


def test_import_platform_inside_a_ray_worker_is_the_standard_library():
    # A Ray worker started from the repo root imports as the driver does; platform/ must not win.
    code = (
        "import ray, platform\n"
        "from dynroute.platform.train.ray_train import init_ray\n"
        "init_ray(num_cpus=1)  # a local cluster on loopback\n"
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


# The rooms of platform/ and the rooms each may import (docs/conventions.md, "The rooms of
# platform/"). The root's shared leaves (metrics, files, url_secrets) import no room.
ROOMS = {
    "data": set(),
    "device": set(),
    "tracking": set(),
    "pareto": set(),
    "train": {"data", "device", "tracking"},
    "evaluate": {"data", "device"},
    "search": {"data", "device", "tracking", "train", "evaluate", "pareto"},
    "registry": {"tracking", "pareto"},
    "config": {"data", "device", "tracking", "pareto", "train", "evaluate", "search", "registry"},
}


def _internal_imports(file: Path) -> set[str]:
    """The dynroute modules `file` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynroute"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dynroute"))
    return found


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "platform" and parts[2] in ROOMS else None


def test_platform_is_rooms_and_a_few_shared_leaves():
    rooms = {p.name for p in (ROOT / "platform").iterdir() if p.is_dir() and
             not p.name.startswith(("_", "."))}
    assert rooms == set(ROOMS)
    for room in ROOMS:
        init = ROOT / "platform" / room / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{room}/__init__.py says nothing"
    leaves = {p.stem for p in (ROOT / "platform").glob("*.py")}
    assert leaves == {"metrics", "files", "url_secrets"}


def test_rooms_import_only_the_rooms_below_them():
    for room, allowed in ROOMS.items():
        for file in (ROOT / "platform" / room).glob("*.py"):
            for module in _internal_imports(file):
                assert not module.startswith("dynroute.pipelines"), f"{file}: {module}"
                other = _room_of(module)
                assert other in (None, room) or other in allowed, \
                    f"platform/{room}/{file.name} imports {module}; {room} may import {allowed}"
    for file in (ROOT / "platform").glob("*.py"):
        rooms = {_room_of(m) for m in _internal_imports(file)} - {None}
        assert not rooms, f"the shared leaf {file.name} imports the rooms {rooms}"


def test_the_allowed_imports_form_a_dag():
    done: set[str] = set()
    while len(done) < len(ROOMS):
        ready = {r for r, deps in ROOMS.items() if r not in done and deps <= done}
        assert ready, f"a cycle among {set(ROOMS) - done}"
        done |= ready


def test_run_and_tune_defaults_are_params_yaml():
    """One place for each default: the run and search settings' dataclasses hold params.yaml's."""
    from dynroute.platform.config.params import load_params
    from dynroute.platform.search.study import TuneSettings
    from dynroute.platform.train.spec import RunSettings

    params = load_params(ROOT / "params.yaml")
    assert params.run == RunSettings()
    assert params.tune == TuneSettings()


def _cited_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    return [ROOT / f for f in tracked if (f.endswith((".py", ".yaml", ".sh", ".toml"))
            or f.startswith("infra/docker/Dockerfile")) and ROOT / f != Path(__file__)]


def _numbered_items(doc: str, heading: str) -> set[int]:
    """The numbers of the list items `N. ` in the section `## heading` of a docs file."""
    section = doc.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {int(n) for n in re.findall(r"^(\d+)\. ", section, re.M)}


def test_every_citation_resolves_inside_the_repository():
    """docs/<name>.md §N, "pitfall N", "lesson N" and quoted section names are there to read."""
    docs = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    model_sections = {int(n) for n in re.findall(r"^## (\d+)\. ", docs["model.md"], re.M)}
    pitfalls = _numbered_items(docs["platform.md"], "Pitfalls")
    lessons = _numbered_items(docs["conventions.md"], "Lessons")
    benchmarks = (ROOT / "benchmarks" / "README.md").read_text()
    checked = 0
    for file in _cited_files():
        text = file.read_text()
        where = file.relative_to(ROOT)
        outside = re.findall(r"(?<![\w/])(?:model|platform|style)\.md", text)
        assert not outside, f"{where} cites {outside[0]} outside docs/"
        assert not re.search(r"\bissue \d+", text), f"{where} cites an issue number"
        for name, rest in re.findall(r"docs/(\w+\.md)([^\n]{0,60})", text):
            assert name in docs, f"{where} cites docs/{name}, which does not exist"
            checked += 1
            if name == "model.md" and rest.startswith(" §"):
                cited = re.match(r" §(\d+)(?:[–-]§(\d+))?((?:, §\d+)*)", rest)
                low = int(cited.group(1))
                numbers = set(range(low, int(cited.group(2) or low) + 1))
                numbers |= {int(n) for n in re.findall(r"\d+", cited.group(3))}
                assert numbers <= model_sections, f"{where}: docs/model.md §{numbers}"
            if match := re.match(r", pitfall (\d+)", rest):
                assert int(match.group(1)) in pitfalls, f"{where}: {name}{rest}"
            if match := re.match(r", lesson (\d+)", rest):
                assert int(match.group(1)) in lessons, f"{where}: {name}{rest}"
            if match := re.match(r',\s+"([^"]+)"', rest):
                assert f"\n## {match.group(1)}\n" in docs[name], f"{where}: {name}{rest}"
        for heading in re.findall(r'benchmarks/README\.md, "([^"]+)"', text):
            assert re.search(rf"^#+ {re.escape(heading)}$", benchmarks, re.M), \
                f'{where} cites benchmarks/README.md, "{heading}", which has no such section'
            checked += 1
    assert checked > 40  # the code cites the docs; a pattern that matched nothing would pass
