"""kombu's Redis transport, hardened against poison messages on teamster's queues.

kombu reads a queue item with BRPOP and decodes its envelope (``{"body": ..., "headers": ..., "properties": ...}``)
inside the worker's event loop. Anything else pushed onto the list -- bytes that are not JSON, JSON that is not an
envelope -- raised there and ended the worker ("Unrecoverable error: JSONDecodeError"), taking its in-flight steps
down with it. This transport decodes and checks the envelope first: a poison item is logged with its raw bytes
(bounded), counted in ``teamster_poison_messages_total`` and dropped (BRPOP already took it off the list: it is
acknowledged); the worker keeps running. Messages with a valid envelope but an undecodable body, a refused content
type or an unknown task are handled by :class:`~teamster.tasks.consumer.TeamsterConsumer`.

It also leaves step messages out of kombu's ack emulation. kombu tracks every unacknowledged message in Redis (a
MULTI/ZADD/HSET/EXEC when it is received, a MULTI/ZREM/HDEL/EXEC when it is acknowledged) so that it can deliver it
again after ``visibility_timeout``. A step's delivery is already tracked by the run store: the step is in the in-flight
set from the moment it is queued, its lease says who runs it, and the watchdog re-sends a step that was lost -- queued
and never claimed, or claimed by a worker that died -- long before the visibility timeout. Tracking it twice cost 8 of
a step's Redis commands and a tenth of its worker CPU, and kombu's copy could only ever deliver a duplicate late (the
claim then refuses it). Step messages a worker still holds are handed back to their queue on a clean shutdown or a
requeue, from memory, as kombu does for every message on transports without ack emulation; every other task (run
starts on the control queue, other Celery apps' tasks) keeps kombu's tracking.

Celery uses it through ``broker_transport`` (see :mod:`teamster.config.celeryconfig`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str

from teamster.config.celeryconfig import STEP_TASK
from teamster.orchestrator import metrics

__all__ = ["Transport", "Channel", "QoS", "run_store_tracked", "envelope_problem", "RAW_LOG_LIMIT"]

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


def run_store_tracked(message: Any) -> bool:
    """Whether the run store tracks this message's delivery (a step message), so kombu need not."""
    headers = getattr(message, "headers", None)
    return isinstance(headers, dict) and headers.get("task") == STEP_TASK


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's Redis ack emulation, except for step messages (see the module docstring).

    A step message is held in memory only, like any message on a transport without ack emulation: acknowledging it
    writes nothing to Redis; requeueing it, or restoring it when the channel closes, pushes it back onto its queue.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._untracked: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if run_store_tracked(message):
            self._untracked.add(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if delivery_tag in self._untracked:
            self._untracked.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if delivery_tag in self._untracked:
            if requeue:
                self._push_back([self._delivered[delivery_tag]], leftmost=True)
            self._untracked.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().reject(delivery_tag, requeue)

    def restore_unacked(self, client: Any = None) -> None:
        self._flush()  # drop what was acknowledged meanwhile (acks may come from other threads)
        held = list(self._delivered.items())
        with self.channel.conn_or_acquire(client) as conn:
            self._push_back([message for tag, message in held if tag in self._untracked], client=conn)
            for tag, _message in held:
                if tag not in self._untracked:
                    self.restore_by_tag(tag, client=conn)
        self._untracked.clear()
        self._delivered.clear()

    def _push_back(self, messages: list[Any], *, leftmost: bool = False, client: Any = None) -> None:
        """Put held step messages back onto their queues (marked redelivered), in one round trip."""
        if not messages:
            return
        with self.channel.conn_or_acquire(client) as conn:
            pipe = conn.pipeline()
            for message in messages:
                info = message.delivery_info
                self.channel._do_restore_message(message._raw, info["exchange"], info["routing_key"], pipe, leftmost)
            pipe.execute()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """A Redis channel whose BRPOP reader refuses what it cannot decode instead of raising, and whose
    acknowledgements leave step messages to the run store (:class:`QoS`)."""

    QoS = QoS
    _publisher: Any = None  # the client conn_or_acquire hands out (built on first use)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """A client for one command or pipeline: ``client`` if given, else the channel's publishing client.

        kombu builds a new ``redis.Redis`` on its connection pool for every publish -- each queue put, each batch of
        task events -- and every restore (redis-py's ``Redis.__init__`` copies its response-callback table and builds
        an event dispatcher each time, ~96 us: about 3% of a worker's CPU on the provider benchmark). A
        ``redis.Redis`` is thread-safe -- each command borrows a connection from the pool -- so one per channel and
        pool serves every thread; a new pool (after a fork or reconnect) gets a new client."""
        if client:
            yield client
            return
        shared = self._publisher
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._publisher = self._create_client()
        yield shared

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
