"""The Celery app and its thin tasks: validate the payload, call into orchestrator/agents, return JSON.

Import :mod:`teamster.tasks.app` for the application object; importing this package alone has no side effects.
"""

__all__: list[str] = []
