"""A Celery consumer that survives losing Redis while a step is running, and answers poison messages.

Poison messages (a body that cannot be decoded, a refused content type such as pickle, an unknown task name, a
malformed task message) are acknowledged, logged with their raw bytes (bounded), counted in
``teamster_poison_messages_total`` and, when the message carries a task id, answered: the sender's result becomes a
:class:`~teamster.errors.PayloadRejected` failure instead of never arriving. The worker keeps running and keeps its
in-flight steps. (Items that are not even a message envelope are handled one layer down, in
:mod:`teamster.tasks.transport`.)

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

from celery.utils.objects import Bunch
from celery.worker import state
from celery.worker.consumer import Consumer

from teamster.errors import PayloadRejected
from teamster.orchestrator import metrics
from teamster.tasks.transport import RAW_LOG_LIMIT

__all__ = ["TeamsterConsumer", "answer_poison"]

log = logging.getLogger(__name__)


def _orphan(message: Any) -> None:
    """Make a message of the lost connection ignore its acknowledgement (its delivery tag is gone)."""

    def dropped(*_args: Any, **_kwargs: Any) -> None:
        log.info("not acknowledging message %s: it was received on a lost broker connection",
                 getattr(message, "delivery_tag", "?"))

    message.ack = dropped
    message.reject = dropped
    message.requeue = dropped


def _raw(message: Any) -> bytes:
    body = getattr(message, "body", b"")
    data = body if isinstance(body, bytes) else str(body).encode("utf-8", "backslashreplace")
    return data[:RAW_LOG_LIMIT]


def answer_poison(app: Any, message: Any, reason: str, kind: str) -> None:
    """Count a poison message, log its raw bytes, and answer its sender when it has a task id."""
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    queue = str(delivery.get("routing_key") or delivery.get("exchange") or "?")
    metrics.POISON_MESSAGES.labels(queue, kind).inc()
    task_id = headers.get("id") if isinstance(headers, dict) else None
    log.error("poison message on %s (%s): %s; task id %s; raw bytes %r", queue, kind, reason, task_id,
              _raw(message))
    if not task_id:
        return
    properties = getattr(message, "properties", None) or {}
    request = Bunch(name=headers.get("task"), chord=None, root_id=headers.get("root_id"), errbacks=None,
                    correlation_id=properties.get("correlation_id", task_id), reply_to=properties.get("reply_to"),
                    ignore_result=False)
    try:
        app.backend.mark_as_failure(task_id, PayloadRejected(f"message refused: {reason}", kind=kind),
                                    request=request)
    except Exception:  # noqa: BLE001 - answering is best effort; the message is already refused
        log.warning("could not store the refusal of task %s for its sender", task_id, exc_info=True)


class TeamsterConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, hardened against a broker outage with tasks in flight and against poison messages
    (see module docstring)."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        kind = "content_refused" if type(exc).__name__ == "ContentDisallowed" else "undecodable_body"
        super().on_decode_error(message, exc)  # logs (with the body) and acknowledges
        answer_poison(self.app, message, f"{type(exc).__name__}: {exc}", kind)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        super().on_unknown_message(body, message)
        answer_poison(self.app, message, "not a task message (no task name)", "unknown_message")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        super().on_unknown_task(body, message, exc)  # answers NotRegistered itself
        headers = getattr(message, "headers", None) or {}
        metrics.POISON_MESSAGES.labels(str((message.delivery_info or {}).get("routing_key", "?")),
                                       "unknown_task").inc()
        log.error("refused unknown task %r (task id %s)", headers.get("task"), headers.get("id"))

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        super().on_invalid_task(body, message, exc)
        answer_poison(self.app, message, f"invalid task message: {type(exc).__name__}: {exc}", "invalid_task")

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
