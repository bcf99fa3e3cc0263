"""The README's code works when pasted: its Python blocks run (the workflow on a real worker)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Worker

ROOT = Path(__file__).resolve().parent.parent


def block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- readme-test: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README block {name!r} not found"
    return match.group(1)


def test_define_an_agent_block_runs() -> None:
    code = block("agent")
    assert len(code.strip().splitlines()) <= 30
    exec(compile(code, "README.md#agent", "exec"), {})  # noqa: S102 - that is the point of this test


@pytest.mark.integration
def test_workflow_and_submit_blocks_run_on_a_real_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workflow = block("workflow")
    assert len(workflow.strip().splitlines()) < 40
    (tmp_path / "readme_claims.py").write_text(workflow)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("readme_claims")
    pythonpath = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    worker = Worker("readme", concurrency=2, env={"workflow_modules": "readme_claims"})
    worker.env["PYTHONPATH"] = pythonpath
    with worker:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block("submit"), "README.md#submit", "exec"), {})  # noqa: S102
    printed = out.getvalue()
    assert "claim_id='C-1'" in printed and "decide=" in printed, printed
    assert "readme_claims" in sys.modules


@pytest.mark.integration
def test_progress_block_follows_runs_on_a_real_worker() -> None:
    """The "Live progress" block, on a worker running the example workflow: the sync iterator prints every event
    of a run that succeeds, the async one the steps of a run that waits for a person, and result() says so."""
    code = block("progress")
    assert len(code.strip().splitlines()) <= 30
    with Worker("readme-progress", concurrency=2, env={"workflow_modules": "teamster.examples.triage"}):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md#progress", "exec"), {})  # noqa: S102
    lines = out.getvalue().splitlines()
    assert lines[0].split()[1] == "run_created" and lines.index("succeeded") > 0, lines
    assert lines[lines.index("succeeded") - 1].split()[1] == "run_succeeded", lines
    waiting = lines[lines.index("succeeded") + 1:]
    assert waiting[:2] == ["step_start classify", "step_start extract_order"], waiting
    assert waiting[-2] == "dead_lettered policy_review", waiting
    assert re.fullmatch(r"needs_human run_[0-9a-f]+:policy_review:\d+", waiting[-1]), waiting


def _passes_as_a_users_test_module(tmp_path: Path, modules: dict[str, str], test_module: str, passed: int,
                                   on_path: tuple[Path, ...] = (ROOT,)) -> None:
    """Save README blocks as a user's modules (``{file name: block name}``), run ``test_module`` under pytest in a
    fresh process, and check it passes with ``passed`` tests."""
    for name, block_name in modules.items():
        (tmp_path / name).write_text(block(block_name))
    env = {k: v for k, v in os.environ.items() if k not in ("TEAMSTER_WORKFLOW_MODULES", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in on_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--rootdir", str(tmp_path), str(tmp_path / test_module)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(rf"\b{passed} passed\b", proc.stdout), proc.stdout


def test_testing_block_runs_as_a_users_own_test_module(tmp_path: Path) -> None:
    """The "Test your workflows" block, saved as a test module next to the workflow block, passes under pytest."""
    _passes_as_a_users_test_module(tmp_path, {"readme_claims.py": "workflow", "test_readme_claims.py": "testing"},
                                   "test_readme_claims.py", 3, on_path=(tmp_path, ROOT))


def test_limits_block_runs_as_a_users_own_test_module(tmp_path: Path) -> None:
    """The "Provider limits and run budgets" block, saved as a test module, passes under pytest."""
    _passes_as_a_users_test_module(tmp_path, {"test_readme_limits.py": "limits"}, "test_readme_limits.py", 1)


def test_child_workflows_block_runs_as_a_users_own_test_module(tmp_path: Path) -> None:
    """The "Child workflows" block, saved as a test module, passes under pytest."""
    _passes_as_a_users_test_module(tmp_path, {"test_readme_child.py": "child"}, "test_readme_child.py", 2)


def test_limits_environment_block_is_valid_settings() -> None:
    from teamster.config.settings import load_settings  # noqa: PLC0415

    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-test: limits-env -->\n```bash\n(.*?)```", text, re.S)
    assert match, "README block 'limits-env' not found"
    values = dict(re.findall(r"export TEAMSTER_(\w+)='(.*?)'\n", match.group(1)))
    assert set(values) == {"PROVIDER_LIMITS", "MODEL_PRICES"}
    settings = load_settings(**{k.lower(): v for k, v in values.items()})
    assert settings.provider_limits["openai:gpt-4o-mini"].concurrency == 50
    assert settings.model_prices["openai:gpt-4o-mini"].output == 0.60


def test_delegation_block_runs_as_a_users_own_test_module(tmp_path: Path) -> None:
    """The "Delegation: agents as tools" block, saved as a test module, passes under pytest."""
    (tmp_path / "test_readme_delegation.py").write_text(block("delegation"))
    env = {k: v for k, v in os.environ.items() if k not in ("TEAMSTER_WORKFLOW_MODULES", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_readme_delegation.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout
