"""The client API for applications: submit, status, result, events, cancel (plus operator helpers).

Example:
    >>> from teamster import submit, result
    >>> run_id = submit("ticket_triage", {"ticket_id": "T-1", "text": "Where is my order?"},
    ...                 idempotency_key="ticket-T-1")
    >>> result(run_id, timeout=60)

The input is validated against the workflow's input model before anything is written or enqueued; the same
idempotency key returns the same run id. ``result`` raises :class:`~teamster.errors.RunFailed` -- carrying the
dead-letter reason -- when the run did not succeed, and :class:`~teamster.errors.RunTimeout` when it is still
going after ``timeout`` seconds. A Redis outage is a :class:`~teamster.errors.StoreUnavailable`. ``events`` follows a
run's journal live, as it is written (:meth:`Client.events`); asyncio applications use
:class:`~teamster.orchestrator.aclient.AsyncClient`.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from pydantic import BaseModel

from teamster.agents.limits import RunBudget
from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings, get_settings
from teamster.errors import (
    ConfigurationError,
    DeadLetterNotFound,
    InvalidInput,
    RunFailed,
    RunNotFound,
    RunTimeout,
    StoreDataLost,
    StoreUnavailable,
    TeamsterError,
)
from teamster.orchestrator.connection import redis_client
from teamster.orchestrator.dlq import DeadLetterQueue
from teamster.orchestrator.enqueue import CeleryEnqueuer
from teamster.orchestrator.models import RUN_TERMINAL, RUN_WAITING, JournalEvent, RunRecord, RunStatus, StepRecord
from teamster.orchestrator.progress import BATCH, Follower, Until
from teamster.orchestrator.replay import ReplayReport, replay_run
from teamster.orchestrator.runtime import Enqueuer, Runtime
from teamster.orchestrator.transitions import Transitions
from teamster.orchestrator.watchdog import Watchdog
from teamster.orchestrator.workflow import Workflow, get_workflow

__all__ = ["Client", "default_client", "submit", "status", "result", "cancel", "load_workflow_modules",
           "settled_result"]

F = TypeVar("F", bound=Callable[..., Any])

_LOADED: set[str] = set()


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "?"


def load_workflow_modules(settings: TeamsterSettings, modules: list[str] | None = None) -> None:
    """Import the workflow modules (``TEAMSTER_WORKFLOW_MODULES`` unless ``modules`` is given): registers their
    agents and workflows.

    Modules are found the way ``celery -A`` finds an app: the current directory comes first on ``sys.path``, so a
    workflow module next to the command works for the worker, ``submit``, ``doctor`` and the client alike.

    Raises:
        ConfigurationError: a module cannot be imported (the message names it and the import error).
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for module in settings.workflow_modules if modules is None else modules:
        if module in _LOADED:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import workflow module {module!r}: {exc}",
                                     hint="Check TEAMSTER_WORKFLOW_MODULES (comma-separated module names, importable "
                                          "from the current directory or the environment).") from exc
        _LOADED.add(module)


