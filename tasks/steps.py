"""The step task: validate the message, hand it to the step executor, return JSON. No business logic here."""

from __future__ import annotations

import threading
from typing import Any

import redis
from celery import Task

from teamster.agents.loop import AgentLoop
from teamster.agents.runner import validate_input
from teamster.config.celeryconfig import STEP_TASK
from teamster.config.settings import get_settings
from teamster.errors import StoreUnavailable, TeamsterError, TerminalError, error_from_code
from teamster.orchestrator import metrics
from teamster.orchestrator.connection import redis_client
from teamster.orchestrator.enqueue import CeleryEnqueuer
from teamster.orchestrator.executor import StepExecutor
from teamster.orchestrator.models import Delivery, StepExecution, StepMessage
from teamster.orchestrator.runtime import Runtime
from teamster.tasks.app import app

__all__ = ["step", "get_runtime", "get_executor"]

_EXECUTOR: StepExecutor | None = None
_LOCK = threading.Lock()


def get_executor() -> StepExecutor:
    """This worker process's step executor (built once; it keeps the process's leases)."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            settings = get_settings()
            runtime = Runtime(settings, redis_client(settings, app.conf.broker_url), CeleryEnqueuer(app, settings),
                              redis_url=app.conf.broker_url)
            _EXECUTOR = StepExecutor(runtime)
        return _EXECUTOR


def get_runtime() -> Runtime:
    """This worker process's runtime."""
    return get_executor().rt


@app.task(
    bind=True,
    name=STEP_TASK,
    # The executor decides how often a step is attempted (per-step retry policy); Celery only delays.
    max_retries=None,
    # The run store holds every step's outcome; Flower gets each task's result and state from worker events. No
    # result backend writes (and no STARTED writes) per ordinary step: two round trips and a serialisation less.
    # Errors are still stored, so whoever sent a bad message gets its typed error back.
    ignore_result=True,
    store_errors_even_if_ignored=True,
    # A step that ends without success raises its typed reason: Celery marks the task FAILURE (Flower shows it as
    # failed, with the reason), acknowledges it (no redelivery) and logs it as expected, without a traceback.
    throws=(TeamsterError,),
    # Redis unreachable for longer than the store retries in place: try the delivery again with backoff.
    autoretry_for=(StoreUnavailable, redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
)
def step(self: Task, message: dict[str, Any]) -> dict[str, Any]:
    """Run one step of a run (idempotent: redelivery of a committed step calls no model).

    The message is validated explicitly against :class:`StepMessage` (rather than with Celery's
    ``pydantic=True``, whose ValidationError reaches clients without its field errors): an invalid message
    fails with :class:`~teamster.errors.InvalidInput` naming the fields, and nothing is written.

    What Celery (and Flower) see: a committed or skipped step is a SUCCESS whose result says what happened (no step
    data); a retried step is a RETRY whose reason is its typed error; a dead-lettered step is a FAILURE whose
    exception is its typed error, naming the dead-letter entry.
    """
    checked = validate_input(StepMessage, message, what="step message")
    assert isinstance(checked, StepMessage)
    executor = get_executor()
    with AgentLoop.shared().admission.slot() as waited:  # no more steps at once than the process serves
        if waited >= 0.001:  # it waited for a slot (not the microseconds of taking a free one)
            metrics.ADMISSION_WAIT_SECONDS.inc(waited)
        result = executor.execute(checked.run_id, checked.step_key)
    if result.status == Delivery.RETRY and result.retry_in is not None:
        raise self.retry(countdown=result.retry_in, exc=_typed(executor, result), shadow=self.request.shadow)
    if result.status == Delivery.DEAD_LETTERED:
        raise _typed(executor, result)
    reply = {key: value for key, value in result.to_json().items() if key != "outcome"}  # no step data
    if result.status == Delivery.MISSING and self.request.id:  # a message about no step: tell its sender
        self.backend.store_result(self.request.id, reply, "SUCCESS", request=self.request)
    return reply


def _typed(executor: StepExecutor, result: StepExecution) -> TeamsterError:
    """The step's typed reason as an exception (redacted: it is logged and shown in Flower)."""
    outcome = result.outcome or {}
    code = str(outcome.get("error_type") or outcome.get("kind") or "terminal_error")
    text = str(outcome.get("message") or outcome.get("reason") or outcome.get("question") or code)
    entry = result.detail.get("entry_id")
    if entry:
        text += f" (dead-letter entry {entry})"
    text = str(executor.journal.redact(text))
    error = error_from_code(code, f"{code}: {text}", run_id=result.run_id, step=result.step_key,
                            attempt=result.attempt, dead_letter_entry=entry)
    if isinstance(error, StoreUnavailable):  # would be auto-retried: the step already ended
        return TerminalError(f"{code}: {text}", run_id=result.run_id, step=result.step_key)
    return error
