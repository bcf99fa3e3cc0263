"""Following a run's journal live: what :meth:`Client.events` and :meth:`AsyncClient.events` share (no I/O here).

A run's journal is a Redis Stream. A follower reads it in two ways, both plain Redis commands the caller sends
(redis-py's sync or asyncio client):

* a **snapshot** -- one ``MULTI``: ``XRANGE`` of the events after the cursor and ``HGET`` of the run's status, read
  at the same instant;
* a **blocking read** -- ``XREAD BLOCK`` after the cursor, when the snapshot found nothing new: the follower
  sleeps in Redis until an event is written (no polling), for at most :data:`BLOCK_SECONDS`, then takes a snapshot.

When to stop is decided from the run record's status, never guessed from event types. teamster writes every
change of a run's status in the same transaction as its journal event (``run_succeeded``, ``dead_lettered``,
``run_cancelled``, ``dlq_discard``, ...), so a snapshot that finds the run settled has read every event up to the
one that settled it: the follower yields them and stops. A parallel branch still running when its run was
escalated may write events after the settling one; those written before the snapshot are yielded too, later ones
are not (resume with ``after=`` to read them). A blocking read is bounded so that a status change without a new
event (an operator reviving a failed run) and the ``timeout`` are noticed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from teamster.errors import InvalidInput, RunNotFound, RunTimeout
from teamster.orchestrator.journal import _decode
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import RUN_TERMINAL, RUN_WAITING, JournalEvent, RunStatus

__all__ = ["Until", "Follower", "check_event_id", "stop_statuses", "BLOCK_SECONDS", "BATCH"]

Until = Literal["settled", "final"] | None
"""When following a run stops: ``"settled"`` (final, or waiting for an operator), ``"final"`` (succeeded, failed or
cancelled) or ``None`` (never: until the timeout, or until the caller stops iterating)."""

BLOCK_SECONDS = 5.0
"""The longest single ``XREAD BLOCK``: the run's status is read again at least this often. (Below the Redis pool's
30 s socket timeout.)"""

BATCH = 500
"""Events read per command."""

_EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def check_event_id(value: str | None, what: str = "after") -> str:
    """The stream id to read after: ``value`` when it is a journal event id (``1718000000000-0``), ``"0-0"`` (the
    start) for None or ``"0"``.

    Raises:
        InvalidInput: ``value`` is not an event id.
    """
    if value is None or value in ("0", "0-0"):
        return "0-0"
    if not isinstance(value, str) or not _EVENT_ID.match(value):
        raise InvalidInput(f"{what}={value!r} is not a journal event id (like '1718000000000-0')",
                           hint="Pass the id of the last event you received (JournalEvent.id).")
    return value


def stop_statuses(until: Until) -> frozenset[RunStatus]:
    """The run statuses that end a follow for ``until`` (empty: never).

    Raises:
        InvalidInput: ``until`` is not ``"settled"``, ``"final"`` or None.
    """
    if until is None:
        return frozenset()
    if until == "settled":
        return RUN_TERMINAL | RUN_WAITING
    if until == "final":
        return RUN_TERMINAL
    raise InvalidInput(f"until={until!r}: use 'settled', 'final' or None")


class Follower:
    """The state of one follow of a run's journal: the cursor, the filter, the stop condition and the deadline.

    The caller loops: :meth:`snapshot` into a ``MULTI`` pipeline, hand the replies to :meth:`take_snapshot` (events
    to yield), stop when :attr:`done`; read again at once when :attr:`more`; else ``XREAD`` with
    :meth:`xread_args` (which raises :class:`RunTimeout` once the deadline passed) and hand the reply to
    :meth:`take_block`.

    Args:
        keys: The deployment's key naming.
        run_id: The run.
        after: Yield events after this event id (None: from the first).
        types: Yield only events of these types (None or empty: every type). The stop condition does not depend
            on it.
        until: When to stop (see :data:`Until`).
        timeout: Seconds, from the first read, after which :meth:`xread_args` raises :class:`RunTimeout`
            (None: no limit).

    Raises:
        InvalidInput: ``after``, ``until`` or ``timeout`` is invalid.
    """

    def __init__(self, keys: Keys, run_id: str, *, after: str | None = None, types: Iterable[str] | None = None,
                 until: Until = "settled", timeout: float | None = None) -> None:
        if timeout is not None and not timeout >= 0:
            raise InvalidInput(f"timeout={timeout!r}: use seconds (0 or more) or None")
        self.run_id = run_id
        self.run_key = keys.run(run_id)
        self.stream = keys.journal(run_id)
        self.cursor = check_event_id(after)
        self.wanted = frozenset(types) if types else None
        self.until = until
        self.stop = stop_statuses(until)
        self.timeout = timeout
        self.deadline: float | None = None
        self.done = False
        self.more = False
        self.status: RunStatus | None = None

    def snapshot(self, pipe: Any) -> None:
        """Queue the snapshot's commands on a ``MULTI`` pipeline (sync or asyncio)."""
        if self.deadline is None and self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        pipe.xrange(self.stream, min="-" if self.cursor == "0-0" else f"({self.cursor}", max="+", count=BATCH)
        pipe.hget(self.run_key, "status")

    def take_snapshot(self, replies: Sequence[Any]) -> list[JournalEvent]:
        """The snapshot's events to yield; sets :attr:`done` when the run was found in a stopping status with
        every event up to that instant read.

        Raises:
            RunNotFound: the run does not exist (or expired).
        """
        raw, status = replies[0] or [], replies[1]
        if not status:
            raise RunNotFound(f"no run {self.run_id!r}")
        self.status = RunStatus(json.loads(status))
        self.more = len(raw) >= BATCH
        self.done = not self.more and self.status in self.stop
        return self._accept(raw)

    def xread_args(self) -> tuple[dict[str, str], int]:
        """``(streams, block_ms)`` for the next ``XREAD BLOCK``.

        Raises:
            RunTimeout: the timeout passed before the stop condition (the run goes on; resume with
                ``after=`` the last event id, which the error carries as ``last_event_id``).
        """
        block = BLOCK_SECONDS
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                status = self.status.value if self.status is not None else "unknown"
                raise RunTimeout(f"run {self.run_id} is still {status} after {self.timeout}s of following it",
                                 run_id=self.run_id, status=status, last_event_id=self.cursor,
                                 hint=f"The run goes on: resume with after={self.cursor!r}.")
            block = min(block, remaining)
        return {self.stream: self.cursor}, max(1, int(block * 1000))

    def take_block(self, reply: Any) -> list[JournalEvent]:
        """The events of an ``XREAD`` reply (RESP2 list or RESP3 mapping; None when the block timed out)."""
        if not reply:
            return []
        batches = ([entries for per_stream in reply.values() for entries in per_stream]  # RESP3
                   if isinstance(reply, Mapping) else [entries for _name, entries in reply])  # RESP2
        events: list[JournalEvent] = []
        for entries in batches:
            events += self._accept(entries)
        return events

    def _accept(self, raw: Iterable[Any]) -> list[JournalEvent]:
        events: list[JournalEvent] = []
        for event_id, fields in raw:
            self.cursor = str(event_id)
            if self.wanted is not None and fields.get("type") not in self.wanted:
                continue
            events.append(_decode(str(event_id), fields))
        return events
