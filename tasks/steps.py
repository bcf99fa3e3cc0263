"""The step task: validate the message, hand it to the engine, return JSON. No business logic here."""

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
from teamster.orchestrator.engine import Engine
from teamster.orchestrator.enqueue import CeleryEnqueuer
from teamster.orchestrator.models import StepMessage
from teamster.tasks.app import app

__all__ = ["step", "get_engine"]

_ENGINE: Engine | None = None
_LOCK = threading.Lock()


def get_engine() -> Engine:
    """This worker process's engine (built once; the engine itself is stateless)."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            settings = get_settings()
            url = app.conf.broker_url
            _ENGINE = Engine(settings, redis_client(settings, url), CeleryEnqueuer(app, settings))
        return _ENGINE


@app.task(
    bind=True,
    name=STEP_TASK,
    # The engine decides how often a step is attempted (per-step retry policy); Celery only delays.
    max_retries=None,
    # Redis unreachable for a moment: try again with backoff instead of losing the delivery.
    autoretry_for=(StoreUnavailable, redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
)
def step(self: Task, message: dict[str, Any]) -> dict[str, Any]:
    """Run one step of a run (idempotent: redelivery of a committed step calls no model).

    The message is validated explicitly against :class:`StepMessage` (rather than with Celery's
    ``pydantic=True``, whose ValidationError reaches clients without its field errors): an invalid message
    fails with :class:`~config.errors.InvalidInput` naming the fields, and nothing is written.
    """
    checked = validate_input(StepMessage, message, what="step message")
    assert isinstance(checked, StepMessage)
    result = get_engine().execute(checked.run_id, checked.step_key)
    if result.status == "retry" and result.retry_in is not None:
        raise self.retry(countdown=result.retry_in)
    return result.to_json()
