"""Control tasks: health ping, run starts from plain Celery clients, the watchdog scan (celery beat)."""

from __future__ import annotations

import os
import socket
from typing import Any

from teamster.agents.runner import validate_input
from teamster.config.celeryconfig import PING_TASK, START_RUN_TASK, WATCHDOG_TASK
from teamster.orchestrator.models import StartRunMessage
from teamster.orchestrator.transitions import Transitions
from teamster.orchestrator.watchdog import Watchdog
from teamster.orchestrator.workflow import get_workflow
from teamster.tasks.app import app
from teamster.tasks.steps import get_runtime

__all__ = ["ping", "start_run", "watchdog"]


@app.task(name=PING_TASK)
def ping() -> dict[str, Any]:
    """Answer with the worker's host and pid: proves a worker consumes the control queue end to end."""
    return {"pong": True, "host": socket.gethostname(), "pid": os.getpid()}


@app.task(name=START_RUN_TASK)
def start_run(message: dict[str, Any]) -> dict[str, Any]:
    """Start a run from any Celery client: ``send_task("teamster.start_run", kwargs={"message": {...}})``.

    The input is validated exactly as ``submit`` validates it; an invalid input fails this task with the
    validation error (:class:`~config.errors.InvalidInput`, naming the fields) and writes nothing.
    """
    checked = validate_input(StartRunMessage, message, what="start_run message")
    assert isinstance(checked, StartRunMessage)
    run_id, created = Transitions(get_runtime()).create_run(get_workflow(checked.workflow), checked.input,
                                                            checked.idempotency_key)
    return {"run_id": run_id, "created": created}


@app.task(name=WATCHDOG_TASK)
def watchdog() -> dict[str, int]:
    """One watchdog scan (scheduled by celery beat every TEAMSTER_WATCHDOG_INTERVAL_SECONDS)."""
    return Watchdog(get_runtime()).scan().as_dict()
