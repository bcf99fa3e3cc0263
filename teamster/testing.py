"""Test your agents and workflows in your own test suite, without worker processes.

:class:`WorkflowEnvironment` runs workflows to completion in the test's own process against a real Redis (an
embedded ``redis-server`` started for the test session unless ``TEAMSTER_REDIS_URL`` is set), with everything a
worker does -- claims, leases, journal, fenced commits, retries, dead-letter entries, escalations -- but step
messages go to an in-process queue that :meth:`~WorkflowEnvironment.drain` empties (like dramatiq's
``StubBroker.join`` or arq's burst worker). Agents run on the offline :class:`ScriptedModel`; give an agent a
script or a model per test with :meth:`~WorkflowEnvironment.override`. Real model requests are blocked: a step
that would call a real provider fails, and ``drain()`` raises :class:`~teamster.errors.ModelRequestBlocked`.

Example (pytest)::

    import pytest
    from teamster.testing import WorkflowEnvironment, finish, needs_human

    @pytest.fixture
    def env():
        with WorkflowEnvironment(modules=["myapp.workflows"]) as env:
            yield env

    def test_a_small_claim_is_approved(env):
        with env.override("claims_decide", script=[finish({"approve": True, "reason": "small"})]):
            run = env.run("claims", {"claim_id": "C-1", "text": "Policy P-1, 120 EUR"})
        assert run.status == "succeeded"

Each environment writes under its own key prefix, so tests never see each other's runs.
"""

from __future__ import annotations

import atexit
import contextlib
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel
from strands.models.model import Model

from teamster.agents.limits import RunBudget
from teamster.agents.providers import block_real_models, override_model
from teamster.agents.scripted import (
    FaultPlan,
    Script,
    ScriptContext,
    ScriptedModel,
    Turn,
    call,
    cannot_complete,
    finish,
    guardrail,
    invalid_json,
    needs_human,
    refuse,
    register_script,
    say,
    schema_invalid,
    set_call_observer,
    throttle,
    timeout,
)
from teamster.config.embedded import EmbeddedRedis
from teamster.config.settings import TeamsterSettings, get_settings, load_settings
from teamster.errors import ModelRequestBlocked
from teamster.orchestrator.client import Client, load_workflow_modules
from teamster.orchestrator.connection import redis_client
from teamster.orchestrator.executor import StepExecutor
from teamster.orchestrator.models import Delivery, RunRecord, StepExecution
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.watchdog import Watchdog, WatchdogReport
from teamster.orchestrator.workflow import Workflow

__all__ = [
    "WorkflowEnvironment",
    "InProcessQueue",
    "ScriptedModel",
    "ScriptContext",
    "Script",
    "Turn",
    "FaultPlan",
    "say",
    "call",
    "finish",
    "cannot_complete",
    "needs_human",
    "invalid_json",
    "schema_invalid",
    "refuse",
    "throttle",
    "timeout",
    "guardrail",
    "register_script",
    "record_model_calls",
    "model_calls_key",
]


class InProcessQueue:
    """An :class:`~teamster.orchestrator.runtime.Enqueuer` that keeps step messages in memory, in order."""

    def __init__(self) -> None:
        self.messages: deque[tuple[str, str]] = deque()
        self._lock = threading.Lock()

    def enqueue(self, run_id: str, step_key: str, countdown: float | None = None,
                label: str | None = None) -> None:
        with self._lock:
            self.messages.append((run_id, step_key))

    def pop(self) -> tuple[str, str] | None:
        """The oldest message, or None."""
        with self._lock:
            return self.messages.popleft() if self.messages else None

    def __len__(self) -> int:
        return len(self.messages)


def model_calls_key(key_prefix: str | None = None) -> str:
    """The Redis hash where :func:`record_model_calls` counts scripted model calls (field ``run_id:step_key``) for
    the deployment with ``key_prefix`` (default: ``TEAMSTER_KEY_PREFIX``)."""
    return f"{key_prefix or get_settings().key_prefix}:testing:model_calls"


def record_model_calls(settings: TeamsterSettings | None = None) -> None:
    """Count every scripted model call this process makes in a Redis hash, per ``run_id:step_key``.

    Call it from a module your test workers import (``TEAMSTER_WORKFLOW_MODULES``) to check, from the test, that a
    redelivered or recovered step called no model again; read the counts at :func:`model_calls_key`.
    """

    def count(ctx: ScriptContext) -> None:
        resolved = settings or get_settings()
        redis_client(resolved).hincrby(model_calls_key(resolved.key_prefix), f"{ctx.run_id}:{ctx.step_id}", 1)

    set_call_observer(count)


_SHARED: list[EmbeddedRedis] = []
_SHARED_LOCK = threading.Lock()


def _session_redis() -> str:
    """A private embedded ``redis-server`` for this process (started once, stopped at exit)."""
    with _SHARED_LOCK:
        if not _SHARED:
            server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="teamster-testing-")), appendonly=False)
            server.start()
            atexit.register(server.stop)
            _SHARED.append(server)
        return _SHARED[0].url


