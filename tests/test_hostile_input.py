"""Hostile input and poison messages: a typed answer for every one, nothing half-written, no worker dies.

* at the door (``submit`` and ``teamster.start_run``): lone surrogates, deep nesting (300 and 10,000 levels, as
  Python values), NaN, bytes -> ``InvalidInput`` naming the field, nothing written;
* inside a step: a provider library raising something unknown, an input that cannot become a prompt, a model
  answer that cannot be stored -> the attempt ends at once, typed, dead-lettered, with no lease expiry;
* a workflow this worker cannot load -> dead-lettered as ``unknown_workflow``, not left running;
* on the queue: bytes that are not JSON and JSON that is not an envelope are dropped without killing the worker (a
  step in flight meanwhile completes); pickle and undecodable bodies are answered to their sender as
  ``PayloadRejected``; an unknown task name as ``NotRegistered``;
* Redis losing its data: clients say so (``StoreDataLost``, since when) instead of "no run"; workers warn at
  start-up when Redis keeps nothing on disk;
* a property test: random JSON-like values to ``submit`` and random bytes on the step queue -> a typed error or
  success, nothing partially written, the worker alive.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teamster.config.embedded import EmbeddedRedis
from teamster.config.settings import load_settings
from teamster.errors import InvalidInput, RunNotFound, StoreDataLost, TeamsterError
from teamster.orchestrator.client import Client
from teamster.orchestrator.models import StepStatus
from teamster.testing import WorkflowEnvironment
from tests.harness import Worker, wait_settled, wait_until

pytestmark = pytest.mark.integration

MODULES = "tests.workflows,tests.hostile_flows"


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=MODULES.split(",")))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("hostile", concurrency=4, env={"workflow_modules": MODULES}) as w:
        yield w


@pytest.fixture(scope="module")
def plain(client: Client) -> Celery:
    """A plain Celery client (JSON, the deployment's key prefix), as another language's client would be."""
    app = Celery(broker=client.redis_url, backend=client.redis_url)
    prefix = f"{client.settings.key_prefix}:celery:"
    app.conf.update(broker_transport_options={"global_keyprefix": prefix},
                    result_backend_transport_options={"global_keyprefix": prefix})
    return app


def footprint(client: Client) -> dict[str, int]:
    redis_client, prefix = client.runtime.client, client.settings.key_prefix
    return {"runs": int(redis_client.zcard(client.runtime.keys.runs)),
            "run_keys": sum(1 for _ in redis_client.scan_iter(match=f"{prefix}:run:*", count=1000)),
            "journals": sum(1 for _ in redis_client.scan_iter(match=f"{prefix}:journal:*", count=1000))}


def nested(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["n"] = {}
        node = node["n"]
    return root


# --------------------------------------------------------------------------- at the door


@pytest.mark.parametrize(("value", "field", "problem"), [
    pytest.param({"text": "ab\ud800cd"}, "text", "\\ud800 at position 2, which cannot be encoded as UTF-8",
                 id="lone-surrogate"),
    pytest.param({"text": "ok", "items": ["fine", "bad\udfff"]}, "items[1]", "cannot be encoded as UTF-8",
                 id="surrogate-in-a-list"),
    pytest.param({"text": "ok", "extra\ud83d": 1}, "extra\\ud83d", "the key contains", id="surrogate-key"),
    pytest.param({"text": "ok", "deep": nested(300)}, "deep.n.n", "nested more than 64 levels", id="depth-300"),
    pytest.param({"text": "ok", "deep": nested(10_000)}, "deep.n.n", "nested more than 64 levels",
                 id="depth-10000"),
    pytest.param({"text": "ok", "score": math.nan}, "score", "nan is not a JSON number", id="nan"),
    pytest.param({"text": b"raw bytes"}, "text", "a bytes is not JSON", id="bytes"),
])
def test_submit_refuses_what_cannot_be_carried_naming_the_field(value: dict[str, Any], field: str,
                                                                 problem: str) -> None:
    with WorkflowEnvironment(["tests.workflows"]) as env:
        before = footprint(env.client)
        with pytest.raises(InvalidInput) as info:
            env.submit("t_linear", value)
        assert info.value.code == "invalid_input" and info.value.details["field"].startswith(field)
        assert problem in info.value.message
        str(info.value).encode("utf-8")  # the message itself is printable: no surrogate in it
        assert footprint(env.client) == before and not env.queue.messages


def test_start_run_refuses_a_lone_surrogate_with_the_field_named(client: Client, plain: Celery,
                                                                 worker: Worker) -> None:
    before = footprint(client)
    reply = plain.send_task("teamster.start_run", queue="teamster.control", kwargs={"message": {
        "workflow": "t_linear", "input": {"text": "x\ud800y"}}})
    with pytest.raises(Exception) as info:
        reply.get(timeout=30)
    assert type(info.value).__name__ == "InvalidInput" and "field text" in str(info.value)
    assert footprint(client) == before


# --------------------------------------------------------------------------- inside a step


@pytest.mark.parametrize(("workflow", "value", "error_type", "says"), [
    pytest.param("h_crash", {"text": "hi"}, "unexpected_error", "ProviderBug", id="provider-library-bug"),
    pytest.param("h_prompt", {"text": "hi"}, "unexpected_error", "cannot be written into a prompt",
                 id="prompt-building"),
    pytest.param("h_surrogate", {"text": "hi"}, "invalid_output", "cannot be encoded as UTF-8",
                 id="unstorable-model-output"),
])
def test_an_exception_inside_a_step_ends_the_attempt_at_once_typed(client: Client, worker: Worker, workflow: str,
                                                                  value: dict[str, Any], error_type: str,
                                                                  says: str) -> None:
    run = wait_settled(client, client.submit(workflow, value), timeout=60)
    assert run.status.value == "escalated", run.error
    assert run.error["error_type"] == error_type and says in run.error["message"]
    step = client.steps(run.run_id)[0]
    assert step.status == StepStatus.FAILED and step.attempts == 1 and step.lease_expiries == 0
    assert not client.journal(run.run_id, types=["lease_expired"])
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.error_type == error_type and not entry.retryable and entry.attempts == 1
    assert worker.alive()


def test_a_workflow_the_worker_cannot_load_is_dead_lettered_not_left_running(client: Client,
                                                                             worker: Worker) -> None:
    from teamster import Workflow
    from tests.hostile_flows import Text

    orphan = Workflow(f"h_orphan_{uuid.uuid4().hex[:6]}", input_model=Text, module="nowhere.to_be_found")
    orphan.step("work", "h_slow")
    orphan.register()
    run = wait_settled(client, client.submit(orphan.name, {"text": "hi"}), timeout=60)
    assert run.status.value == "escalated" and run.error["error_type"] == "unknown_workflow"
    assert "nowhere.to_be_found" in run.error["message"]
    assert client.steps(run.run_id)[0].status == StepStatus.FAILED
    assert client.dlq.get(run.error["dlq_entry"]).error_type == "unknown_workflow"


# --------------------------------------------------------------------------- poison on the queue


def queue_key(client: Client) -> str:
    return f"{client.settings.key_prefix}:celery:{client.settings.steps_queue}"


@pytest.mark.parametrize("item", [b"\x00\xffnot json at all", b'{"not": "an envelope"}', b"[1, 2, 3]",
                                  b'{"body": "e30=", "properties": {}}'])
def test_poison_items_on_the_queue_are_dropped_and_the_worker_keeps_its_steps(client: Client, worker: Worker,
                                                                              item: bytes) -> None:
    run_id = client.submit("h_slow", {"text": "in flight [slow=1.5]"})
    wait_until(lambda: client.steps(run_id)[0].status == StepStatus.RUNNING, timeout=30)
    dropped = worker.log().count("dropped a poison message")
    client.runtime.client.lpush(queue_key(client), item)
    wait_until(lambda: worker.log().count("dropped a poison message") > dropped, timeout=30)
    assert wait_settled(client, run_id).status.value == "succeeded"  # the step in flight was not disturbed
    assert worker.alive() and "Unrecoverable error" not in worker.log()
    assert repr(item[:20])[2:-1] in worker.log() or "raw bytes" in worker.log()


def _publish(client: Client, body: Any, task_id: str, **options: Any) -> None:
    from teamster.config.celeryconfig import STEP_TASK

    app: Celery = client.runtime.enqueuer.app  # type: ignore[attr-defined]
    message = app.amqp.as_task_v2(task_id, STEP_TASK, args=(), kwargs={})
    with app.connection_for_write() as conn:
        conn.Producer().publish(body, exchange="", routing_key=client.settings.steps_queue, headers=message.headers,
                                **message.properties, **options)


@pytest.mark.parametrize(("body", "options", "kind"), [
    pytest.param(((), {"message": {"run_id": "run_x", "step_key": "s"}}, {}), {"serializer": "pickle"},
                 "ContentDisallowed", id="pickle"),
    pytest.param(b'{"message": {"run_id": ', {"content_type": "application/json", "content_encoding": "utf-8"},
                 "DecodeError: Expecting value", id="undecodable-json"),
    pytest.param(b"\x93yaml?", {"content_type": "application/x-yaml", "content_encoding": "binary"},
                 "ContentDisallowed", id="unknown-content-type"),
])
def test_refused_messages_are_answered_to_their_sender(client: Client, plain: Celery, worker: Worker, body: Any,
                                                       options: dict[str, Any], kind: str) -> None:
    task_id = f"poison-{uuid.uuid4().hex[:8]}"
    _publish(client, body, task_id, **options)
    with pytest.raises(Exception) as info:
        plain.AsyncResult(task_id).get(timeout=30)
    assert type(info.value).__name__ == "PayloadRejected" and kind in str(info.value), info.value
    assert worker.alive()


def test_an_unknown_task_name_is_answered_not_registered(client: Client, plain: Celery, worker: Worker) -> None:
    reply = plain.send_task("teamster.no_such_task", queue=client.settings.steps_queue)
    with pytest.raises(Exception) as info:
        reply.get(timeout=30)
    assert type(info.value).__name__ == "NotRegistered"
    assert worker.alive()


# --------------------------------------------------------------------------- Redis losing its data


def test_clients_say_that_redis_lost_its_data_instead_of_no_run() -> None:
    with WorkflowEnvironment(["tests.workflows"]) as env:
        run = env.run("t_linear", {"text": "remember me"})
        witness = Client(env.settings, redis_url=env.client.redis_url, load_modules=False, enqueuer=env.queue)
        witness.status(run.run_id)  # this client has seen the data
        for key in list(env.runtime.client.scan_iter(match=f"{env.settings.key_prefix}:*")):
            env.runtime.client.delete(key)  # what a restart without persistence does
        with pytest.raises(StoreDataLost) as lost:
            witness.status(run.run_id)
        assert "holds no teamster data" in lost.value.message and "since this client saw it" in lost.value.message
        env.run("t_linear", {"text": "a new beginning"})  # teamster writes again: a new epoch mark
        with pytest.raises(StoreDataLost) as later:
            witness.status(run.run_id)
        assert "lost teamster's data after" in later.value.message and "begins at" in later.value.message
        fresh = Client(env.settings, redis_url=env.client.redis_url, load_modules=False, enqueuer=env.queue)
        with pytest.raises(RunNotFound) as unknown:
            fresh.status("run_typo")
        assert "teamster's data in this Redis begins at" in unknown.value.message


def test_a_worker_warns_at_start_up_when_redis_keeps_nothing_on_disk(tmp_path: Path) -> None:
    volatile = EmbeddedRedis(tmp_path / "volatile", appendonly=False)
    volatile.start()
    try:
        with Worker("volatile", concurrency=1, env={"redis_url": volatile.url,
                                                    "workflow_modules": "tests.workflows"}) as w:
            wait_until(lambda: "AOF off" in w.log(), timeout=30)
        assert "set appendonly yes" in w.log()
    finally:
        volatile.stop()


# --------------------------------------------------------------------------- property tests

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=())) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(st.characters(exclude_categories=()), max_size=6), children, max_size=4),
    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=json_like, extra=json_like)
def test_submit_of_random_values_is_a_typed_error_or_a_run_and_never_half_written(text: Any, extra: Any) -> None:
    with WorkflowEnvironment(["tests.workflows"]) as env:
        before = footprint(env.client)
        try:
            run_id = env.submit("t_linear", {"text": text, "items": extra})
        except TeamsterError as exc:
            assert exc.code in ("invalid_input", "payload_rejected"), exc
            str(exc).encode("utf-8")
            assert footprint(env.client) == before and not env.queue.messages
        else:
            assert footprint(env.client)["runs"] == before["runs"] + 1
            assert env.client.status(run_id).input["text"] == text
            json.dumps(env.client.status(run_id).input).encode("utf-8")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(item=st.binary(max_size=64) | json_like.map(lambda v: json.dumps(v, default=repr).encode("utf-8",
                                                                                                  "replace")))
def test_random_bytes_on_the_step_queue_never_kill_the_worker(client: Client, worker: Worker, item: bytes) -> None:
    client.runtime.client.lpush(queue_key(client), item)
    wait_until(lambda: client.runtime.client.llen(queue_key(client)) == 0, timeout=30)
    assert worker.alive()


def test_the_worker_still_runs_steps_after_all_that(client: Client, worker: Worker) -> None:
    assert wait_settled(client, client.submit("h_slow", {"text": "still here"})).status.value == "succeeded"
    assert worker.alive() and "Unrecoverable error" not in worker.log()
