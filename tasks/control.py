"""Control tasks: health ping (and, later, run starts from plain Celery clients and the watchdog)."""

from __future__ import annotations

import os
import socket
from typing import Any

from config.celeryconfig import PING_TASK
from tasks.app import app

__all__ = ["ping"]


@app.task(name=PING_TASK)
def ping() -> dict[str, Any]:
    """Answer with the worker's host and pid: proves a worker consumes the control queue end to end."""
    return {"pong": True, "host": socket.gethostname(), "pid": os.getpid()}
