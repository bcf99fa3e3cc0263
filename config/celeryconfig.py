"""The Celery configuration, built from :class:`~config.settings.TeamsterSettings`.

Every value that differs from Celery's default says why in a comment.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Queue

from teamster.config.settings import TeamsterSettings

__all__ = ["build_celery_config", "STEP_TASK", "START_RUN_TASK", "WATCHDOG_TASK", "PING_TASK"]

STEP_TASK = "teamster.step"
START_RUN_TASK = "teamster.start_run"
WATCHDOG_TASK = "teamster.watchdog"
PING_TASK = "teamster.ping"


def build_celery_config(settings: TeamsterSettings, redis_url: str) -> dict[str, Any]:
    """Return the Celery settings dict for this deployment.

    Args:
        settings: teamster settings.
        redis_url: The resolved Redis URL (broker and result backend).
    """
    # Celery's own keys (queues, unacked set, bindings, results) live under the same prefix as the
    # run store, so several deployments or test sessions can share one Redis without seeing each other.
    queue_prefix = f"{settings.key_prefix}:celery:"
    return {
        "broker_url": redis_url,
        # kombu's Redis transport, but a queue item that is not a message envelope is logged, counted and dropped
        # instead of ending the worker (see teamster/tasks/transport.py).
        "broker_transport": "teamster.tasks.transport:Transport",
        "result_backend": redis_url,
        # JSON only, both ways: pickle lets whoever can write to Redis run code on workers (invariant I5).
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge after the step ran, not when it was received: a worker killed mid-step leaves the
        # message unacknowledged so it is delivered again; the step lease decides who may commit.
        "task_acks_late": True,
        # With acks_late, a child process that dies (SIGKILL, OOM) requeues its message instead of
        # acknowledging it as failed.
        "task_reject_on_worker_lost": True,
        # One message at a time per free slot: agent steps are long, prefetching would park work on a busy
        # worker while others idle (and a killed worker would strand every prefetched message).
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": True,
        # Flower and `teamster runs show` can tell "queued" from "running".
        "task_track_started": True,
        "broker_transport_options": {
            # Redis redelivers unacked messages after this; it must exceed the longest retry countdown
            # (checked in settings) or ETA retries run twice. Killed steps are recovered sooner by the
            # watchdog through step leases, so this is only a backstop.
            "visibility_timeout": settings.visibility_timeout,
            "global_keyprefix": queue_prefix,
        },
        "result_backend_transport_options": {"global_keyprefix": queue_prefix},
        # One result backend per process, not one per thread: Celery builds a backend (a Redis client and its pool)
        # in each pool thread the first time that thread finishes a task -- with -c 500, 500 of them, each ~1-2 ms
        # of CPU (redis-py reads its own package metadata for every client) and a pool of its own. The backend's
        # Redis client is thread-safe; workers only write results.
        "result_backend_thread_safe": True,
        # Results are a convenience for Flower; the run store is the source of truth. Keep them a day.
        "result_expires": settings.result_expires,
        # Store task name, args and worker with results so Flower shows readable JSON.
        "result_extended": True,
        # A Redis blip while storing a result must not turn a committed step into an error.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        # Events on: Flower's live view needs them.
        "worker_send_task_events": True,
        # No task-sent events: they come from whatever process sends a step (a CLI, an app, a worker enqueueing a
        # successor) under a generic "gen<pid>" name, which Flower then lists -- and exports in /metrics -- as a
        # new worker, without bound. Queued steps are visible in the run store (`teamster runs show`).
        "task_send_sent_event": False,
        # Messages go to teamster's own queues, so teamster can share a broker with other Celery apps. A plain
        # `celery -A teamster.tasks.app worker` (no -Q) consumes both: step messages and run starts from other
        # Celery clients (teamster.start_run on the control queue).
        "task_default_queue": settings.steps_queue,
        "task_queues": (Queue(settings.steps_queue), Queue(settings.control_queue)),  # type: ignore[no-untyped-call]
        "task_routes": {
            STEP_TASK: {"queue": settings.steps_queue},
            START_RUN_TASK: {"queue": settings.control_queue},
            WATCHDOG_TASK: {"queue": settings.control_queue},
            PING_TASK: {"queue": settings.control_queue},
        },
        # Keep retrying the broker at start-up (compose starts workers and Redis together).
        "broker_connection_retry_on_startup": True,
        # On a lost broker connection, running acks_late tasks are redelivered; let them finish rather than
        # cancel them (the threads pool cannot cancel a running task anyway): the step lease decides which
        # copy commits, and the other is rejected by its fencing token.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Celery 5.7's consumer can exit when Redis drops while a step runs; this one survives it
        # (see tasks/consumer.py).
        "worker_consumer": "teamster.tasks.consumer:TeamsterConsumer",
        # Modules that register agents and workflows are imported by every worker at start-up -- by teamster's
        # worker_init handler (teamster/tasks/signals.py), not Celery's `imports`, so that a module that cannot be
        # imported stops the worker with one line instead of a traceback.
        # The watchdog runs under celery beat (`teamster watchdog` runs the same scan in a loop).
        "beat_schedule": {
            "teamster-watchdog": {
                "task": WATCHDOG_TASK,
                "schedule": settings.watchdog_interval_seconds,
                "options": {"expires": settings.watchdog_interval_seconds},
            }
        },
        "timezone": "UTC",
        "enable_utc": True,
    }
