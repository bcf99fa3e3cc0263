"""The journal of one running agent step, written from the process's agent loop.

An agent step runs on the worker's event loop (:class:`~teamster.agents.loop.AgentLoop`) while the Celery thread
that delivered it waits. Its events (model calls, tool calls, validation, outcome) used to travel to that thread
through a queue, one wake-up per event, and the thread wrote them with blocking round trips. With hundreds of steps
in flight, each of those wake-ups and round trips was a thread taking the GIL from the loop: about half of a worker's
context switches and system CPU on the provider benchmark. :class:`StepJournal` writes them on the loop instead, with
the loop's asyncio Redis client; the waiting thread wakes once, when the step has ended and its events are written.

What is written, and when:

* every event is journaled in order, under its step and attempt (a delegated call's under its own ``_step``);
* model calls and lifecycle events (:data:`HELD_EVENTS`) wait up to :data:`HOLD_SECONDS` for the next event: a
  step's start goes out with its first model call, a model call with the tool call it asks for; what a tool or a
  delegated call does (tool calls and results, delegation events, a blocked tool) is written as soon as it arrives,
  with what waits. A model call is in the journal (where a takeover reuses it) at most :data:`HOLD_SECONDS` after it
  returned, or with the step's end;
* what follows the last event that cannot wait (typically the last model call, validation, criteria, the outcome)
  is handed back to go out with the step's end, in its commit (or retry, or dead-letter) transaction. A step whose
  agent answers within the hold -- one model call, then the outcome -- makes no journal round trip of its own;
* a write that fails on a transient Redis error is retried for ``TEAMSTER_STORE_RETRY_SECONDS``; past that the step
  ends with :class:`~teamster.errors.StoreUnavailable` in the thread, as a blocking write would have;
* a step abandoned past its deadline writes nothing more (its thread has already recorded the timeout), and an event
  that arrives after the agent returned (a tool thread that outlived its step) is dropped, not written after the
  commit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from teamster.orchestrator import metrics
from teamster.orchestrator.journal import Journal

__all__ = ["HELD_EVENTS", "HOLD_SECONDS", "MAX_BATCH", "StepJournal", "record_metrics"]

T = TypeVar("T")
Event = tuple[str, dict[str, Any]]

HELD_EVENTS = frozenset({"step_start", "agent_start", "model_call", "validation", "outcome"})
"""Journal events that may wait (up to :data:`HOLD_SECONDS`) to share a round trip with the next one, or go out with
the step's end. Every other event (what tools and delegated calls do) is written as soon as it arrives, with what
waits. A model call waits too: the one a takeover could lose is at most :data:`HOLD_SECONDS` old, against the
round trip per step that writing it on its own costs (most steps end right after their last model call)."""

HOLD_SECONDS = 0.05
"""How long held events wait for company before they are written on their own (live progress lags at most this)."""

MAX_BATCH = 64
"""Held events written together at most (a step that emits many lifecycle events still journals them steadily)."""


def record_metrics(agent: str, kind: str, data: dict[str, Any]) -> None:
    """The Prometheus side of a journal event: model latency and tokens, abandoned tools."""
    if kind == "model_call":
        usage = data.get("usage") or {}
        metrics.MODEL_SECONDS.labels(agent).observe(float(data.get("latency_ms", 0)) / 1000.0)
        for token_kind in ("inputTokens", "outputTokens"):
            if usage.get(token_kind):
                metrics.TOKENS.labels(agent, token_kind).inc(int(usage[token_kind]))
    elif kind == "tool_abandoned":
        metrics.TOOLS_ABANDONED.labels(agent, str(data.get("tool"))).inc()


class StepJournal:
    """Collects one step attempt's events on the agent loop and journals them (see the module docstring).

    Create it in the delivering thread, pass :meth:`put` to the agent as its event sink, and submit
    :meth:`run` (wrapping the agent's coroutine) to the loop. The thread calls :meth:`abandon` if it gives up on
    the step.

    Args:
        journal: The run store's journal (event fields, redaction, size caps, key names, retry period).
        client: Returns the running loop's asyncio Redis client.
        run_id: The run.
        step_key: The step (events of delegated calls name their own ``_step``).
        attempt: The attempt number.
        agent: The agent's name (metrics labels).
        first: Events the thread already has (the step's start), journaled first.
    """

    def __init__(self, journal: Journal, client: Callable[[], aioredis.Redis], *, run_id: str, step_key: str,
                 attempt: int, agent: str, first: list[Event]) -> None:
        self.journal = journal
        self.client = client
        self.run_id, self.step_key, self.attempt, self.agent = run_id, step_key, attempt, agent
        self._pending: list[Event] = list(first)
        self._held_since = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._batches: list[list[Event]] = []
        self._writer: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._closed = False  # the agent has returned: a late event (a tool thread finishing) is not journaled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # -- the agent's side (on the loop)

    def put(self, kind: str, data: dict[str, Any]) -> None:
        """The agent's event sink: journal ``(kind, data)`` in order (held events may wait for company)."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:  # emitted off the loop: hand it over
            loop.call_soon_threadsafe(self.put, kind, data)
            return
        if self._closed:
            return
        record_metrics(self.agent, kind, data)
        if not self._pending:
            self._held_since = time.monotonic()
        self._pending.append((kind, data))
        if kind not in HELD_EVENTS or len(self._pending) >= MAX_BATCH:
            self._flush()
        else:
            self._arm()

    async def run(self, agent: Awaitable[T]) -> tuple[T, list[Event]]:
        """Run ``agent`` (the step's coroutine), journaling its events as they come; returns its result and the tail
        of events that should go out with the step's end, once everything before them is written.

        Raises:
            StoreUnavailable: a journal write could not reach Redis within the retry period.
        """
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._arm()  # the step's start waits for company, like every held event
        try:
            result = await agent
        finally:
            self._closed = True
            self._disarm()
        pending, self._pending = self._pending, []
        # what follows the last event that cannot wait (typically the last model call, validation, criteria, the
        # outcome) goes out with the step's end
        cut = max((i + 1 for i, (kind, _) in enumerate(pending) if kind not in HELD_EVENTS), default=0)
        if pending[:cut]:
            self._batches.append(pending[:cut])
            self._start_writer()
        if self._writer is not None:
            await asyncio.shield(self._writer)  # a cancelled step still finishes the write it started
        if self._error is not None:
            raise self._error
        return result, pending[cut:]

    # -- the thread's side

    def abandon(self) -> None:
        """The thread gave up on the step (past its deadline): write nothing more."""
        self._abandoned = True

    # -- internals (on the loop)

    def _arm(self) -> None:
        if self._timer is None and self._pending and self._loop is not None:
            delay = max(0.0, self._held_since + HOLD_SECONDS - time.monotonic())
            self._timer = self._loop.call_later(delay, self._flush)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self) -> None:
        self._disarm()
        if self._pending:
            self._batches.append(self._pending)
            self._pending = []
            self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_all())

    async def _write_all(self) -> None:
        """Write the queued batches in order, one round trip each; stop at the first that cannot be written."""
        while self._batches and self._error is None and not self._abandoned:
            batch = self._batches.pop(0)
            try:
                await self.journal.append_many_async(self.client(), self.run_id, batch, step=self.step_key,
                                                     attempt=self.attempt)
            except Exception as exc:  # noqa: BLE001 - handed to the thread, which ends the delivery with it
                self._error = exc
