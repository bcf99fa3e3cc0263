"""A running step's journal, written from the agent loop (:class:`teamster.orchestrator.step_journal.StepJournal`).

Each test drives a real event loop against the session's Redis and reads the journal back from Redis: events go out
in order, a held event (a model call too) waits for company at most ``HOLD_SECONDS``, what a tool does is written as
it arrives, the tail after the last event that cannot wait is handed back for the commit instead of written, a write
that cannot reach Redis ends the step with ``StoreUnavailable`` (nothing before it lost), and an abandoned step
writes nothing more.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from teamster.errors import StoreUnavailable
from teamster.orchestrator.journal import Journal
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.step_journal import HOLD_SECONDS, StepJournal

RUN = "run-1"


@pytest.fixture()
def journal(redis_url: str) -> Iterator[Journal]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(f"stepjournal-{uuid.uuid4().hex[:8]}")
    try:
        yield Journal(client, keys, retry_seconds=1.0)
    finally:
        client.delete(keys.journal(RUN))
        client.close()


def written(journal: Journal) -> list[tuple[str, str | None, str | None]]:
    """(type, step, attempt) of every event of the run, in stream order."""
    return [(e.type, e.step, str(e.attempt) if e.attempt is not None else None) for e in journal.read(RUN)]


def run_step(journal: Journal, redis_url: str, agent: Callable[[StepJournal], Awaitable[Any]],
             *, first: list[tuple[str, dict[str, Any]]] | None = None, name: str = "a",
             after: Callable[[StepJournal], Awaitable[None]] | None = None,
             ) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    """Run ``agent(sink)`` through a fresh :class:`StepJournal` on a new loop (then ``after(sink)`` on the same loop,
    if given); returns what ``run`` returned."""

    async def main() -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        sink = StepJournal(journal, lambda: client, run_id=RUN, step_key="s", attempt=2, agent=name,
                           first=first if first is not None else [("step_start", {"token": 1})])
        try:
            returned = await sink.run(agent(sink))
            if after is not None:
                await after(sink)
            return returned
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_events_are_journaled_in_order_and_the_tail_is_handed_back(journal: Journal, redis_url: str) -> None:
    seen: list[list[tuple[str, str | None, str | None]]] = []

    async def agent(sink: StepJournal) -> str:
        sink.put("agent_start", {"agent": "a"})
        sink.put("model_call", {"call_index": 0, "latency_ms": 5})
        sink.put("tool_call", {"tool": "t"})  # written at once, with what was held
        await asyncio.sleep(0.2)
        seen.append(written(journal))
        sink.put("tool_result", {"tool": "t"})
        sink.put("model_call", {"call_index": 1})
        sink.put("validation", {"ok": True})
        sink.put("outcome", {"outcome": {"status": "succeeded"}})
        return "done"

    result, tail = run_step(journal, redis_url, agent)
    assert result == "done"
    assert seen == [[("step_start", "s", "2"), ("agent_start", "s", "2"), ("model_call", "s", "2"),
                     ("tool_call", "s", "2")]]
    assert written(journal) == [("step_start", "s", "2"), ("agent_start", "s", "2"), ("model_call", "s", "2"),
                                ("tool_call", "s", "2"), ("tool_result", "s", "2")]
    # the last model call and what followed it go out in the commit's transaction, not on their own
    assert [(kind, data.get("call_index")) for kind, data in tail] == [("model_call", 1), ("validation", None),
                                                                       ("outcome", None)]


def test_held_events_wait_at_most_the_hold_time(journal: Journal, redis_url: str) -> None:
    async def agent(sink: StepJournal) -> None:
        sink.put("agent_start", {"agent": "a"})
        await asyncio.sleep(HOLD_SECONDS / 5)
        assert written(journal) == []  # still waiting for company
        for _ in range(100):  # a slow model call: the start goes out on its own once the hold is over
            await asyncio.sleep(HOLD_SECONDS)
            if written(journal):
                break
        assert [kind for kind, _, _ in written(journal)] == ["step_start", "agent_start"]
        sink.put("model_call", {"call_index": 0})  # held in turn: a slow tool would not keep it from the journal
        for _ in range(100):
            await asyncio.sleep(HOLD_SECONDS)
            if len(written(journal)) == 3:
                break
        sink.put("model_call", {"call_index": 1})  # the last call: the agent returns at once, so it goes with the end

    _, tail = run_step(journal, redis_url, agent)
    assert [kind for kind, _, _ in written(journal)] == ["step_start", "agent_start", "model_call"]
    assert [(kind, data["call_index"]) for kind, data in tail] == [("model_call", 1)]


def test_a_delegated_calls_events_go_under_its_own_step(journal: Journal, redis_url: str) -> None:
    async def agent(sink: StepJournal) -> None:
        sink.put("delegation_start", {"_step": "s/helper#1", "agent": "helper"})
        sink.put("model_call", {"_step": "s/helper#1", "call_index": 0})
        sink.put("delegation_result", {"_step": "s/helper#1", "output": {}})

    run_step(journal, redis_url, agent, first=[])
    assert written(journal) == [("delegation_start", "s/helper#1", "2"), ("model_call", "s/helper#1", "2"),
                                ("delegation_result", "s/helper#1", "2")]


def test_events_put_from_another_thread_are_journaled_in_order(journal: Journal, redis_url: str) -> None:
    async def agent(sink: StepJournal) -> None:
        def tool() -> None:  # a synchronous tool's thread reporting through the sink
            for i in range(20):
                sink.put("tool_call", {"tool": "t", "n": i})

        sink.put("model_call", {"call_index": 0})
        await asyncio.to_thread(tool)
        await asyncio.sleep(0)  # the handed-over events run on the loop

    run_step(journal, redis_url, agent, first=[])
    events = journal.read(RUN)
    assert events[0].type == "model_call"
    assert [e.data.get("n") for e in events if e.type == "tool_call"] == list(range(20))


def test_each_model_call_and_abandoned_tool_is_counted_once_in_metrics(journal: Journal, redis_url: str) -> None:
    name = f"metrics_{uuid.uuid4().hex[:6]}"

    async def agent(sink: StepJournal) -> None:
        sink.put("model_call", {"latency_ms": 200, "usage": {"inputTokens": 30, "outputTokens": 5}})
        await asyncio.to_thread(sink.put, "model_call", {"latency_ms": 100, "usage": {"inputTokens": 12}})
        await asyncio.sleep(0)
        sink.put("tool_abandoned", {"tool": "slow"})
        sink.put("outcome", {"outcome": {"status": "failed"}})  # the tail: counted nowhere, written by the commit

    run_step(journal, redis_url, agent, name=name)
    sample = REGISTRY.get_sample_value
    assert sample("teamster_model_call_duration_seconds_count", {"agent": name}) == 2
    assert sample("teamster_model_call_duration_seconds_sum", {"agent": name}) == pytest.approx(0.3)
    assert sample("teamster_tokens_total", {"agent": name, "kind": "inputTokens"}) == 42
    assert sample("teamster_tokens_total", {"agent": name, "kind": "outputTokens"}) == 5
    assert sample("teamster_tools_abandoned_total", {"agent": name, "tool": "slow"}) == 1


def test_an_event_after_the_agent_returned_is_not_journaled(journal: Journal, redis_url: str) -> None:
    """A late event (say, from a tool thread that outlived its step) would land after the step's commit."""
    async def agent(sink: StepJournal) -> None:
        sink.put("tool_call", {"tool": "t"})

    async def late(sink: StepJournal) -> None:
        sink.put("tool_result", {"tool": "late"})
        await asyncio.sleep(HOLD_SECONDS * 3)  # past any hold: nothing is pending

    run_step(journal, redis_url, agent, first=[], after=late)
    assert [e.type for e in journal.read(RUN)] == ["tool_call"]


