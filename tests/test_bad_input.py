"""Bad input from every side, against the session's Redis and a real worker: each gets a clear, typed error.

Nothing is lost or half-written (run keys counted before and after), no run is left stuck, and the worker keeps
working: the last test runs a normal ticket to success on the same worker process.

* raw broker messages: a body that is not JSON (decode error logged, message dropped, nothing executed), a
  pickle-serialised step message (refused: ContentDisallowed, never executed -- invariant I5);
* step messages that are JSON but wrong: schema-invalid payloads (pydantic validation error, nothing written),
  an unknown run id or step (``missing``, nothing created);
* ``submit``: oversized input (PayloadRejected), schema-invalid input (InvalidInput naming the field), unknown
  workflow (UnknownWorkflow); a workflow naming an unknown agent (WorkflowDefinitionError at registration);
* a model asking for a tool outside its agent's allow-list (blocked, journaled as ``tool_blocked``, the tool
  never runs -- its Redis ledger stays empty);
* ``teamster.start_run`` from a plain Celery client with a bad payload or an unknown workflow;
* an operator resolving a dead-letter entry with output that fails the step's output model (InvalidInput, the
  entry stays open).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from teamster.config.celeryconfig import START_RUN_TASK, STEP_TASK
from teamster.config.settings import load_settings
from teamster.errors import (
    InvalidInput,
    PayloadRejected,
    UnknownWorkflow,
    WorkflowDefinitionError,
)
from teamster.examples.triage import SAMPLE_TICKETS, Ticket
from teamster.orchestrator.client import Client
from teamster.orchestrator.models import DeadLetterStatus, RunStatus, StepStatus
from teamster.orchestrator.workflow import Workflow, get_workflow
from teamster.testing import model_calls_key
from tests.chaos_harness import MODULES, ROGUE_WORKFLOW, ledger_keys
from tests.harness import Worker, wait_settled, wait_until

pytestmark = pytest.mark.integration

IDLE_TAGS = ("T-raw-", "T-unknown-step-")


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=MODULES.split(",")))


@pytest.fixture(scope="module")
def idle(client: Client) -> Iterator[Client]:
    """A client whose step messages go to a queue no worker consumes: its runs stay queued unless executed."""
    idle = Client(load_settings(workflow_modules=MODULES.split(","), steps_queue="nobody-listens"),
                  redis_url=client.redis_url)
    yield idle
    for run in idle.runs(limit=1000, status=["running", "pending"]):
        if str(run.input.get("ticket_id", "")).startswith(IDLE_TAGS):
            idle.cancel(run.run_id, reason="test cleanup")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("badinput", concurrency=2, env={"workflow_modules": MODULES}) as w:
        yield w


def ticket(tag: str, base: int = 0) -> dict[str, str]:
    """A sample ticket with a unique id."""
    return {**SAMPLE_TICKETS[base], "ticket_id": f"T-{tag}-{uuid.uuid4().hex[:6]}"}


def footprint(client: Client) -> dict[str, int]:
    """How much run data exists: the run index, run keys, journals and dead-letter entries."""
    redis, prefix = client.runtime.client, client.settings.key_prefix

    def count(pattern: str) -> int:
        return sum(1 for _ in redis.scan_iter(match=f"{prefix}:{pattern}", count=1000))

    return {"runs": int(redis.zcard(client.runtime.keys.runs)), "run_keys": count("run:*"),
            "journals": count("journal:*"), "leases": count("lease:*"),
            "dead_letters": int(redis.zcard(client.runtime.keys.dlq_all))}


def steps_queue_length(client: Client) -> int:
    """Messages waiting in the client's steps queue (the Redis list kombu keeps under the Celery key prefix)."""
    key = f"{client.settings.key_prefix}:celery:{client.settings.steps_queue}"
    return int(client.runtime.client.llen(key))


