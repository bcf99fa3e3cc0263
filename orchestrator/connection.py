"""Redis connections for teamster processes: one pool per process and URL, sized to the worker's concurrency.

redis-py's default pool holds at most 100 connections and fails with ``Too many connections`` beyond that; a
worker running hundreds of steps at once would lose commits and lease renewals to it. teamster's pool is a
``BlockingConnectionPool`` sized to the worker's concurrency (plus room for the lease keeper, the watchdog and
metrics): when every connection is busy, a command waits for one (``TEAMSTER_REDIS_POOL_TIMEOUT``) instead of
failing.
"""

from __future__ import annotations

import functools

import redis

from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings

__all__ = ["redis_client"]


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
