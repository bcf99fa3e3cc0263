"""The Celery application that ``celery -A teamster.tasks.app worker`` and ``celery -A teamster.tasks.app flower`` load.

The app is configured from :mod:`config` (JSON only, late acks, no prefetch, events on). When
``TEAMSTER_REDIS_URL`` is not set, loading it starts (or reuses) the embedded development Redis.
"""

from __future__ import annotations

from celery import Celery

from teamster.config.celeryconfig import build_celery_config
from teamster.config.embedded import resolve_redis_url
from teamster.config.settings import TeamsterSettings, get_settings

__all__ = ["app", "create_app"]

TASK_MODULES = ["teamster.tasks.control", "teamster.tasks.steps", "teamster.tasks.signals"]


def create_app(settings: TeamsterSettings | None = None, redis_url: str | None = None) -> Celery:
    """Build a configured Celery app.

    Args:
        settings: Settings to use (default: from the environment).
        redis_url: Broker URL; resolved from settings (possibly starting the embedded Redis) when None.
    """
    settings = settings or get_settings()
    url = redis_url or resolve_redis_url(settings)
    celery_app = Celery("teamster", include=TASK_MODULES)
    celery_app.conf.update(build_celery_config(settings, url))
    return celery_app


app = create_app()