def publish_raw(client: Client, body: Any, *, task_id: str, **options: Any) -> None:
    """Publish a teamster.step message by hand (kombu Producer), bypassing the client's JSON-only path."""
    app: Celery = client.runtime.enqueuer.app  # type: ignore[attr-defined]
    message = app.amqp.as_task_v2(task_id, STEP_TASK, args=(), kwargs={})
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        producer.publish(body, exchange="", routing_key=client.settings.steps_queue, headers=message.headers,
                         **message.properties, **options)


def send_step(client: Client, payload: Any) -> Any:
    """send_task('teamster.step') with a JSON payload; returns the AsyncResult."""
    app: Celery = client.runtime.enqueuer.app  # type: ignore[attr-defined]
    return app.send_task(STEP_TASK, kwargs=payload, queue=client.settings.steps_queue,
                         task_id=f"bad-{uuid.uuid4().hex[:8]}")


def untouched(client: Client, run_id: str) -> None:
    """The run was never executed: its first step is still queued, never started, no model was called."""
    step = client.runtime.store.get_step(run_id, "classify")
    assert step is not None and step.status == StepStatus.QUEUED and step.attempts == 0
    assert not client.journal(run_id, types=["step_start", "model_call", "commit"])
    calls = client.runtime.client.hget(model_calls_key(client.settings.key_prefix), f"{run_id}:classify")
    assert not calls


# --------------------------------------------------------------------------- raw broker messages


def test_malformed_json_is_logged_as_a_decode_error_and_dropped(client: Client, idle: Client,
                                                                worker: Worker) -> None:
    waiting = steps_queue_length(idle)
    run_id = idle.submit("ticket_triage", ticket("raw-json"))
    assert steps_queue_length(idle) == waiting + 1  # the queue key is right: its step message waits there
    before = footprint(client)
    task_id = f"malformed-{uuid.uuid4().hex[:8]}"
    publish_raw(client, b'{"message": {"run_id": "' + run_id.encode() + b'", "step_key": "classify"',
                task_id=task_id, content_type="application/json", content_encoding="utf-8")
    wait_until(lambda: task_id in worker.log() and "Can't decode message body" in worker.log(), timeout=30)
    wait_until(lambda: steps_queue_length(client) == 0, timeout=10)  # consumed and acknowledged, not requeued
    assert worker.alive()
    assert f"Task teamster.step[{task_id}] received" not in worker.log()
    untouched(client, run_id)
    assert footprint(client) == before


def test_pickle_message_is_refused_and_never_executed(client: Client, idle: Client, worker: Worker) -> None:
    run_id = idle.submit("ticket_triage", ticket("raw-pickle"))
    before = footprint(client)
    refusals = worker.log().count("Refusing to deserialize untrusted content of type pickle")
    task_id = f"pickled-{uuid.uuid4().hex[:8]}"
    kwargs = {"message": {"run_id": run_id, "step_key": "classify"}}
    body: tuple[tuple[()], dict[str, Any], dict[str, Any]] = ((), kwargs, {})  # protocol 2: args, kwargs, embed
    publish_raw(client, body, task_id=task_id, serializer="pickle")
    wait_until(lambda: worker.log().count("Refusing to deserialize untrusted content of type pickle") > refusals,
               timeout=30)
    assert "ContentDisallowed" in worker.log()
    wait_until(lambda: steps_queue_length(client) == 0, timeout=10)
    assert worker.alive()
    assert f"Task teamster.step[{task_id}] received" not in worker.log()
    untouched(client, run_id)
    assert footprint(client) == before


# --------------------------------------------------------------------------- step messages with a bad payload


