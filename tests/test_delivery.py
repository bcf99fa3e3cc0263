"""Who tracks a delivered message: step messages are the run store's, everything else is kombu's.

teamster's transport leaves step messages (``teamster.step``) out of kombu's ack emulation: the run store tracks a
step from the moment it is queued (in-flight set, leases) and the watchdog re-sends a lost one, so kombu's Redis
bookkeeping (the ``unacked`` hash and its index) is not written for them. These tests drive the transport with a
real kombu connection on the session's Redis and check, in Redis, that

* a step message held by a consumer leaves nothing in kombu's ``unacked`` hash, and acknowledging it writes nothing;
* any other task message (a run start, another app's task) is still tracked by kombu exactly as before;
* a step message that is rejected with requeue, or still held when its channel closes (a clean shutdown holding a
  retry's ETA message), goes back onto its queue, marked redelivered -- nothing is lost;

and, end to end with a real worker, that a step message lost after a worker took it (the worker died before
claiming it) is re-sent by the watchdog and its run succeeds.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from teamster.config.celeryconfig import START_RUN_TASK, STEP_TASK
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.tasks.transport import run_store_tracked
from tests.harness import Worker, wait_settled

MODULES = "tests.workflows"

QUEUE = "delivery-test"


@pytest.fixture()
def channel(redis_url: str) -> Iterator[tuple[Any, redis.Redis, str]]:
    """A kombu channel on teamster's transport, with its own key prefix; yields (channel, redis client, prefix)."""
    prefix = f"delivery-{uuid.uuid4().hex[:8]}:"
    conn = Connection(redis_url, transport="teamster.tasks.transport:Transport",
                      transport_options={"global_keyprefix": prefix})
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ch = conn.channel()
        Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)(ch).declare()
        yield ch, client, prefix
    finally:
        conn.release()
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def publish(ch: Any, task: str, n: int = 0) -> None:
    Producer(ch).publish({"n": n}, exchange=QUEUE, routing_key=QUEUE, serializer="json", headers={"task": task})


def unacked(client: redis.Redis, prefix: str) -> int:
    return int(client.hlen(f"{prefix}unacked")) + int(client.zcard(f"{prefix}unacked_index"))


def queued(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in client.lrange(f"{prefix}{QUEUE}", 0, -1)]


def test_a_step_message_is_not_tracked_by_kombu_and_its_ack_writes_nothing(channel: Any) -> None:
    ch, client, prefix = channel
    publish(ch, STEP_TASK)
    message = ch.basic_get(QUEUE, no_ack=False)
    assert message is not None and run_store_tracked(message)
    assert unacked(client, prefix) == 0
    assert queued(client, prefix) == []  # taken off the queue: held in memory only
    message.ack()
    ch.qos._flush()
    assert unacked(client, prefix) == 0 and queued(client, prefix) == []
    assert not ch.qos._delivered


@pytest.mark.parametrize("task", [START_RUN_TASK, "someone_elses.task"])
def test_other_task_messages_keep_kombus_ack_emulation(channel: Any, task: str) -> None:
    ch, client, prefix = channel
    publish(ch, task)
    message = ch.basic_get(QUEUE, no_ack=False)
    assert message is not None and not run_store_tracked(message)
    assert client.hlen(f"{prefix}unacked") == 1 and client.zcard(f"{prefix}unacked_index") == 1
    message.ack()
    assert unacked(client, prefix) == 0


def test_a_requeued_step_message_goes_back_onto_its_queue_marked_redelivered(channel: Any) -> None:
    ch, client, prefix = channel
    publish(ch, STEP_TASK, n=7)
    message = ch.basic_get(QUEUE, no_ack=False)
    message.requeue()
    back = queued(client, prefix)
    assert len(back) == 1 and back[0]["headers"]["task"] == STEP_TASK
    assert back[0]["headers"]["redelivered"] is True
    assert json.loads(message.body)["n"] == 7 and unacked(client, prefix) == 0
    again = ch.basic_get(QUEUE, no_ack=False)
    assert again is not None and json.loads(again.body) == {"n": 7}
    again.ack()


