"""Test harness: real worker processes (and other teamster processes) started by the tests.

Workers are real ``celery worker`` processes against the test session's Redis; the harness only starts,
stops and kills them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["Worker", "child_env", "wait_until", "wait_settled", "SETTLED"]


def child_env(**overrides: Any) -> dict[str, str]:
    """The environment for a child process: this process's env plus ``TEAMSTER_*`` overrides."""
    env = dict(os.environ)
    for key, value in overrides.items():
        env[f"TEAMSTER_{key.upper()}"] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Worker:
    """One real Celery worker process running teamster's app.

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
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.concurrency = concurrency
        self.pool = pool
        self.env = child_env(**(env or {}))
        prefix = self.env.get("TEAMSTER_KEY_PREFIX", "teamster")
        self.queues = queues or f"{self.env.get('TEAMSTER_STEPS_QUEUE', 'teamster.steps')},"\
                                f"{self.env.get('TEAMSTER_CONTROL_QUEUE', 'teamster.control')}"
        self.beat = beat
        self.log_path = Path(tempfile.mkdtemp(prefix=f"teamster-{prefix}-")) / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@%h"

    def start(self, wait: bool = True, timeout: float = 60.0) -> Worker:
        args = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", self.pool,
                "-c", str(self.concurrency), "-n", self.nodename, "-Q", self.queues,
                "--without-mingle", "--without-gossip", "-l", "INFO"]
        if self.beat:
            args += ["-B", "-s", str(self.log_path.with_suffix(".beat"))]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean shutdown, no acknowledgement, no lease release."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