@pytest.mark.parametrize(("payload", "problem"), [
    pytest.param({"message": {"step_key": "classify"}}, "run_id: Field required", id="missing-run-id"),
    pytest.param({"message": {"run_id": 42, "step_key": ["classify"]}}, "run_id: Input should be a valid string",
                 id="wrong-types"),
    pytest.param({"message": {"run_id": "run_x", "step_key": "classify", "extra": True}},
                 "extra: Extra inputs are not permitted", id="extra-field"),
    pytest.param({"message": {"run_id": "run_x; DEL *", "step_key": "classify"}}, "run_id: String should match",
                 id="run-id-pattern"),
    pytest.param({"message": "run_x:classify"}, "Invalid JSON", id="not-an-object"),
])
def test_schema_invalid_step_message_fails_with_a_validation_error(client: Client, worker: Worker,
                                                                   payload: dict[str, Any], problem: str) -> None:
    before = footprint(client)
    result = send_step(client, payload)
    with pytest.raises(InvalidInput) as info:  # the client gets the typed error, naming the field
        result.get(timeout=30)
    assert "step message does not match StepMessage" in str(info.value) and problem in str(info.value)
    assert result.state == "FAILURE"
    assert footprint(client) == before
    assert worker.alive()


VALIDATION_MESSAGE_BUG = (
    "BUG: tasks/steps.py step and tasks/control.py start_run use Celery's pydantic=True argument validation; "
    "pydantic_core.ValidationError has empty args, so the JSON result backend stores exc_message=[] and the "
    "Celery client gets Exception(\"<class 'pydantic_core._pydantic_core.ValidationError'>([])\"): no model, no "
    "field, no reason (only result.traceback and the worker log have them). Suggested fix: validate the message "
    "inside the task with agents.runner.validate_input (raises config.errors.InvalidInput naming the fields, "
    "which the client re-creates as InvalidInput)"
)


@pytest.mark.parametrize(("task", "payload", "field"), [
    pytest.param(STEP_TASK, {"message": {"step_key": "classify"}}, "run_id", id="step"),
    pytest.param(START_RUN_TASK, {"message": {"input": {}}}, "workflow", id="start_run"),
])
def test_validation_error_reaching_the_client_names_the_field(client: Client, worker: Worker, task: str,
                                                              payload: dict[str, Any], field: str) -> None:
    app: Celery = client.runtime.enqueuer.app  # type: ignore[attr-defined]
    queue = client.settings.steps_queue if task == STEP_TASK else client.settings.control_queue
    with pytest.raises(Exception) as info:
        app.send_task(task, kwargs=payload, queue=queue).get(timeout=30)
    assert field in str(info.value), str(info.value)


def test_step_message_without_its_argument_fails_clearly(client: Client, worker: Worker) -> None:
    before = footprint(client)
    result = send_step(client, {"msg": {"run_id": "run_x", "step_key": "classify"}})
    with pytest.raises(TypeError) as info:
        result.get(timeout=30)
    assert "message" in str(info.value) or "msg" in str(info.value)
    assert footprint(client) == before


def test_step_message_for_an_unknown_run_is_missing_and_creates_nothing(client: Client, idle: Client,
                                                                        worker: Worker) -> None:
    before = footprint(client)
    ghost = f"run_ghost{uuid.uuid4().hex[:12]}"
    reply = send_step(client, {"message": {"run_id": ghost, "step_key": "classify"}}).get(timeout=30)
    assert reply == {"status": "missing", "run_id": ghost, "step_key": "classify"}
    assert footprint(client) == before
    assert not list(client.runtime.client.scan_iter(match=f"*{ghost}*"))
    # a known run, but a step it does not have: missing too, and the run is left alone
    run_id = idle.submit("ticket_triage", ticket("unknown-step"))
    version = idle.status(run_id).state_version
    events = len(idle.journal(run_id))
    before = footprint(client)
    reply = send_step(client, {"message": {"run_id": run_id, "step_key": "no_such_step"}}).get(timeout=30)
    assert reply["status"] == "missing"
    assert footprint(client) == before
    assert idle.status(run_id).state_version == version and len(idle.journal(run_id)) == events
    untouched(client, run_id)


# --------------------------------------------------------------------------- submit


def test_oversized_input_is_rejected_before_anything_is_written(client: Client) -> None:
    before = footprint(client)
    big = {**ticket("big"), "body": "x" * (client.settings.max_payload_bytes + 1)}
    with pytest.raises(PayloadRejected) as info:
        client.submit("ticket_triage", big, idempotency_key="oversized")
    assert "TEAMSTER_MAX_PAYLOAD_BYTES" in info.value.message and info.value.details["size"] > 256 * 1024
    assert footprint(client) == before