def _store_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(self: Client, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        except (RunNotFound, DeadLetterNotFound) as exc:
            raise self.explain_missing(exc) from None

    return wrapper  # type: ignore[return-value]


class Client:
    """A connection to one teamster deployment (Redis URL and key prefix from settings).

    Args:
        settings: Settings (default: from the environment).
        redis_url: Override the Redis URL (default: settings, or the embedded development server).
        load_modules: Import ``TEAMSTER_WORKFLOW_MODULES`` now (default True).
    """

    def __init__(self, settings: TeamsterSettings | None = None, *, redis_url: str | None = None,
                 load_modules: bool = True, enqueuer: Enqueuer | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis_url = redis_url or resolve_redis_url(self.settings)
        if load_modules:
            load_workflow_modules(self.settings)
        self._enqueuer = enqueuer
        self._runtime: Runtime | None = None
        self._seen_epoch: float | None = None
        self._lock = threading.Lock()

    @property
    def runtime(self) -> Runtime:
        """The deployment this client talks to (store, journal, settings, how steps are sent)."""
        with self._lock:
            if self._runtime is None:
                enqueuer = self._enqueuer if self._enqueuer is not None else \
                    CeleryEnqueuer.for_settings(self.settings, self.redis_url)
                self._runtime = Runtime(self.settings, redis_client(self.settings, self.redis_url), enqueuer,
                                        worker="client", redis_url=self.redis_url)
                try:
                    self._seen_epoch = self._runtime.store.epoch()
                except redis.RedisError:
                    self._seen_epoch = None
            return self._runtime

    def explain_missing(self, error: TeamsterError) -> TeamsterError:
        """A "not found" said with what Redis knows: when the data teamster wrote is gone (Redis restarted without
        persistence, or was flushed) that is :class:`StoreDataLost`, saying since when; otherwise ``error``, with
        when this Redis's teamster data begins."""
        epoch = self.runtime.store.epoch()
        key = self.runtime.keys.epoch
        if epoch is None:
            return StoreDataLost(
                f"{error.message}: this Redis holds no teamster data under prefix {self.settings.key_prefix!r} "
                f"(its marker {key} is missing): Redis was restarted without persistence or flushed"
                + (f" since this client saw it at {_when(self._seen_epoch)}" if self._seen_epoch else "")
                + " -- or TEAMSTER_REDIS_URL / TEAMSTER_KEY_PREFIX point at another deployment", **error.details)
        if self._seen_epoch is not None and abs(epoch - self._seen_epoch) > 1e-6:
            return StoreDataLost(f"{error.message}: Redis lost teamster's data after {_when(self._seen_epoch)}; "
                                 f"what it holds now begins at {_when(epoch)}", **error.details)
        error.message = f"{error.message} (teamster's data in this Redis begins at {_when(epoch)})"
        error.args = (error.message,)
        return error

    @property
    def dlq(self) -> DeadLetterQueue:
        """The dead-letter queue."""
        return DeadLetterQueue(self.runtime, self.explain_missing)

    def watchdog(self) -> Watchdog:
        """A watchdog bound to this deployment."""
        return Watchdog(self.runtime)

    # ------------------------------------------------------------------ apps
    @_store_errors
    def submit(self, workflow: Workflow | str, input: Any, *, idempotency_key: str | None = None,  # noqa: A002
               budget: RunBudget | None = None) -> str:
        """Validate ``input`` and start a run; returns its id (the same id again for the same key).

        ``budget`` caps what this run may spend (model calls, tokens, cost), instead of the workflow's budget.

        Raises:
            UnknownWorkflow: no such workflow.
            InvalidInput: the input does not match the workflow's input model (nothing was written).
            PayloadRejected: the input is too large or not JSON.
            IdempotencyConflict: the key was used before with another input.
            StoreUnavailable: Redis is down (nothing was written).
        """
        wf = workflow if isinstance(workflow, Workflow) else get_workflow(workflow)
        if budget is not None and not isinstance(budget, RunBudget):
            raise InvalidInput(f"budget must be a teamster.RunBudget, not {type(budget).__name__}")
        run_id, _created = Transitions(self.runtime).create_run(wf, input, idempotency_key, budget)
        return run_id

    @_store_errors
    def status(self, run_id: str) -> RunRecord:
        """The run record (status, error with its dead-letter entry, output when succeeded).

        Raises:
            RunNotFound: no such run.
        """
        return self.runtime.store.get_run(run_id)

    @_store_errors
    def steps(self, run_id: str) -> list[StepRecord]:
        """The run's step records in queue order."""
        self.runtime.store.get_run(run_id)
        return self.runtime.store.steps(run_id)

    @_store_errors
    def result(self, run_id: str, timeout: float | None = 60.0, *, poll: float = 0.05) -> BaseModel:
        """Wait for the run's output (an instance of the workflow's output model).

        Raises:
            RunFailed: the run failed, was cancelled, or waits for an operator (escalated / needs_human);
                ``reason`` holds the dead-letter error.
            RunTimeout: still running after ``timeout`` seconds (the run goes on).
            RunNotFound: no such run.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            run = self.runtime.store.get_run(run_id)
            output = settled_result(run)
            if output is not None:
                return output
            if deadline is not None and time.monotonic() >= deadline:
                raise RunTimeout(f"run {run_id} is still {run.status.value} after {timeout}s", run_id=run_id)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def events(self, run_id: str, *, after: str | None = None, types: list[str] | None = None,
               until: Until = "settled", timeout: float | None = None) -> Iterator[JournalEvent]:
        """Follow the run's journal live: every event already written, then each new one as it is written.

        Example:
            >>> for event in client.events(run_id):
            ...     print(event.id, event.type, event.step)
            >>> client.status(run_id).status  # settled: succeeded, failed, cancelled, escalated or needs_human

        New events are waited for with ``XREAD BLOCK`` (no polling); the iterator holds one pooled Redis
        connection while it waits. It stops after the event that settled the run, judged by the run record's
        status (see :mod:`teamster.orchestrator.progress`); events a parallel branch writes after that may follow
        it. Payloads are redacted as they were journaled.

        Args:
            run_id: The run.
            after: Resume after this event id (the last ``JournalEvent.id`` received): yields exactly the events
                that follow it (None: from the first event).
            types: Only events of these types (None: every type); the stop condition still sees every event.
            until: ``"settled"`` (default): stop once the run is final or waits for an operator (escalated,
                needs_human) -- when :meth:`result` would return or raise. ``"final"``: only when it succeeded,
                failed or was cancelled (an operator's retry or resolution continues the stream). None: never
                stop (until ``timeout``, or until you stop iterating).
            timeout: Seconds, from the first read, to follow the run before giving up with :class:`RunTimeout`
                (None: no limit). It raises rather than just stopping, like :meth:`result`, so that an iteration
                that ends always means ``until`` was met; the error's ``details["last_event_id"]`` resumes it.

        Raises:
            RunNotFound: no such run (raised by this call).
            InvalidInput: ``after`` is not an event id, or ``until`` / ``timeout`` is invalid (raised by this call).
            RunTimeout: ``timeout`` passed first (raised by the iterator; the run goes on).
            StoreUnavailable: Redis cannot be reached.
        """
        follower = Follower(self.runtime.keys, run_id, after=after, types=types, until=until, timeout=timeout)
        self.status(run_id)
        return self._follow(follower)

    def _follow(self, follower: Follower) -> Iterator[JournalEvent]:
        client = self.runtime.client
        try:
            while True:
                pipe = client.pipeline(transaction=True)
                follower.snapshot(pipe)
                yield from follower.take_snapshot(pipe.execute())
                if follower.done:
                    return
                if follower.more:
                    continue
                streams, block_ms = follower.xread_args()
                yield from follower.take_block(client.xread(streams, count=BATCH, block=block_ms))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        except RunNotFound as exc:
            raise self.explain_missing(exc) from None

    @_store_errors
    def cancel(self, run_id: str, *, reason: str = "cancelled by client", by: str = "client") -> RunRecord:
        """Cancel a run; steps not yet finished end as ``cancelled`` with the reason, and so do its child runs that
        are not final (recursively, in the same transaction). Cancelling a child run wakes its parent's step, which
        fails with ``child_run_failed``."""
        return Transitions(self.runtime).cancel_run(run_id, by=by, reason=reason)

    # ------------------------------------------------------------------ operators
    @_store_errors
    def set_budget(self, run_id: str, budget: RunBudget | None, *, by: str = "operator",
                   reason: str = "budget changed") -> RunRecord:
        """Replace a run's budget (None: unbounded); steps that start afterwards use it. Journaled with who and why.

        Raises:
            RunNotFound: no such run.
            InvalidOperation: the run is already final.
        """
        if budget is not None and not isinstance(budget, RunBudget):
            raise InvalidInput(f"budget must be a teamster.RunBudget or None, not {type(budget).__name__}")
        return Transitions(self.runtime).set_budget(run_id, budget, by=by, reason=reason)

    def spend(self, run_id: str) -> dict[str, float]:
        """What a run spent so far across all its steps: ``model_calls``, ``tokens``, ``cost``."""
        self.status(run_id)
        return self.runtime.store.run_spend(run_id)

    @_store_errors
    def runs(self, *, limit: int = 50, status: list[str] | None = None, workflow: str | None = None) -> list[RunRecord]:
        """Recent runs, newest first."""
        return self.runtime.store.list_runs(limit=limit, status=status, workflow=workflow)

    @_store_errors
    def journal(self, run_id: str, *, step: str | None = None, types: list[str] | None = None) -> list[JournalEvent]:
        """The run's journal in order."""
        self.runtime.store.get_run(run_id)
        return self.runtime.journal.read(run_id, step=step, types=types)

    @_store_errors
    def replay(self, run_id: str) -> ReplayReport:
        """Replay the run offline from its journal (zero model calls) and report differences."""
        return replay_run(self.runtime, run_id)

    @_store_errors
    def ping(self) -> bool:
        """True when Redis answers."""
        return bool(self.runtime.client.ping())


def settled_result(run: RunRecord) -> BaseModel | None:
    """The output of a succeeded run (its workflow's output model); None while the run is neither final nor
    waiting for an operator.

    Raises:
        RunFailed: the run failed, was cancelled, or waits for an operator (escalated / needs_human); ``reason``
            holds the dead-letter error.
    """
    if run.status == RunStatus.SUCCEEDED:
        return get_workflow(run.workflow, run.workflow_module).result_model.model_validate(run.output or {})
    if run.status in RUN_TERMINAL or run.status in RUN_WAITING:
        error = run.error or {}
        hint = ("An operator can act on it: `teamster dlq show " + str(error.get("dlq_entry")) + "`"
                if error.get("dlq_entry") else "")
        raise RunFailed(f"run {run.run_id} is {run.status.value}: {error.get('error_type', '?')}: "
                        f"{error.get('message', '')}", run_id=run.run_id, status=run.status.value,
                        reason=error, hint=hint)
    return None


_DEFAULT: Client | None = None
_DEFAULT_LOCK = threading.Lock()


def default_client() -> Client:
    """The process-wide client built from the environment (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Client()
        return _DEFAULT


def submit(workflow: Workflow | str, input: Any, *, idempotency_key: str | None = None,  # noqa: A002
           budget: RunBudget | None = None) -> str:
    """Start a run with the default client (see :meth:`Client.submit`)."""
    return default_client().submit(workflow, input, idempotency_key=idempotency_key, budget=budget)


def status(run_id: str) -> RunRecord:
    """A run's record with the default client (see :meth:`Client.status`)."""
    return default_client().status(run_id)


def result(run_id: str, timeout: float | None = 60.0) -> BaseModel:
    """Wait for a run's output with the default client (see :meth:`Client.result`)."""
    return default_client().result(run_id, timeout)


def cancel(run_id: str, *, reason: str = "cancelled by client") -> RunRecord:
    """Cancel a run with the default client (see :meth:`Client.cancel`)."""
    return default_client().cancel(run_id, reason=reason)
