"""What every part of the orchestrator works against: settings, the Redis client, the store, the journal and a
way to send step messages -- built once per process, passed explicitly.

The step executor, the transitions, the dead-letter queue, the watchdog, replay and the client each take a
:class:`Runtime`; none of them reaches through another (dependencies point one way: executor, dead-letter queue
and watchdog -> transitions -> store, journal, planner).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Protocol

import redis

from teamster.config.settings import TeamsterSettings
from teamster.orchestrator.journal import Journal
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.store import RunStore

__all__ = ["Runtime", "Enqueuer", "worker_name"]


class Enqueuer(Protocol):
    """Sends step messages (Celery in production: :class:`~teamster.orchestrator.enqueue.CeleryEnqueuer`;
    an in-process queue in :mod:`teamster.testing`)."""

    def enqueue(self, run_id: str, step_key: str, countdown: float | None = None,
                label: str | None = None) -> None: ...


def worker_name() -> str:
    """``host:pid``: what claims and dead-letter entries record as the worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Runtime:
    """One deployment as seen from one process.

    Attributes:
        settings: teamster settings.
        client: Redis client (``decode_responses=True``).
        enqueuer: Sends step messages.
        worker: Name recorded on claims (default ``host:pid``).
    """

    settings: TeamsterSettings
    client: redis.Redis
    enqueuer: Enqueuer
    worker: str = field(default_factory=worker_name)

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.key_prefix)
        self.store = RunStore(self.client, self.keys, retry_seconds=self.settings.store_retry_seconds)
        self.journal = Journal(self.client, self.keys, payload_cap=self.settings.journal_payload_cap,
                               model_response_cap=self.settings.journal_model_response_cap,
                               redact_patterns=self.settings.redact_patterns)