def test_messages_still_held_when_the_channel_closes_are_restored_and_acked_ones_are_not(channel: Any) -> None:
    ch, client, prefix = channel
    for n, task in enumerate([STEP_TASK, STEP_TASK, START_RUN_TASK, STEP_TASK]):
        publish(ch, task, n)
    held = [ch.basic_get(QUEUE, no_ack=False) for _ in range(4)]
    assert all(m is not None for m in held) and queued(client, prefix) == []
    assert client.hlen(f"{prefix}unacked") == 1  # the run start only
    held[1].ack()  # this step finished: it must not come back
    ch.qos.restore_unacked_once()
    back = sorted(json.loads(base64.b64decode(m["body"]))["n"] for m in queued(client, prefix))
    assert back == [0, 2, 3]
    assert unacked(client, prefix) == 0


def test_publishing_reuses_one_client_per_pool_and_every_message_and_event_still_arrives(channel: Any) -> None:
    """kombu builds a new ``redis.Redis`` for every publish; teamster's channel hands out one per connection pool. The
    queue messages and the fanout (task event) messages it sends arrive all the same, from several threads at once."""
    ch, client, prefix = channel
    with ch.conn_or_acquire() as first, ch.conn_or_acquire() as second:
        assert first is second and first.connection_pool is ch.pool
    own = redis.Redis(connection_pool=ch.pool)
    with ch.conn_or_acquire(own) as given:  # a client passed in is used as it is
        assert given is own
    events = Exchange("delivery-events", type="fanout")
    events(ch).declare()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*delivery-events*")  # kombu names the channel /<db>.<exchange> (global prefix included)
    threads = [threading.Thread(target=lambda n=n: (publish(ch, STEP_TASK, n), Producer(ch).publish(
        {"event": n}, exchange=events, routing_key="task.multi", serializer="json"))) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(json.loads(base64.b64decode(m["body"]))["n"] for m in queued(client, prefix)) == list(range(8))
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while len(seen) < 8 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None:
            seen.append(json.loads(base64.b64decode(json.loads(message["data"])["body"]))["event"])
    pubsub.close()
    assert sorted(seen) == list(range(8))
    old = ch.pool
    ch._disconnect_pools()  # what kombu does after a fork: the next publish gets a client on the new pool
    with ch.conn_or_acquire() as after:
        assert after.connection_pool is ch.pool and ch.pool is not old


@pytest.mark.integration
def test_a_step_message_lost_after_a_worker_took_it_is_re_sent_by_the_watchdog() -> None:
    """The window kombu's tracking used to cover: a worker took the message off the queue (BRPOP) and died before
    claiming the step. The step is still queued in the run store, so the watchdog re-sends it and the run succeeds."""
    prefix = f"delivery-{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {"key_prefix": prefix, "workflow_modules": MODULES, "stuck_queued_seconds": 1.0,
                                 "watchdog_interval_seconds": 0.5}
    client = Client(load_settings(**{**overrides, "workflow_modules": MODULES.split(",")}))
    try:
        run_id = client.submit("t_linear", {"text": "lost message"})
        queue_key = f"{prefix}:celery:{client.settings.steps_queue}"
        taken = client.runtime.client.rpop(queue_key)  # what the dead worker's BRPOP did
        assert taken is not None and json.loads(taken)["headers"]["task"] == STEP_TASK  # type: ignore[arg-type]
        assert client.runtime.client.llen(queue_key) == 0
        with Worker("delivery", concurrency=2, env=overrides, beat=True):
            assert wait_settled(client, run_id).status.value == "succeeded"
        requeued = client.journal(run_id, types=["requeued"])
        assert requeued and requeued[0].step == "summarize"
    finally:
        for key in client.runtime.client.scan_iter(f"{prefix}:*"):
            client.runtime.client.delete(key)
