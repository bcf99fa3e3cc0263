"""The step task: validate the message, hand it to the step executor, return JSON. No business logic here."""

from __future__ import annotations

import threading
from typing import Any

import redis
from celery import Task

from teamster.agents.runner import validate_input
from teamster.config.celeryconfig import STEP_TASK
from teamster.config.settings import get_settings
from teamster.errors import StoreUnavailable
from teamster.orchestrator.connection import redis_client
from teamster.orchestrator.enqueue import CeleryEnqueuer
from teamster.orchestrator.executor import StepExecutor
from teamster.orchestrator.models import Delivery, StepMessage
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
            runtime = Runtime(settings, redis_client(settings, app.conf.broker_url), CeleryEnqueuer(app, settings))
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
    """
    checked = validate_input(StepMessage, message, what="step message")
    assert isinstance(checked, StepMessage)
    result = get_executor().execute(checked.run_id, checked.step_key)
    if result.status == Delivery.RETRY and result.retry_in is not None:
        raise self.retry(countdown=result.retry_in)
    reply = result.to_json()
    if result.status == Delivery.MISSING and self.request.id:  # a message about no step: tell its sender
        self.backend.store_result(self.request.id, reply, "SUCCESS", request=self.request)
    return reply
