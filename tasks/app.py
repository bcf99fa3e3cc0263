"""The Celery application that ``celery -A teamster.tasks.app worker`` (and ``teamster worker``) loads.

The app is configured from :mod:`teamster.config` (JSON only, late acks, no prefetch, events on). Its
configuration is lazy (Celery's ``add_defaults``): importing this module builds nothing and starts nothing; the
settings are read, and the Redis URL resolved (which may start the embedded development Redis when
``TEAMSTER_REDIS_URL`` is not set), the first time the app's configuration is used -- by a worker, Flower, or a
task being sent.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from teamster.config.celeryconfig import build_celery_config
from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings, get_settings

__all__ = ["app", "create_app"]

TASK_MODULES = ["teamster.tasks.control", "teamster.tasks.steps", "teamster.tasks.signals"]


def _configuration(settings: TeamsterSettings | None = None, redis_url: str | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    return build_celery_config(settings, redis_url or resolve_redis_url(settings))


def create_app(settings: TeamsterSettings | None = None, redis_url: str | None = None) -> Celery:
    """Build a configured Celery app (configured when first used).

    Args:
        settings: Settings to use (default: from the environment, when the app is first configured).
        redis_url: Broker URL; resolved from settings (possibly starting the embedded Redis) when None.
    """
    celery_app = Celery("teamster", include=TASK_MODULES)
    celery_app.add_defaults(lambda: _configuration(settings, redis_url))
    return celery_app


app = create_app()
