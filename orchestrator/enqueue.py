"""Sending step messages through Celery (deterministic task ids ``run_id:step_key``)."""

from __future__ import annotations

from celery import Celery

from teamster.config.celeryconfig import STEP_TASK
from teamster.config.settings import TeamsterSettings
from teamster.orchestrator.models import StepMessage

__all__ = ["CeleryEnqueuer", "producer_app"]


class CeleryEnqueuer:
    """Implements :class:`~teamster.orchestrator.runtime.Enqueuer` with ``send_task`` (JSON kwargs, steps queue)."""

    def __init__(self, app: Celery, settings: TeamsterSettings) -> None:
        self.app = app
        self.queue = settings.steps_queue

    @classmethod
    def for_settings(cls, settings: TeamsterSettings, redis_url: str) -> CeleryEnqueuer:
        """An enqueuer on a send-only Celery app (clients)."""
        return cls(producer_app(settings, redis_url), settings)

    def enqueue(self, run_id: str, step_key: str, countdown: float | None = None,
                label: str | None = None) -> None:
        """Send one step message. ``label`` (``workflow.step_id[:agent]``) becomes the task's shadow name: Flower
        and the worker log show (and filter by) it instead of the generic ``teamster.step``."""
        kwargs = {"message": StepMessage(run_id=run_id, step_key=step_key).model_dump()}
        # ignore_result: nobody waits on a step task's Celery result (the run store has the outcome). Without it,
        # Celery's Redis backend subscribes to the result channel for every message sent, and the AsyncResult's
        # finalizer unsubscribes -- network I/O at whatever point the garbage collector runs (a Ctrl-C arriving
        # there is swallowed as "Exception ignored in __del__"). Errors are still stored for their senders.
        # argsrepr/kwargsrepr (what Flower and the worker log show as the task's arguments): Celery computes them
        # with its saferepr (~25 us a message); for two short strings (a run id and step key are capped well below
        # its 1,024 characters) repr() gives the same text.
        self.app.send_task(STEP_TASK, kwargs=kwargs, task_id=f"{run_id}:{step_key}", queue=self.queue,
                           countdown=countdown, shadow=label, ignore_result=True, argsrepr="()",
                           kwargsrepr=repr(kwargs))


def producer_app(settings: TeamsterSettings, redis_url: str) -> Celery:
    """A Celery app that only sends messages (clients: no task modules, no worker configuration needed)."""
    from teamster.config.celeryconfig import build_celery_config  # noqa: PLC0415

    conf = build_celery_config(settings, redis_url)
    app = Celery("teamster-client")
    app.conf.update(conf)
    return app
