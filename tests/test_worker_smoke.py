"""A real worker process, started by the test against the session's Redis, runs a task end to end."""

from __future__ import annotations

import pytest

from tests.harness import Worker

pytestmark = pytest.mark.integration


def test_real_worker_runs_a_task_end_to_end() -> None:
    with Worker(concurrency=2) as worker:
        result = app_ping()
        assert result["pong"] is True
        assert result["pid"] != __import__("os").getpid()
        assert "teamster.ping" in worker.log()


def test_worker_says_how_it_tuned_garbage_collection_and_ids() -> None:
    with Worker(concurrency=2, env={"worker_gc_threshold": 23_456}) as worker:
        assert app_ping()["pong"] is True
        line = next(line for line in worker.log().splitlines() if "garbage collection every" in line)
        assert "every 23456 allocations (worker_gc_threshold)" in line
        assert int(line.split(", ")[-1].split()[0]) > 10_000  # start-up objects frozen (strands, openai, celery...)
        assert "uuid4 ids from os.urandom read 4096 bytes at a time (worker_buffered_uuids)" in worker.log()
    with Worker(concurrency=2, env={"worker_gc_threshold": 0, "worker_buffered_uuids": "false"}) as worker:
        assert app_ping()["pong"] is True
        log = worker.log()
        assert "garbage collection every 700 allocations (worker_gc_threshold), 0 start-up objects frozen" \
            in log  # Python's own settings
        assert "uuid4 ids from os.urandom 16 bytes per id (the standard library's) (worker_buffered_uuids)" in log


def app_ping() -> dict[str, object]:
    from teamster.tasks.app import app

    result: dict[str, object] = app.send_task("teamster.ping").get(timeout=30)
    return result


def test_worker_refuses_to_start_without_its_provider_extra() -> None:
    """Missing credentials or extras are one clear line at start-up, not a stack trace in the middle of a run."""
    import subprocess
    import sys

    from tests.harness import child_env

    # the worker process runs as if the extra were not installed (find_spec and import see sys.modules' None)
    hide = ("import sys; sys.modules['anthropic'] = None; from celery.__main__ import main; "
            "sys.argv = ['celery', '-A', 'teamster.tasks.app', 'worker', '-P', 'threads', '-l', 'INFO']; main()")
    proc = subprocess.run(
        [sys.executable, "-c", hide],
        env=child_env(model="anthropic:claude-sonnet-4-5"), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 78  # EX_CONFIG
    assert "teamster worker cannot start: missing_extra: provider 'anthropic' needs the 'anthropic' package" \
        in proc.stderr
    assert "hint: pip install 'teamster[anthropic]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_record_the_state_schema_version() -> None:
    from teamster.config.settings import load_settings
    from teamster.orchestrator.client import Client

    client = Client(load_settings(workflow_modules=["tests.workflows"]))
    run_id = client.submit("t_linear", {"text": "schema"})
    schema = client.status(run_id).state_schema
    name, _, digest = schema.partition("@")
    assert name == "LinearState" and len(digest) == 12
    client.cancel(run_id, reason="no worker in this test")


def test_worker_refuses_green_thread_pools() -> None:
    """strands runs each agent call with asyncio.run: under gevent every step would fail, so refuse at start."""
    import importlib.util
    import subprocess
    import sys

    from tests.harness import child_env

    if importlib.util.find_spec("gevent") is None:
        pytest.skip("gevent is not installed (then celery cannot even load the pool)")
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "teamster.tasks.app", "worker", "-P", "gevent",
                           "-l", "INFO"], env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "the gevent pool cannot run agent steps" in proc.stderr and "hint: Use -P threads" in proc.stderr
