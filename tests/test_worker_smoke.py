"""A real worker process, started by the test against the session's Redis, runs a task end to end."""

from __future__ import annotations

import pytest

from tests.harness import Worker

pytestmark = pytest.mark.integration


def test_real_worker_runs_a_task_end_to_end() -> None:
    from tasks.app import app

    with Worker(concurrency=2) as worker:
        result = app.send_task("teamster.ping").get(timeout=30)
        assert result["pong"] is True
        assert result["pid"] != __import__("os").getpid()
        assert "teamster.ping" in worker.log()