class WorkflowEnvironment:
    """Runs workflows in-process against a real Redis (see module docstring).

    Args:
        modules: Modules to import first (registering your agents and workflows).
        redis_url: Redis to use. Default: ``TEAMSTER_REDIS_URL`` if set, else an embedded ``redis-server`` shared
            by the environments of this process.
        block_model_requests: Refuse real model providers (default True): the test can never spend money or
            depend on the network by accident.
        **settings: Setting overrides (``TeamsterSettings`` fields, e.g. ``max_payload_bytes=1024``).
    """

    def __init__(self, modules: Sequence[str] = (), *, redis_url: str | None = None,
                 block_model_requests: bool = True, **settings: Any) -> None:
        self.modules = list(modules)
        self.block_model_requests = block_model_requests
        self._overrides = settings
        self._redis_url = redis_url
        self._stack = contextlib.ExitStack()
        self.queue = InProcessQueue()
        self.deliveries: list[StepExecution] = []
        self._client: Client | None = None
        self._executor: StepExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> WorkflowEnvironment:
        """Connect (starting the embedded Redis on first use) and import ``modules``."""
        if self._client is not None:
            return self
        base = load_settings()
        url = self._redis_url or base.redis_url or _session_redis()
        overrides: dict[str, Any] = {"model": "scripted", "workflow_modules": self.modules,
                                     "key_prefix": f"{base.key_prefix}-test-{uuid.uuid4().hex[:8]}"}
        overrides.update(self._overrides)
        overrides["redis_url"] = url
        settings = load_settings(**overrides)
        load_workflow_modules(settings)
        if self.block_model_requests:
            self._stack.enter_context(block_real_models("WorkflowEnvironment blocks real model requests"))
        self._client = Client(settings, redis_url=url, load_modules=False, enqueuer=self.queue)
        self._executor = StepExecutor(self._client.runtime)
        return self

    def close(self) -> None:
        """Delete this environment's keys and undo its overrides."""
        self._stack.close()
        if self._client is not None:
            client, prefix = self._client.runtime.client, self._client.settings.key_prefix
            batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(batch), 500):
                client.delete(*batch[i:i + 500])
            self._client = None
            self._executor = None

    def __enter__(self) -> WorkflowEnvironment:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ parts
    @property
    def client(self) -> Client:
        """A :class:`~teamster.Client` on this environment (its steps go to the in-process queue)."""
        if self._client is None:
            self.start()
        assert self._client is not None
        return self._client

    @property
    def runtime(self) -> Runtime:
        """Store, journal and settings of this environment."""
        return self.client.runtime

    @property
    def settings(self) -> TeamsterSettings:
        """The settings in effect."""
        return self.client.settings

    # ------------------------------------------------------------------ models
    @contextlib.contextmanager
    def override(self, agent: str = "*", *, script: Script | None = None,
                 model: Model | None = None) -> Iterator[ScriptedModel | Model]:
        """Run ``agent`` (``"*"``: every agent) on ``model``, or on a :class:`ScriptedModel` playing ``script``,
        inside the block. Yields the model (a scripted model records its calls in ``.calls``)."""
        if (script is None) == (model is None):
            raise ValueError("give exactly one of script= or model=")
        chosen: ScriptedModel | Model = model if model is not None else ScriptedModel(script, agent=agent)
        with override_model(agent, lambda: chosen):
            yield chosen

    # ------------------------------------------------------------------ running
    def submit(self, workflow: Workflow | str, input: Any, *,  # noqa: A002 - the natural name
               idempotency_key: str | None = None, budget: RunBudget | None = None) -> str:
        """Start a run (validated exactly as :func:`teamster.submit` does); its steps wait in :attr:`queue`."""
        return self.client.submit(workflow, input, idempotency_key=idempotency_key, budget=budget)

    def deliver(self, count: int = 1) -> list[StepExecution]:
        """Execute the next ``count`` queued step messages (fewer when the queue runs out), in this thread; returns
        what each did. For tests that look at a run mid-way, e.g. a child step parked while its child run has not
        started yet. Retries go back to the end of the queue, as in :meth:`drain`."""
        self.start()
        assert self._executor is not None
        done: list[StepExecution] = []
        while len(done) < count and (message := self.queue.pop()) is not None:
            result = self._executor.execute(*message)
            self.deliveries.append(result)
            done.append(result)
            if result.status == Delivery.RETRY:
                self.queue.enqueue(result.run_id, result.step_key)
        return done

    def drain(self, max_deliveries: int = 10_000) -> int:
        """Execute queued step messages in this thread until none is left; returns how many ran.

        Retries are delivered at once (their backoff is skipped). Every delivery's result is appended to
        :attr:`deliveries`.

        Raises:
            ModelRequestBlocked: a step asked for a real model provider (the step itself failed with it).
            RuntimeError: more than ``max_deliveries`` deliveries (a workflow that never settles).
        """
        self.start()
        assert self._executor is not None
        ran = 0
        blocked: list[str] = []
        while (message := self.queue.pop()) is not None:
            if ran >= max_deliveries:
                raise RuntimeError(f"drain() stopped after {max_deliveries} deliveries; is a step looping?")
            result = self._executor.execute(*message)
            self.deliveries.append(result)
            ran += 1
            if result.status == Delivery.RETRY:
                self.queue.enqueue(result.run_id, result.step_key)
            outcome = result.outcome or {}
            if outcome.get("error_type") == ModelRequestBlocked.code:
                blocked.append(str(outcome.get("message")))
        if blocked:
            raise ModelRequestBlocked(blocked[0])
        return ran

    def run(self, workflow: Workflow | str, input: Any, *,  # noqa: A002
            idempotency_key: str | None = None, budget: RunBudget | None = None) -> RunRecord:
        """Submit a run, drain the queue, and return the run's record (settled, unless it waits on a timer)."""
        run_id = self.submit(workflow, input, idempotency_key=idempotency_key, budget=budget)
        self.drain()
        return self.client.status(run_id)

    def result(self, run_id: str) -> BaseModel:
        """Drain, then return the run's typed output.

        Raises:
            RunFailed: the run did not succeed (with the dead-letter reason).
            RunTimeout: it is still running (e.g. waiting for a retry the queue does not hold).
        """
        self.drain()
        return self.client.result(run_id, timeout=0)

    def watchdog_scan(self) -> WatchdogReport:
        """One watchdog scan (steps it re-sends land in :attr:`queue`)."""
        return Watchdog(self.runtime).scan()
