"""teamster installed from its wheel into an ordinary Celery project.

The project directory has its own ``tasks.py`` (Celery's tutorial layout), ``config.py`` and ``agents/`` package,
and a workflow module of its own. From there, with the wheel installed in a fresh virtual environment:
``import teamster`` works, ``teamster submit`` and ``teamster doctor`` find the workflow module in the current
directory, ``teamster demo`` runs, and ``teamster worker`` and the project's own ``celery -A tasks worker`` run side
by side on the same Redis, each doing its own work.

The fresh environment gets teamster's dependencies from the test's environment (a ``.pth`` file), so the test
checks the wheel's layout and entry points without downloading anything.
"""

from __future__ import annotations

import json
import os
import signal
import site
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with teamster's wheel installed (dependencies borrowed from this environment); its bin dir."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, timeout=300)
    wheel = next((tmp / "dist").glob("teamster-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith("top_level.txt"))).decode().split()
    assert top_level == ["teamster"], top_level
    assert {name.split("/")[0] for name in names} == {"teamster", wheel.name.split("-")[0] + "-" +
                                                      wheel.name.split("-")[1] + ".dist-info"}
    assert "teamster/py.typed" in names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                   "'purelib'))"], check=True, capture_output=True, text=True).stdout.strip())
    # teamster's dependencies come from this environment; teamster itself only from the wheel
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "borrowed_dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, timeout=300)
    return venv / "bin"


PROJECT = {
    "config.py": """
        import os
        BROKER = os.environ["TEAMSTER_REDIS_URL"]
        PROJECT_NAME = "acme"
    """,
    "tasks.py": """
        from celery import Celery

        import config
        from agents import greeting

        app = Celery("acme", broker=config.BROKER, backend=config.BROKER)
        app.conf.task_default_queue = "acme"
        app.conf.broker_transport_options = {"global_keyprefix": "acme:"}
        app.conf.result_backend_transport_options = {"global_keyprefix": "acme:"}

        @app.task(name="acme.hello")
        def hello(name):
            return greeting(name) + " from " + config.PROJECT_NAME
    """,
    "agents/__init__.py": """
        def greeting(name):
            return "hello " + name
    """,
    "acme_flows.py": """
        from pydantic import BaseModel

        import config
        from agents import greeting
        from teamster import AgentSpec, Workflow


        class Ask(BaseModel):
            name: str


        class Answer(BaseModel):
            text: str


        answer = AgentSpec(name="acme_answer", input_model=Ask, output_model=Answer,
                           instructions=greeting("agent") + " of " + config.PROJECT_NAME)
        flow = Workflow("acme_flow", input_model=Ask)
        flow.step("answer", answer)
        flow.register()
    """,
}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    for name, text in PROJECT.items():
        path = tmp_path / "project" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return tmp_path / "project"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEAMSTER_") and k != "PYTHONPATH"}
    env.update({"TEAMSTER_REDIS_URL": os.environ["TEAMSTER_REDIS_URL"], "PYTHONUNBUFFERED": "1",
                "TEAMSTER_KEY_PREFIX": f"install-{uuid.uuid4().hex[:6]}", "TEAMSTER_EMBEDDED_DIR": str(tmp / "emb"),
                "TEAMSTER_MODEL": "scripted", "HOME": str(tmp / "home")})
    env.update(extra)
    return env


@pytest.fixture()
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_wheel_works_inside_a_celery_project_with_its_own_tasks_config_and_agents(
        installed: Path, project: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    python, teamster = str(installed / "python"), str(installed / "teamster")
    env = _env(tmp_path, TEAMSTER_WORKFLOW_MODULES="acme_flows")

    # the project's own modules and teamster's namespace coexist
    check = subprocess.run([python, "-c", "import config, tasks, agents, teamster, teamster.tasks.app; "
                            "from teamster import submit, Workflow, AgentSpec; import teamster.errors; "
                            "import teamster.testing; print(teamster.__file__, config.PROJECT_NAME, "
                            "agents.greeting('x'))"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert str(installed.parent) in check.stdout and "acme hello x" in check.stdout

    # doctor and submit import the workflow module from the current directory, like `celery -A` does
    doctor = subprocess.run([teamster, "doctor"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert "acme_flows (workflows: acme_flow)" in doctor.stdout, doctor.stdout + doctor.stderr
    submitted = subprocess.run([teamster, "submit", "acme_flow", "--input", '{"name": "ada"}'], cwd=project, env=env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()

    # teamster's worker and the project's own Celery worker, side by side on the same Redis
    logs = tmp_path / "logs"
    logs.mkdir()
    for name, argv in (("teamster", [teamster, "worker", "-c", "2", "-n", "tw@%h"]),
                       ("acme", [python, "-m", "celery", "-A", "tasks", "worker", "-P", "threads", "-c", "2",
                                 "-n", "acme@%h", "-l", "INFO"])):
        processes.append(subprocess.Popen(argv, cwd=project, env=env, stdout=open(logs / f"{name}.log", "wb"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
    for name in ("teamster", "acme"):
        wait_until(lambda n=name: " ready." in (logs / f"{n}.log").read_text(errors="replace"), timeout=90,
                   message=f"{name} worker not ready: {(logs / f'{name}.log').read_text(errors='replace')[-2000:]}")
    hello = subprocess.run([python, "-c", "import tasks; print(tasks.hello.delay('bob').get(timeout=60))"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert hello.stdout.strip() == "hello bob from acme", hello.stderr
    shown = subprocess.run([python, "-c", f"import teamster; print(teamster.result({run_id!r}, timeout=60)"
                                          ".model_dump_json())"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["answer"]["text"]  # the scripted model answered with a schema-valid sample


def test_demo_runs_from_a_project_with_its_own_tasks_py(installed: Path, project: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.pop("TEAMSTER_REDIS_URL")  # the demo's own embedded Redis
    try:
        demo = subprocess.run([str(installed / "teamster"), "demo", "--tickets", "4", "--timeout", "120"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=300)
    finally:  # the embedded Redis outlives the demo by design (`teamster redis stop` ends it)
        stopped = subprocess.run([str(installed / "teamster"), "redis", "stop"], cwd=project, env=env,
                                 capture_output=True, text=True, timeout=60)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "summary: " in demo.stdout and "4 succeeded" in demo.stdout
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
