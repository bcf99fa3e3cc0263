"""Worker child processes: a real ``celery -A teamster.tasks.app worker`` started, watched and stopped from Python.

Used by ``teamster demo`` and ``--wait`` (a temporary local worker), by the benchmarks and by the tests:
one implementation of "start a worker in its own session with a log file, wait until it consumes, stop it
warmly or SIGKILL it" -- and of the parent's side: :func:`raise_terminated`, the handler that makes SIGTERM or SIGHUP
stop the parent (and so its workers) the way Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import IO

from teamster.errors import ConfigurationError

__all__ = ["Terminated", "WorkerProcess", "WorkerStartError", "raise_terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C (caught wherever a KeyboardInterrupt is); see :func:`raise_terminated`.

    Not a bare ``KeyboardInterrupt``: when a signal handler raises one while the main thread runs code compiled from a
    string (``exec``/``eval``; ``collections.namedtuple``, dataclasses and pydantic build methods that way), CPython
    3.11 remembers it as unhandled even after it is caught, and ends the process by signalling itself SIGINT: the demo
    printed that it stopped, then died of signal 2 instead of exiting with 130. CPython checks the exact type, so a
    subclass is not remembered.
    """


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """A signal handler (``signal.signal(signal.SIGTERM, raise_terminated)``): raise :class:`Terminated`."""
    raise Terminated(f"signal {signum}")


class WorkerStartError(ConfigurationError):
    """A worker process exited at start-up or did not become ready; carries its log tail."""

    code = "worker_start_error"


class WorkerProcess:
    """One ``celery -A teamster.tasks.app worker`` child process.

    Args:
        name: Node name prefix (``name@host``).
        env: The process's complete environment (``TEAMSTER_*`` settings included).
        log_path: File receiving the worker's output.
        pool: Celery pool (threads by default, as ``teamster worker``).
        concurrency: Pool size.
        queues: Comma-separated queues to consume.
        loglevel: Celery log level (INFO: readiness is detected from the ``ready.`` line).
        beat_schedule: Embed celery beat (the watchdog schedule) with this schedule file.
        cwd: Working directory (default: the current one).
    """

    def __init__(self, name: str, *, env: Mapping[str, str], log_path: Path, queues: str, pool: str = "threads",
                 concurrency: int = 4, loglevel: str = "INFO", beat_schedule: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.queues = queues
        self.pool = pool
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.beat_schedule = beat_schedule
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_at = 0.0
        self.ready_seconds: float | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@%h"

    def argv(self) -> list[str]:
        """The worker's command line."""
        args = [sys.executable, "-m", "celery", "-A", "teamster.tasks.app", "worker", "-P", self.pool,
                "-c", str(self.concurrency), "-n", self.nodename, "-Q", self.queues, "-E",
                "--without-mingle", "--without-gossip", "-l", self.loglevel]
        if self.beat_schedule is not None:
            args += ["-B", "-s", str(self.beat_schedule)]
        return args

    def start(self, wait: bool = True, timeout: float = 60.0) -> WorkerProcess:
        """Start the process in its own session (a terminal's Ctrl-C does not reach it) and wait until ready.

        Raises:
            WorkerStartError: it exited or was not ready within ``timeout`` (the message says why).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), env=self.env, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def is_ready(self) -> bool:
        """True once the worker consumes.

        Raises:
            WorkerStartError: the process exited (with the reason it printed and its log tail).
        """
        text = self.log()
        if self.proc is not None and self.proc.poll() is not None:
            reason = next((line for line in text.splitlines() if "cannot start" in line),
                          f"exit code {self.proc.returncode}")
            hint = next((line[5:].strip() for line in text.splitlines() if line.startswith("hint:")),
                        f"See the worker log: {self.log_path}")
            raise WorkerStartError(f"worker {self.name} did not start: {reason}\n{self.log_tail()}", hint=hint)
        if " ready." in text:
            if self.ready_seconds is None:
                self.ready_seconds = time.monotonic() - self.started_at
            return True
        return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until :meth:`is_ready` (see there), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise WorkerStartError(f"worker {self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}",
                                       hint=f"See the worker log: {self.log_path}")
            time.sleep(0.05)

    def log(self) -> str:
        """The worker's output so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the output."""
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty log)"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise WorkerStartError(f"worker {self.name} was not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean shutdown, no acknowledgement, no lease release."""
        if self.proc is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM: running steps finish), then SIGKILL after ``timeout``. Safe to call twice."""
        if self.proc is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
