"""Redis connections for teamster processes: one pool per process and URL, sized to the worker's concurrency.

redis-py's default pool holds at most 100 connections and fails with ``Too many connections`` beyond that; a
worker running hundreds of steps at once would lose commits and lease renewals to it. teamster's pool is a
``BlockingConnectionPool`` sized to the worker's concurrency (plus room for the lease keeper, the watchdog and
metrics): when every connection is busy, a command waits for one (``TEAMSTER_REDIS_POOL_TIMEOUT``) instead of
failing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings
from teamster.errors import StoreUnavailable

__all__ = ["redis_client", "retrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@functools.lru_cache(maxsize=8)
def _client(url: str, max_connections: int, pool_timeout: float) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=30,
        retry_on_timeout=True,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


def redis_client(settings: TeamsterSettings, url: str | None = None) -> redis.Redis:
    """The process-wide Redis client for ``settings`` (``decode_responses=True``)."""
    return _client(url or resolve_redis_url(settings), settings.redis_pool_size, settings.redis_pool_timeout)


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
