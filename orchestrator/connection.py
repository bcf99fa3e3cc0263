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


async def aretrying(call: Callable[[], Awaitable[T]], seconds: float, what: str) -> T:
    """:func:`retrying` on an event loop: ``await call()``, retried with backoff through the same transient errors for
    up to ``seconds`` (the loop keeps running meanwhile); only for calls that are safe to repeat.

    Raises:
        StoreUnavailable: Redis stayed unreachable for ``seconds``.
    """
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        try:
            return await call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
            log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def retrying(call: Callable[[], T], seconds: float, what: str) -> T:
    """``call()``, retried with backoff through transient Redis errors (connection refused or reset, timeouts, no
    free connection in the pool) for up to ``seconds``; only for calls that are safe to repeat.

    Raises:
        StoreUnavailable: Redis stayed unreachable for ``seconds``.
    """
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
            log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
