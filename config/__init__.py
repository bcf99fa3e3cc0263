"""Typed settings, the Celery configuration built from them and the embedded development Redis (internal package
``teamster.config``). Errors live in :mod:`teamster.errors`.
"""

__all__: list[str] = []
