"""Importing teamster is cheap and has no side effects (checked in fresh interpreters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("strands", "celery", "redis", "boto3", "openai")


def _fresh(code: str, tmp_path: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEAMSTER_")}
    env["TEAMSTER_EMBEDDED_DIR"] = str(tmp_path / "embedded")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("module", ["teamster", "teamster.errors", "teamster.orchestrator.cli"])
def test_importing_loads_no_sdk_no_broker_client(module: str, tmp_path: Path) -> None:
    loaded = _fresh(f"import json, sys, {module}; "
                    f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))",
                    tmp_path)
    assert loaded == [], f"importing {module} loaded {loaded}"


def test_importing_the_celery_app_starts_no_redis(tmp_path: Path) -> None:
    result = _fresh("import json, os, teamster.tasks.app as m; "
                    "print(json.dumps({'embedded': os.path.exists(os.environ['TEAMSTER_EMBEDDED_DIR']), "
                    "'configured': m.app.configured}))", tmp_path)
    assert result == {"embedded": False, "configured": False}


def test_public_names_resolve_lazily_and_are_typed(tmp_path: Path) -> None:
    import teamster

    for name in teamster.__all__:
        assert getattr(teamster, name) is not None, name
    with pytest.raises(AttributeError):
        teamster.no_such_name  # noqa: B018
    assert (Path(teamster.__file__).parent / "py.typed").exists()
