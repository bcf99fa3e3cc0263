"""Redis connections for teamster processes: one pool per process and URL, sized to the worker's concurrency.

redis-py's default pool holds at most 100 connections and fails with ``Too many connections`` beyond that; a
worker running hundreds of steps at once would lose commits and lease renewals to it. teamster's pool is a
``BlockingConnectionPool`` sized to the worker's concurrency (plus room for the lease keeper, the watchdog and
metrics): when every connection is busy, a command waits for one (``TEAMSTER_REDIS_POOL_TIMEOUT``) instead of
failing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis

from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings
from teamster.errors import StoreUnavailable

__all__ = ["redis_client", "pool_options", "retrying", "aretrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def pool_options(settings: TeamsterSettings) -> dict[str, Any]:
    """Options of every teamster connection pool, sync or asyncio (``BlockingConnectionPool.from_url``): sized to the
    worker's concurrency, waiting ``TEAMSTER_REDIS_POOL_TIMEOUT`` for a free connection, ``decode_responses=True``."""
    return {"max_connections": settings.redis_pool_size, "timeout": settings.redis_pool_timeout,
            "decode_responses": True, "socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30}


@functools.lru_cache(maxsize=8)
def _client(url: str, options: tuple[tuple[str, Any], ...]) -> redis.Redis:
    # store writes and journal appends are guarded or harmless to repeat, so a timed-out command may be re-sent
    pool = redis.BlockingConnectionPool.from_url(url, retry_on_timeout=True, **dict(options))
    return redis.Redis(connection_pool=pool)


def redis_client(settings: TeamsterSettings, url: str | None = None) -> redis.Redis:
    """The process-wide Redis client for ``settings`` (``decode_responses=True``)."""
    return _client(url or resolve_redis_url(settings), tuple(sorted(pool_options(settings).items())))


_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
"""Redis errors worth retrying: connection refused or reset, timeouts, no free connection in the pool (sync and
asyncio clients raise the same classes)."""


class _Backoff:
    """The retry policy of :func:`retrying` and :func:`aretrying`: pauses from 50 ms doubling up to 2 s, for at most
    ``seconds`` in all; each retry is logged."""

    def __init__(self, seconds: float, what: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.delay = 0.05
        self.what = what

    def pause(self, exc: Exception) -> float:
        """The pause before the next try after ``exc``.

        Raises:
            StoreUnavailable: the next try would start past the deadline.
        """
        if time.monotonic() + self.delay > self.deadline:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        log.warning("%s failed (%s); retrying in %.2fs", self.what, exc, self.delay)
        pause, self.delay = self.delay, min(self.delay * 2, 2.0)
        return pause


def retrying(call: Callable[[], T], seconds: float, what: str) -> T:
    """``call()``, retried with backoff through transient Redis errors (:data:`_TRANSIENT`) for up to ``seconds``;
    only for calls that are safe to repeat.

    Raises:
        StoreUnavailable: Redis stayed unreachable for ``seconds``.
    """
    backoff = _Backoff(seconds, what)
    while True:
        try:
            return call()
        except _TRANSIENT as exc:
            time.sleep(backoff.pause(exc))


async def aretrying(call: Callable[[], Awaitable[T]], seconds: float, what: str) -> T:
    """:func:`retrying` on an event loop: ``await call()``, with the same policy (the loop keeps running during the
    pauses); only for calls that are safe to repeat.

    Raises:
        StoreUnavailable: Redis stayed unreachable for ``seconds``.
    """
    backoff = _Backoff(seconds, what)
    while True:
        try:
            return await call()
        except _TRANSIENT as exc:
            await asyncio.sleep(backoff.pause(exc))
