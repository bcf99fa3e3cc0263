"""A temporary local worker and watchdog (``LocalStack``), worker pings, and waiting for runs.

``teamster demo`` runs its batch on a :class:`LocalStack`; ``--wait`` on ``submit``, ``dlq retry`` and
``dlq resolve`` starts one when no worker answers and teamster runs on the embedded development Redis, so a
first-time user never waits for a worker that does not exist.

Example:
    >>> with LocalStack(settings, redis_url) as stack:
    ...     client.submit("ticket_triage", {...})
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from rich.markup import escape

from teamster.agents.providers import check_provider
from teamster.config.settings import TeamsterSettings
from teamster.errors import ConfigurationError, RunTimeout
from teamster.orchestrator.cli._common import err_console
from teamster.orchestrator.cli._support import is_settled
from teamster.orchestrator.client import Client
from teamster.orchestrator.enqueue import producer_app
from teamster.orchestrator.models import RunRecord
from teamster.orchestrator.processes import WorkerProcess, WorkerStartError
from teamster.orchestrator.watchdog import Watchdog, WatchdogReport

__all__ = ["LocalStack", "ping_workers", "wait_settled", "await_run"]


def ping_workers(settings: TeamsterSettings, redis_url: str, timeout: float = 1.0) -> list[str]:
    """Node names of the workers that answer a Celery control ping within ``timeout`` seconds.

    Only workers on the same broker and key prefix answer (teamster's queues are prefixed).
    """
    app = producer_app(settings, redis_url)
    try:
        replies = app.control.ping(timeout=timeout) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


class LocalStack:
    """A temporary worker subprocess and an in-process watchdog thread, stopped on exit (also on Ctrl-C).

    The worker is a real ``celery -A teamster.tasks.app worker -P threads`` process with this process's environment
    plus the settings that matter passed explicitly (Redis URL, key prefix, model, workflow modules, queues).

    Args:
        settings: The settings in effect (may differ from the environment, e.g. the demo's model).
        redis_url: The resolved Redis URL (the embedded server's when ``TEAMSTER_REDIS_URL`` is unset).
        concurrency: Worker threads.
        workflow_modules: Modules the worker imports (default: ``settings.workflow_modules``).
        watchdog: Also run a watchdog thread.
        watchdog_interval: Seconds between watchdog scans (default: the settings' interval).
        on_report: Called with each watchdog report that did something.
    """

    def __init__(self, settings: TeamsterSettings, redis_url: str, *, concurrency: int = 4,
                 workflow_modules: Sequence[str] | None = None, watchdog: bool = True,
                 watchdog_interval: float | None = None,
                 on_report: Callable[[WatchdogReport], None] | None = None) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.concurrency = concurrency
        self.workflow_modules = list(workflow_modules if workflow_modules is not None else settings.workflow_modules)
        self.watchdog = watchdog
        self.watchdog_interval = watchdog_interval or settings.watchdog_interval_seconds
        self.on_report = on_report
        self.name = f"teamster-local-{uuid.uuid4().hex[:6]}"
        self.nodename = f"{self.name}@{socket.gethostname()}"
        self._dir = Path(tempfile.mkdtemp(prefix="teamster-local-"))
        self.log_path = self._dir / "worker.log"
        self.worker: WorkerProcess | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        """The worker's environment."""
        env = dict(os.environ)
        env.update({
            "TEAMSTER_REDIS_URL": self.redis_url,
            "TEAMSTER_KEY_PREFIX": self.settings.key_prefix,
            "TEAMSTER_MODEL": self.settings.model,
            "TEAMSTER_WORKFLOW_MODULES": ",".join(self.workflow_modules),
            "TEAMSTER_STEPS_QUEUE": self.settings.steps_queue,
            "TEAMSTER_CONTROL_QUEUE": self.settings.control_queue,
            "TEAMSTER_EMBEDDED_DIR": str(self.settings.embedded_dir),
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def log(self) -> str:
        """The worker's output so far."""
        return self.worker.log() if self.worker is not None else ""

    def start(self, timeout: float = 60.0) -> LocalStack:
        """Start the worker (and the watchdog) and wait until the worker is ready.

        Raises:
            ConfigurationError: the worker exited or did not get ready (the message carries its reason).
        """
        if self.worker is not None:
            return self
        # Its own session: a Ctrl-C in the terminal reaches only this process, which then stops the worker
        # with a warm shutdown instead of killing it mid-step.
        self.worker = WorkerProcess(self.name, env=self.env(), log_path=self.log_path, concurrency=self.concurrency,
                                    queues=f"{self.settings.steps_queue},{self.settings.control_queue}")
        try:
            self.worker.start(timeout=timeout)
        except WorkerStartError as exc:
            self.worker = None  # already stopped; keep its log for the hint
            self.stop()
            raise ConfigurationError(f"the local worker did not start: {exc.message.splitlines()[0]}",
                                     hint=exc.hint) from None
        except BaseException:
            self.stop()
            raise
        if self.watchdog:
            client = Client(self.settings, redis_url=self.redis_url, load_modules=False)
            dog = Watchdog(client.runtime)
            self._thread = threading.Thread(target=dog.run_forever, name="teamster-local-watchdog", daemon=True,
                                            args=(self._stop, self.watchdog_interval, self._report))
            self._thread.start()
        return self

    def _report(self, report: WatchdogReport) -> None:
        if report.total() and self.on_report is not None:
            self.on_report(report)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the watchdog and the worker (warm shutdown, then SIGKILL). Safe to call twice."""
        with _ignore_sigint():
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            worker, self.worker = self.worker, None
            if worker is not None:
                worker.stop(timeout)
                shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def _ignore_sigint() -> Iterator[None]:
    """Ignore a second Ctrl-C (or SIGTERM, SIGHUP) while shutting down (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_settled(client: Client, run_id: str, timeout: float, *, poll: float = 0.1) -> RunRecord:
    """Poll until the run is final or waiting for an operator.

    Raises:
        RunTimeout: still going after ``timeout`` seconds (the run goes on).
    """
    deadline = time.monotonic() + timeout
    delay = poll
    while True:
        run = client.status(run_id)
        if is_settled(run):
            return run
        if time.monotonic() >= deadline:
            raise RunTimeout(f"run {run_id} is still {run.status.value} after {timeout:.0f}s (it goes on)",
                             run_id=run_id, hint=f"Follow it with `teamster runs show {run_id}`.")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _local_settings(client: Client, run_id: str) -> TeamsterSettings:
    """Settings for a temporary worker: the configured ones, or the scripted model for a scripted run.

    Runs started by ``teamster demo`` use the offline scripted model; resuming one from another shell (where
    ``TEAMSTER_MODEL`` is the Bedrock default without credentials) keeps using it.

    Raises:
        ConfigurationError: the configured model cannot be used here and the run did not use the scripted one.
    """
    settings = client.settings
    try:
        check_provider(settings.model, settings)
        return settings
    except ConfigurationError as exc:
        used = [str(e.data.get("model") or "") for e in client.journal(run_id, types=["agent_start"])]
        if used and all(model.startswith("ScriptedModel") for model in used):
            err_console.print(f"[dim]{escape(settings.model)} is not usable here ({escape(exc.message)}); this run "
                              "used the offline scripted model, so the temporary worker does too[/]", highlight=False,
                              soft_wrap=True)
            return settings.model_copy(update={"model": "scripted"})
        raise ConfigurationError(f"no worker is running and a temporary local worker cannot use model "
                                 f"{settings.model}: {exc.message}",
                                 hint=f"{exc.hint} The run proceeds when a worker starts (`teamster worker`)."
                                 ) from None


def await_run(client: Client, run_id: str, timeout: float) -> RunRecord:
    """Wait for a run to settle, making sure something will run it.

    When no worker answers a ping and teamster runs on the embedded development Redis, a temporary
    :class:`LocalStack` runs the run; with a configured Redis URL, a warning says the run proceeds when a
    worker starts, and this waits up to ``timeout``.
    """
    run = client.status(run_id)
    if is_settled(run):
        return run
    with err_console.status(f"waiting for run {escape(run_id)}…"):
        workers = ping_workers(client.settings, client.redis_url)
    if workers:
        with err_console.status(f"waiting for run {escape(run_id)} ({len(workers)} worker(s) up)…"):
            return wait_settled(client, run_id, timeout)
    if client.settings.redis_url is None:
        settings = _local_settings(client, run_id)
        err_console.print("[yellow]no worker is running: started a temporary local worker[/] "
                          "[dim](and watchdog; stopped when the run settles)[/]", highlight=False)
        with LocalStack(settings, client.redis_url, concurrency=2):
            with err_console.status(f"waiting for run {escape(run_id)} on the local worker…"):
                return wait_settled(client, run_id, timeout)
    err_console.print("[yellow]warning:[/] no worker answered a ping: the run will proceed when a worker starts "
                      f"(`teamster worker`); waiting up to {timeout:.0f}s", highlight=False, soft_wrap=True)
    with err_console.status(f"waiting for run {escape(run_id)}…"):
        return wait_settled(client, run_id, timeout)
