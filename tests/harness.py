"""Test harness: real worker processes (and other teamster processes) started by the tests.

Workers are real ``celery worker`` processes against the test session's Redis; the harness only starts,
stops and kills them.
"""

from __future__ import annotations

import base64
import os
import signal
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from teamster.orchestrator.processes import WorkerProcess

__all__ = ["Worker", "child_env", "wait_until", "wait_settled", "SETTLED"]


def child_env(**overrides: Any) -> dict[str, str]:
    """The environment for a child process: this process's env plus ``TEAMSTER_*`` overrides."""
    env = dict(os.environ)
    for key, value in overrides.items():
        env[f"TEAMSTER_{key.upper()}"] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Worker(WorkerProcess):
    """One real Celery worker process running teamster's app, with this test session's settings.

    Args:
        name: Node name prefix (``name@host``).
        concurrency: Pool size.
        pool: Celery pool (threads by default, as ``teamster worker`` uses).
        queues: Queues to consume; both teamster queues by default.
        env: Environment overrides (``TEAMSTER_*`` keys without the prefix, lower case).
        beat: Also run celery beat inside the worker (``-B``), i.e. the watchdog schedule.
    """

    def __init__(self, name: str | None = None, *, concurrency: int = 4, pool: str = "threads",
                 queues: str | None = None, env: dict[str, Any] | None = None, beat: bool = False) -> None:
        name = name or f"w{uuid.uuid4().hex[:6]}"
        full_env = child_env(**(env or {}))
        prefix = full_env.get("TEAMSTER_KEY_PREFIX", "teamster")
        log_path = Path(tempfile.mkdtemp(prefix=f"teamster-{prefix}-")) / f"{name}.log"
        super().__init__(
            name, env=full_env, log_path=log_path, pool=pool, concurrency=concurrency,
            queues=queues or f"{full_env.get('TEAMSTER_STEPS_QUEUE', 'teamster.steps')},"
                             f"{full_env.get('TEAMSTER_CONTROL_QUEUE', 'teamster.control')}",
            beat_schedule=log_path.with_suffix(".beat") if beat else None,
        )

    def start(self, wait: bool = True, timeout: float = 60.0) -> Worker:
        super().start(wait, timeout)
        return self

    def __enter__(self) -> Worker:
        return self.start()

def ctrl_c_works() -> None:
    """``preexec_fn`` for a child process a test stops with SIGINT, as Ctrl-C would: Python raises
    KeyboardInterrupt only when SIGINT is not ignored at start-up, and a child inherits an ignored SIGINT -- which is
    what a test run started in the background of a non-interactive shell (``cmd &``, CI scripts) has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


SETTLED = ("succeeded", "failed", "escalated", "needs_human", "cancelled")


def wait_settled(client: Any, run_id: str, timeout: float = 60.0) -> Any:
    """Wait until a run is final or waiting for an operator; returns its record."""
    def settled() -> Any:
        run = client.status(run_id)
        return run if run.status.value in SETTLED else None

    return wait_until(settled, timeout, message=f"run {run_id} did not settle within {timeout}s")


def http_get(url: str, auth: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url`` (basic ``auth`` as ``user:password``): its status and body; ``(0, "")`` when nothing answers."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - localhost
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples in an exposition ``text``, over those with ``labels`` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
