"""The repository's promises: README commands, CI entry point, docker-compose, packaging, import style."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PACKAGES = ("config", "agents", "tasks", "orchestrator", "examples")


def _setup_commands() -> list[str]:
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)][:2]


def test_readme_has_the_two_setup_commands_demo_and_tests() -> None:
    demo, tests = _setup_commands()
    assert "\n" not in demo and "\n" not in tests
    assert demo.endswith("teamster demo") and "pip install -e ." in demo
    assert tests.endswith("python -m pytest") and "pip install -e '.[dev]'" in tests


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert script[-1] == _setup_commands()[1]
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111


def test_compose_file_is_valid_and_matches_the_readme() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "worker", "watchdog", "flower"}
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    for name in ("worker", "watchdog", "flower"):
        command = " ".join(services[name]["command"])
        assert command.startswith("teamster ") and f"`{command}`" in README, command
        env = services[name]["environment"]
        assert env["TEAMSTER_REDIS_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "deploy" not in services["worker"] and "container_name" not in services["worker"]  # scalable
    assert services["worker"]["environment"]["TEAMSTER_METRICS_PORT"] == "9808"
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    # down/logs work without the variable; Flower itself refuses to listen on 0.0.0.0 without it (tests/test_operator)
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    assert services["flower"]["command"][-2:] == ["--address", "0.0.0.0"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # the build context is the sources, not a 300 MB venv
    assert "docker compose up --build --scale worker=4" in README


def test_packaging_installs_every_folder_under_the_one_teamster_namespace() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "teamster"
    assert project["project"]["scripts"]["teamster"] == "teamster.orchestrator.cli:main"
    listed = project["tool"]["setuptools"]["packages"]
    package_dir = project["tool"]["setuptools"]["package-dir"]
    assert {name.split(".")[0] for name in listed} == {"teamster"}, "the wheel's only top-level name is teamster"
    assert package_dir["teamster"] == "teamster" and (ROOT / "teamster" / "py.typed").exists()
    for sub in ROOT.glob("*/**/__init__.py"):
        folder = sub.parent.relative_to(ROOT)
        if folder.parts[0] in PACKAGES:
            package = "teamster." + ".".join(folder.parts)
            assert package in listed, f"{package} is not listed in pyproject"
            assert package_dir[package] == folder.as_posix()
            # the source tree imports as `teamster` too (and mypy reads it) through one symlink per folder
            link = ROOT / "teamster" / folder.parts[0]
            assert link.is_symlink() and link.resolve() == ROOT / folder.parts[0]
    deps = " ".join(project["project"]["dependencies"]).lower()
    for needed in ("celery[redis]>=5.7", "redis", "pydantic>=2", "pydantic-settings", "strands-agents", "boto3",
                   "flower", "typer", "rich", "prometheus-client"):
        assert needed in deps, needed
    dev = " ".join(project["project"]["optional-dependencies"]["dev"])
    for needed in ("pytest", "pytest-timeout", "mypy", "ruff"):
        assert needed in dev


def test_absolute_imports_through_the_teamster_namespace_only_and_explicit_all() -> None:
    for package in (*PACKAGES, "teamster", "tests", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            if path.is_relative_to(ROOT / "teamster") and path.parent != ROOT / "teamster":
                continue  # the symlinked folders are checked under their own names
            text = path.read_text()
            assert not re.search(r"^\s*from \.", text, re.M), f"relative import in {path}"
            for node in ast.walk(ast.parse(text)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    top = name.split(".")[0]
                    assert top not in PACKAGES, f"{path} imports {name!r}; use teamster.{name}"
            if package not in (*PACKAGES, "teamster"):
                continue
            if not path.name.startswith("_") or path.name == "__init__.py":
                assert "__all__" in text, f"{path} has no __all__"


def _module_imports(path: Path) -> set[str]:
    """The teamster modules ``path`` imports when it is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                else []:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("teamster"):
                found.add(sub.module)
                found.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("teamster"))
    return found


def test_no_import_cycles_between_teamster_modules() -> None:
    modules: dict[str, Path] = {}
    for package in (*PACKAGES, "teamster"):
        for path in (ROOT / package).rglob("*.py"):
            if path.is_relative_to(ROOT / "teamster") and path.parent != ROOT / "teamster":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts if parts[0] == "teamster" else ("teamster", *parts))
            modules[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ is imported before its modules: count an edge to a module as one to its package too
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name)
