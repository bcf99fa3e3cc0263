"""Redis connections for teamster processes (one pool per process and URL)."""

from __future__ import annotations

import functools

import redis

from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings

__all__ = ["redis_client"]


@functools.lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=30,
        retry_on_timeout=True,
        health_check_interval=30,
    )


def redis_client(settings: TeamsterSettings, url: str | None = None) -> redis.Redis:
    """The process-wide Redis client for ``settings`` (``decode_responses=True``)."""
    return _client(url or resolve_redis_url(settings))