@pytest.mark.parametrize(("value", "fields"), [
    pytest.param({"ticket_id": "T-1"}, {"customer", "subject", "body"}, id="missing-fields"),
    pytest.param({"ticket_id": 1234, "customer": ["Ada"], "subject": None, "body": "hello"},
                 {"ticket_id", "customer", "subject"}, id="wrong-types"),
    pytest.param({"ticket_id": "T-2", "customer": "Ada", "subject": "s", "body": "x" * 20_001}, {"body"},
                 id="body-too-long"),
    pytest.param({"ticket_id": "", "customer": "Ada", "subject": "s", "body": "hi"}, {"ticket_id"},
                 id="empty-ticket-id"),
    pytest.param(["not", "an", "object"], {"(root)"}, id="not-an-object"),
])
def test_schema_invalid_input_names_the_field_and_writes_nothing(client: Client, value: Any,
                                                                 fields: set[str]) -> None:
    before = footprint(client)
    with pytest.raises(InvalidInput) as info:
        client.submit("ticket_triage", value, idempotency_key=f"invalid-{uuid.uuid4().hex[:6]}")
    named = {".".join(str(p) for p in err["loc"]) or "(root)" for err in info.value.details["errors"]}
    assert fields <= named, (named, info.value.message)
    for name in fields - {"(root)"}:
        assert name in info.value.message
    assert "Ticket" in info.value.message
    assert footprint(client) == before


def test_unknown_workflow_is_refused(client: Client) -> None:
    before = footprint(client)
    with pytest.raises(UnknownWorkflow) as info:
        client.submit("ticket_triage_v9", ticket("unknown-wf"))
    assert "ticket_triage_v9" in info.value.message and "ticket_triage" in info.value.message
    assert info.value.hint
    assert footprint(client) == before


def test_workflow_naming_an_unknown_agent_is_refused_at_registration() -> None:
    wf = Workflow("bad_input_unknown_agent", input_model=Ticket)
    wf.step("classify", "no_such_agent")
    with pytest.raises(WorkflowDefinitionError) as info:
        wf.register()
    assert "no_such_agent" in info.value.message and "classify" in info.value.message
    with pytest.raises(UnknownWorkflow):
        get_workflow("bad_input_unknown_agent")


# --------------------------------------------------------------------------- the model misbehaves


def test_disallowed_tool_call_is_blocked_journaled_and_never_run(client: Client, worker: Worker) -> None:
    run_id = client.submit(ROGUE_WORKFLOW, ticket("rogue"))
    run = wait_settled(client, run_id, timeout=60)
    blocked = client.journal(run_id, types=["tool_blocked"])
    assert [(e.data["tool"], e.data["reason"]) for e in blocked] == [
        ("chaos_tag_ticket", "not in the agent's allow-list")]
    assert not [e for e in client.journal(run_id, types=["tool_call", "tool_result"])
                if e.data.get("tool") == "chaos_tag_ticket"]
    ledger, applied, calls = ledger_keys(client.settings.key_prefix)
    redis = client.runtime.client
    for key in (ledger, applied, calls):
        assert not [k for k in redis.hkeys(key) if k.startswith(run_id)]
    step = client.runtime.store.get_step(run_id, "act")
    assert step is not None and step.tool_calls == 0
    # the model was told why, and could still finish within its contract
    assert run.status == RunStatus.SUCCEEDED
    assert "not allowed" in run.output["act"]["note"]


# --------------------------------------------------------------------------- plain Celery clients


@pytest.fixture(scope="module")
def plain(client: Client) -> Celery:
    prefix = f"{client.settings.key_prefix}:celery:"
    app = Celery(broker=client.redis_url, backend=client.redis_url)
    app.conf.update(broker_transport_options={"global_keyprefix": prefix},
                    result_backend_transport_options={"global_keyprefix": prefix})
    return app


