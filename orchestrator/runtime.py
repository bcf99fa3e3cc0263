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
from urllib.parse import quote

import redis

from teamster.config.settings import TeamsterSettings
from teamster.orchestrator.journal import Journal
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.limits import Limiter
from teamster.orchestrator.store import RunStore

__all__ = ["Runtime", "Enqueuer", "worker_name", "url_of"]


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
        redis_url: The URL ``client`` connects to (default: read from ``client``); the limiter's async client
            uses it.
    """

    settings: TeamsterSettings
    client: redis.Redis
    enqueuer: Enqueuer
    worker: str = field(default_factory=worker_name)
    redis_url: str | None = None

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.key_prefix)
        self.store = RunStore(self.client, self.keys, retry_seconds=self.settings.store_retry_seconds)
        self.journal = Journal(self.client, self.keys, payload_cap=self.settings.journal_payload_cap,
                               model_response_cap=self.settings.journal_model_response_cap,
                               redact_patterns=self.settings.redact_patterns,
                               retry_seconds=self.settings.store_retry_seconds)
        self._limiter: Limiter | None = None

    @property
    def limiter(self) -> Limiter:
        """Provider limits, cool-downs and run budgets shared through Redis (built on first use)."""
        if self._limiter is None:
            self._limiter = Limiter(self.settings, self.redis_url or url_of(self.client))
        return self._limiter


def url_of(client: redis.Redis) -> str:
    """The URL a redis-py client connects to (TCP, TLS or a Unix socket)."""
    kwargs = client.connection_pool.connection_kwargs
    auth = ""
    if kwargs.get("password"):
        auth = f"{quote(str(kwargs.get('username') or ''))}:{quote(str(kwargs['password']))}@"
    db = int(kwargs.get("db") or 0)
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"