def test_a_batch_written_twice_is_read_back_once(journal: Journal) -> None:
    """A write retried after its reply was lost (Redis restarted mid-write) appends the batch again; replay and
    takeover must still see each model call once, in order, or they would serve an answer to the wrong call."""
    def call(index: int) -> dict[str, Any]:
        return {"call_index": index, "request_digest": f"d{index}", "content": [{"text": f"answer {index}"}]}

    batch = [("model_call", call(0)), ("tool_call", {"tool": "t"}), ("model_call", call(1))]
    journal.append_many(RUN, batch, step="s", attempt=2)
    journal.append_many(RUN, batch, step="s", attempt=2)  # the retry
    journal.append(RUN, "model_call", step="s", attempt=2, data=call(2))
    assert [e.call_index for e in journal.exchanges(RUN, "s", 2)] == [0, 1, 2]
    assert [e.content[0]["text"] for e in journal.reusable_exchanges(RUN, "s", 2)] == [
        "answer 0", "answer 1", "answer 2"]
    assert [e.type for e in journal.read(RUN)].count("model_call") == 5  # the journal itself keeps what was written


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_write_that_cannot_reach_redis_ends_the_step_with_store_unavailable(journal: Journal) -> None:
    """The loop's client points at a port nothing listens on: connection refused, retried for the journal's retry
    period (1 s here), then StoreUnavailable out of run() -- the thread's delivery ends with it, as before."""
    async def agent(sink: StepJournal) -> str:
        sink.put("tool_call", {"tool": "t"})  # written at once: the write fails
        return "answered"

    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        run_step(journal, f"redis://127.0.0.1:{_closed_port()}/0", agent)
    assert written(journal) == []


def test_an_abandoned_step_writes_nothing_more(journal: Journal, redis_url: str) -> None:
    released = threading.Event()

    async def agent(sink: StepJournal) -> None:
        sink.put("model_call", {"call_index": 0})
        await asyncio.sleep(0.2)  # past the hold: written
        sink.abandon()  # the thread gave up on the step past its deadline
        released.set()
        sink.put("model_call", {"call_index": 1})
        sink.put("tool_call", {"tool": "t"})  # would be written at once, with the call before it
        sink.put("outcome", {"outcome": {"status": "succeeded"}})

    run_step(journal, redis_url, agent)
    assert released.is_set()
    assert [(e.type, e.data.get("call_index")) for e in journal.read(RUN)] == [("step_start", None),
                                                                               ("model_call", 0)]