@pytest.mark.parametrize("message", [
    pytest.param({"input": {}}, id="missing-workflow"),
    pytest.param({"workflow": "ticket_triage", "input": "not an object"}, id="input-not-an-object"),
    pytest.param({"workflow": "ticket_triage", "input": {}, "priority": "high"}, id="extra-field"),
    pytest.param({"workflow": "", "input": {}}, id="empty-workflow"),
])
def test_start_run_with_a_bad_payload_fails_with_a_validation_error(client: Client, plain: Celery, worker: Worker,
                                                                     message: dict[str, Any]) -> None:
    before = footprint(client)
    result = plain.send_task(START_RUN_TASK, queue=client.settings.control_queue, kwargs={"message": message})
    with pytest.raises(InvalidInput) as info:
        result.get(timeout=30)
    assert "start_run message does not match StartRunMessage" in str(info.value)
    assert footprint(client) == before


def test_start_run_with_an_unknown_workflow_or_invalid_input_is_typed(client: Client, plain: Celery,
                                                                      worker: Worker) -> None:
    before = footprint(client)
    result = plain.send_task(START_RUN_TASK, queue=client.settings.control_queue, kwargs={"message": {
        "workflow": "no_such_workflow", "input": {"text": "x"}}})
    with pytest.raises(UnknownWorkflow) as info:
        result.get(timeout=30)
    assert "no_such_workflow" in str(info.value)
    result = plain.send_task(START_RUN_TASK, queue=client.settings.control_queue, kwargs={"message": {
        "workflow": "ticket_triage", "input": {"ticket_id": "T-x"}}})
    with pytest.raises(InvalidInput) as invalid:
        result.get(timeout=30)
    assert "customer" in str(invalid.value) and "body" in str(invalid.value)
    assert footprint(client) == before


# --------------------------------------------------------------------------- operators


def test_resolving_a_dead_letter_with_invalid_output_keeps_the_entry_open(client: Client, worker: Worker) -> None:
    unknown_order = next(t for t in SAMPLE_TICKETS if "Z9999" in t["body"])
    run_id = client.submit("ticket_triage", {**unknown_order, "ticket_id": f"T-dlq-{uuid.uuid4().hex[:6]}"})
    run = wait_settled(client, run_id, timeout=60)
    assert run.status == RunStatus.ESCALATED and run.error is not None
    entry_id = run.error["dlq_entry"]
    assert client.dlq.get(entry_id).step_key == "extract_order"
    events = len(client.journal(run_id))
    for bad in ({"order_id": 5, "status": None}, {"status": "shipped"}, {"order_id": "Z9999", "status": "x",
                                                                          "carrier": {"name": "DHL"}}):
        with pytest.raises(InvalidInput) as info:
            client.dlq.resolve(entry_id, bad, by="ops", reason="typo")
        assert "OrderFacts" in info.value.message
    assert "order_id" in str(info.value) or "carrier" in str(info.value)
    entry = client.dlq.get(entry_id)
    assert entry.status == DeadLetterStatus.OPEN and entry.closed_by is None
    after = client.status(run_id)
    assert after.status == RunStatus.ESCALATED and after.state_version == run.state_version
    step = client.runtime.store.get_step(run_id, "extract_order")
    assert step is not None and step.status == StepStatus.CANNOT_COMPLETE
    assert len(client.journal(run_id)) == events  # not even a dlq_resolve event


# --------------------------------------------------------------------------- and the worker is fine


def test_the_worker_still_runs_a_normal_ticket_afterwards(client: Client, worker: Worker) -> None:
    pid = worker.pid
    run_id = client.submit("ticket_triage", ticket("after-the-storm"))
    out = client.result(run_id, timeout=60)
    assert out.model_dump()["approved"] is True
    assert worker.alive() and worker.pid == pid
    assert "Unrecoverable error" not in worker.log()
    assert steps_queue_length(client) == 0
