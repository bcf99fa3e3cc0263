"""Typed settings, the Celery configuration built from them, the error hierarchy and the embedded Redis."""

from config.celeryconfig import build_celery_config
from config.embedded import EmbeddedRedis, resolve_redis_url
from config.settings import TeamsterSettings, get_settings, load_settings

__all__ = [
    "TeamsterSettings",
    "get_settings",
    "load_settings",
    "build_celery_config",
    "EmbeddedRedis",
    "resolve_redis_url",
]
