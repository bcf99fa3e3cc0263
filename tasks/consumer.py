"""A Celery consumer that survives losing Redis while a step is running.

celery 5.7 / kombu 5.7, acks_late tasks on Redis: when the broker connection drops with a task in flight,

1. ``Consumer.on_connection_error_after_connected`` calls ``connection.collect()`` -- which detaches the
   transport but can leave the default channel open -- and then ``ignore_errors(connection, connection.close)``;
   closing that channel tries to restore the unacknowledged message through the detached transport and raises
   ``AttributeError``, which ``ignore_errors`` does not catch;
2. when the in-flight task later finishes, its late acknowledgement goes to the dead channel of the old
   connection and raises the same ``AttributeError`` inside the event loop.

Either one ends the worker ("Unrecoverable error"). This consumer makes the close best-effort and turns the
acknowledgements of messages received on the lost connection into no-ops (their delivery tags died with it).
Nothing is lost: the message stays in Redis's unacked set and is restored (or redelivered), the step's lease
decides who commits, and a committed step is never run twice. Found by the fault-injection suite
(tests/test_chaos.py::test_a_worker_survives_a_redis_restart_with_a_step_in_flight).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state
from celery.worker.consumer import Consumer

__all__ = ["TeamsterConsumer"]

log = logging.getLogger(__name__)


def _orphan(message: Any) -> None:
    """Make a message of the lost connection ignore its acknowledgement (its delivery tag is gone)."""

    def dropped(*_args: Any, **_kwargs: Any) -> None:
        log.info("not acknowledging message %s: it was received on a lost broker connection",
                 getattr(message, "delivery_tag", "?"))

    message.ack = dropped
    message.reject = dropped
    message.requeue = dropped


class TeamsterConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, hardened against a broker outage with tasks in flight (see module docstring)."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        for request in tuple(state.active_requests) + tuple(state.reserved_requests):
            message = getattr(request, "message", None)
            if message is not None:
                _orphan(message)
        connection = self.connection
        if connection is not None:
            close = connection.close

            def best_effort_close() -> None:
                try:
                    close()
                except AttributeError as error:  # kombu: collect() detached the transport
                    log.warning("broker connection lost with a task in flight; dropped the broken channel (%s); "
                                "the step is recovered through its lease", error)

            connection.close = best_effort_close
        super().on_connection_error_after_connected(exc)
