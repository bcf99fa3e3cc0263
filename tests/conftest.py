"""Session fixtures: a real Redis for the whole session and per-session key isolation.

If ``TEAMSTER_REDIS_URL`` is set, tests use that server; otherwise they start an embedded
``redis-server`` (the same mechanism as the development default) in a temporary directory. Either way the
session writes only under a fresh ``TEAMSTER_KEY_PREFIX`` and removes its keys at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from teamster.config.embedded import EmbeddedRedis

_EMBEDDED: EmbeddedRedis | None = None
_TMP: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point every teamster component of this session (and its child processes) at the test Redis."""
    global _EMBEDDED, _TMP
    _TMP = Path(tempfile.mkdtemp(prefix="teamster-tests-"))
    if not os.environ.get("TEAMSTER_REDIS_URL"):
        _EMBEDDED = EmbeddedRedis(_TMP / "redis")
        os.environ["TEAMSTER_REDIS_URL"] = _EMBEDDED.start()
    os.environ["TEAMSTER_KEY_PREFIX"] = f"test-{uuid.uuid4().hex[:8]}"
    os.environ["TEAMSTER_EMBEDDED_DIR"] = str(_TMP / "embedded")
    # Tests use the offline scripted model unless a test says otherwise.
    os.environ.setdefault("TEAMSTER_MODEL", "scripted")


def pytest_unconfigure(config: pytest.Config) -> None:
    url = os.environ.get("TEAMSTER_REDIS_URL")
    prefix = os.environ.get("TEAMSTER_KEY_PREFIX")
    if _EMBEDDED is not None:
        _EMBEDDED.stop()
    elif url and prefix:
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
    if _TMP is not None:
        shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["TEAMSTER_REDIS_URL"]


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(autouse=True, scope="module")
def _registries_per_module() -> Iterator[None]:
    """Agents and workflows that a test module's tests register (a ``Client`` loading ``tests.*_flows``, say) are
    gone when the module ends, as they would be in another process: ``teamster doctor`` in a later module checks the
    providers of the agents this process knows, and must not see another module's ``openai:slot``. Workflow modules
    (and ``tests.*`` modules) first imported during the module are dropped from ``sys.modules`` too, so a later module
    that loads them registers them again."""
    from teamster.agents import spec  # noqa: PLC0415
    from teamster.orchestrator import client, workflow  # noqa: PLC0415

    agents, workflows, modules = dict(spec._AGENTS), dict(workflow._WORKFLOWS), set(sys.modules)
    loaded = set(client._LOADED)  # what load_workflow_modules will not import again
    yield
    spec._AGENTS.clear()
    spec._AGENTS.update(agents)
    workflow._WORKFLOWS.clear()
    workflow._WORKFLOWS.update(workflows)
    workflow_modules = client._LOADED - loaded
    client._LOADED.intersection_update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith("tests.") or name in workflow_modules:
            del sys.modules[name]
