"""kombu's Redis transport, hardened against poison messages on teamster's queues.

kombu reads a queue item with BRPOP and decodes its envelope (``{"body": ..., "headers": ..., "properties": ...}``)
inside the worker's event loop. Anything else pushed onto the list -- bytes that are not JSON, JSON that is not an
envelope -- raised there and ended the worker ("Unrecoverable error: JSONDecodeError"), taking its in-flight steps
down with it. This transport decodes and checks the envelope first: a poison item is logged with its raw bytes
(bounded), counted in ``teamster_poison_messages_total`` and dropped (BRPOP already took it off the list: it is
acknowledged); the worker keeps running. Messages with a valid envelope but an undecodable body, a refused content
type or an unknown task are handled by :class:`~teamster.tasks.consumer.TeamsterConsumer`.

Celery uses it through ``broker_transport`` (see :mod:`teamster.config.celeryconfig`).
"""

from __future__ import annotations

import json
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from teamster.orchestrator import metrics

__all__ = ["Transport", "Channel", "envelope_problem", "RAW_LOG_LIMIT"]

log = logging.getLogger("teamster.worker")

RAW_LOG_LIMIT = 512
"""Bytes of a poison message written to the log."""


def envelope_problem(payload: Any) -> str | None:
    """Why ``payload`` is not a kombu message envelope kombu can deliver (None when it is one)."""
    if not isinstance(payload, dict):
        return f"the envelope is a JSON {type(payload).__name__}, not an object"
    if not isinstance(payload.get("body"), str):
        return "the envelope has no string 'body'"
    if not isinstance(payload.get("headers", {}), dict):
        return "the envelope's 'headers' is not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no 'properties' object"
    if not isinstance(properties.get("delivery_info"), dict) or "delivery_tag" not in properties:
        return "the envelope's properties lack 'delivery_info' or 'delivery_tag'"
    return None


def poison(queue: str, raw: bytes | str, reason: str) -> None:
    """Log and count a poison item taken off ``queue`` (it is gone: BRPOP removed it)."""
    data = raw.encode("utf-8", "backslashreplace") if isinstance(raw, str) else raw
    preview = data[:RAW_LOG_LIMIT]
    more = f" (+{len(data) - RAW_LOG_LIMIT} bytes)" if len(data) > RAW_LOG_LIMIT else ""
    metrics.POISON_MESSAGES.labels(queue, "undecodable_envelope").inc()
    log.error("dropped a poison message from queue %s: %s; raw bytes %r%s", queue, reason, preview, more)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """A Redis channel whose BRPOP reader refuses what it cannot decode instead of raising."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = json.loads(bytes_to_str(item))
                problem = envelope_problem(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                payload, problem = None, f"not JSON ({type(exc).__name__}: {exc})"
            if problem is not None:
                poison(dest, item, problem)
                return True
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu does
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
