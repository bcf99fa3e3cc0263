"""The orchestrator's paths: linear pipeline, conditional route, fan-out/fan-in with a failing branch, retry then
success, human review -> resolve -> resume, fallback escalation, fail_run with a webhook alert, the watchdog's
deadline escalation, cancel, the client API's typed errors, and runs started by a plain Celery client.

Most run in-process on :class:`teamster.testing.WorkflowEnvironment` (a real Redis, the real executor, step
messages drained in the test's thread: deterministic, no polling). The paths that are about worker processes --
a plain Celery client's ``start_run``, cancelling a step while a worker runs it, waiting on a run that goes on --
use a real worker.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from teamster.config.settings import load_settings
from teamster.errors import (
    IdempotencyConflict,
    InvalidInput,
    InvalidOperation,
    PayloadRejected,
    RunFailed,
    RunTimeout,
    StoreUnavailable,
    UnknownWorkflow,
)
from teamster.orchestrator.client import Client
from teamster.orchestrator.models import DeadLetterStatus, StepStatus
from teamster.testing import WorkflowEnvironment
from tests.harness import Worker, wait_until

pytestmark = pytest.mark.integration

MODULES = "tests.workflows,teamster.examples.triage"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def webhook() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts"
    server.shutdown()


@pytest.fixture()
def env() -> Iterator[WorkflowEnvironment]:
    with WorkflowEnvironment(MODULES.split(",")) as environment:
        yield environment


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=MODULES.split(",")))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("orch", concurrency=6, env={"workflow_modules": MODULES}) as w:
        yield w


def statuses(client: Client, run_id: str) -> dict[str, str]:
    return {s.step_key: s.status.value for s in client.steps(run_id)}


def test_linear_pipeline_returns_the_typed_output(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_linear", {"text": "hello world"})
    out = env.result(run_id)
    assert type(out).__name__ == "LinearOut"
    assert out.model_dump() == {"summary": "hello world", "label": "normal", "report": "normal: hello world"}
    assert statuses(client, run_id) == {"summarize": "succeeded", "label": "succeeded", "report": "succeeded"}
    run = client.status(run_id)
    assert run.state_version == 3 and run.trace_id and run.finished_at


def test_conditional_route_records_why_a_step_was_skipped(env: WorkflowEnvironment) -> None:
    client = env.client
    urgent = client.submit("t_routed", {"text": "urgent: server down"})
    normal = client.submit("t_routed", {"text": "a question"})
    assert env_settled(env, urgent).status.value == "succeeded"
    assert env_settled(env, normal).status.value == "succeeded"
    assert statuses(client, urgent) == {"label": "succeeded", "escalate": "succeeded", "queue": "skipped",
                                        "done": "succeeded"}
    skipped = client.runtime.store.get_step(normal, "escalate")
    assert skipped is not None and skipped.status == StepStatus.SKIPPED
    assert skipped.reason == "condition 'is_urgent' is false"
    assert client.status(normal).output["text"] == "a question [queued] [done]"


def test_fan_out_fan_in_waits_for_every_branch(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_fanout", {"text": "x", "items": ["a", "talk-b", "c", "d"]})
    assert env_settled(env, run_id).status.value == "succeeded"
    out = client.status(run_id).output
    assert out["text"] == "4 checked"
    assert [c["item"] for c in out["checks"]] == ["a", "talk-b", "c", "d"]  # in branch order


def test_fan_out_with_a_failing_branch_escalates_and_nothing_downstream_runs(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_fanout", {"text": "x", "items": ["a", "bad-1", "c"]})
    run = env_settled(env, run_id)
    assert run.status.value == "escalated"
    steps = statuses(client, run_id)
    assert steps["check[1]"] == "cannot_complete"
    assert steps["check[0]"] == steps["check[2]"] == "succeeded"
    assert "checks" not in steps and "total" not in steps  # the join never became ready
    entry = client.dlq.get(run.error["dlq_entry"])
    # I6: the entry alone explains the failure and allows a replay
    assert (entry.run_id, entry.step_key, entry.step_id, entry.workflow) == (run_id, "check[1]", "check", "t_fanout")
    assert entry.error_type == "cannot_complete" and entry.message == "cannot check bad-1"
    assert entry.input == {"item": "bad-1"} and entry.attempts == 1 and entry.trace_id == run.trace_id
    assert entry.state_version >= 1 and entry.created_at > run.created_at
    assert {e["type"] for e in entry.journal_excerpt} >= {"step_start", "model_call", "outcome"}
    assert entry.status == DeadLetterStatus.OPEN and entry.escalation.startswith("escalate")
    with pytest.raises(RunFailed) as info:
        client.result(run_id, timeout=5)
    assert info.value.status == "escalated" and info.value.reason["dlq_entry"] == entry.entry_id


def test_retry_then_success(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_linear", {"text": "throttle-once please"})
    assert env_settled(env, run_id).status.value == "succeeded"
    step = client.runtime.store.get_step(run_id, "summarize")
    assert step is not None and step.attempts == 2
    retries = client.journal(run_id, step="summarize", types=["retry"])
    assert len(retries) == 1 and retries[0].data["error_type"] == "model_throttled"


def test_retries_are_bounded_then_dead_lettered(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_linear", {"text": "throttle-always"})
    run = env_settled(env, run_id)
    assert run.status.value == "escalated"
    step = client.runtime.store.get_step(run_id, "summarize")
    assert step is not None and step.attempts == 3  # the agent's RetryPolicy(max_attempts=3)
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.error_type == "model_throttled" and entry.retryable and entry.attempts == 3


def test_human_review_then_resolve_resumes_the_run(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_human", {"text": "ask someone"})
    run = env_settled(env, run_id)
    assert run.status.value == "needs_human"
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.kind == "needs_human" and entry.question == "Which customer is this about?"
    with pytest.raises(InvalidInput):  # validated against the step's output model; nothing changes
        client.dlq.resolve(entry.entry_id, {"wrong": 1}, by="alice")
    assert client.dlq.get(entry.entry_id).status == DeadLetterStatus.OPEN
    client.dlq.resolve(entry.entry_id, {"summary": "customer is ACME"}, by="alice", reason="checked CRM")
    run = env_settled(env, run_id)
    assert run.status.value == "succeeded"
    assert run.output["summarize"] == {"summary": "customer is ACME"}
    closed = client.dlq.get(entry.entry_id)
    assert (closed.status, closed.closed_by, closed.close_reason) == (DeadLetterStatus.RESOLVED, "alice", "checked CRM")
    actions = client.journal(run_id, types=["dlq_resolve"])
    assert actions and actions[0].data["by"] == "alice"
    with pytest.raises(InvalidOperation):
        client.dlq.resolve(entry.entry_id, {"summary": "again"}, by="bob")


def test_dlq_retry_with_an_edited_state(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_linear", {"text": "unsure about this"})
    run = env_settled(env, run_id)
    assert run.status.value == "escalated"
    entry_id = run.error["dlq_entry"]
    with pytest.raises(InvalidInput):
        client.dlq.retry(entry_id, by="ops", state_patch={"text": 42})
    client.dlq.retry(entry_id, by="ops", reason="clarified the text", state_patch={"text": "now it is clear"})
    run = env_settled(env, run_id)
    assert run.status.value == "succeeded" and run.output["summary"] == "now it is clear"
    assert client.dlq.get(entry_id).status == DeadLetterStatus.RETRIED


def test_discard_fails_the_run_with_the_reason(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_linear", {"text": "unsure again"})
    run = env_settled(env, run_id)
    client.dlq.discard(run.error["dlq_entry"], by="ops", reason="duplicate ticket")
    run = client.status(run_id)
    assert run.status.value == "failed" and "discarded by ops: duplicate ticket" in run.error["message"]
    journal = client.journal(run_id, types=["dlq_discard"])
    assert journal[0].data == {"entry_id": run.error["dlq_entry"], "by": "ops", "reason": "duplicate ticket"}


def test_fallback_agent_then_human_review(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = client.submit("t_fallback", {"text": "fallback-needed"})
    run = env_settled(env, run_id)
    assert run.status.value == "succeeded" and run.output["label"] == {"label": "fallback"}
    entries = client.dlq.list(run_id=run_id, include_closed=True)
    assert [(e.status, e.escalation) for e in entries] == [
        (DeadLetterStatus.AUTO_RETRIED, "retry_with(agent=t_label_fallback)")]
    step = client.runtime.store.get_step(run_id, "label")
    assert step is not None and step.fallback == {"agent": "t_label_fallback", "model": None}


def test_fail_run_policy_fails_the_run_and_alerts_a_webhook(env: WorkflowEnvironment, webhook: str) -> None:
    from teamster import Workflow, fail_run
    from tests.workflows import Doc, summarize

    hooked = Workflow("t_failing_hook", input_model=Doc)
    hooked.step("summarize", summarize, escalate=[fail_run(alert=webhook)])
    hooked.register()
    _Hook.received.clear()
    client = env.client
    run_id = client.submit("t_failing_hook", {"text": "unsure what this is"})
    run = env_settled(env, run_id)
    assert run.status.value == "failed" and run.error["escalation"] == "fail_run()"
    alert = _Hook.received[0]  # posted by the process that dead-lettered the step, before it moved on
    assert alert["event"] == "teamster.run_failed" and alert["entry"]["run_id"] == run_id
    assert alert["entry"]["error_type"] == "cannot_complete"


def test_watchdog_escalates_a_run_without_progress(env: WorkflowEnvironment) -> None:
    # nothing drains the queue: the run cannot progress and passes its 1 s deadline
    idle = env.client
    run_id = idle.submit("t_deadline", {"text": "stuck"})
    wait_until(lambda: env.watchdog_scan().escalated_runs, timeout=10, interval=0.2)
    run = idle.status(run_id)
    assert run.status.value == "escalated" and run.error["error_type"] == "run_deadline_exceeded"
    entry = idle.dlq.get(run.error["dlq_entry"])
    assert entry.kind == "deadline" and entry.step_key == "summarize"


def test_a_run_that_made_progress_is_not_escalated_when_its_old_deadline_comes(env: WorkflowEnvironment) -> None:
    """Commits do not move a run's score in the active set; the watchdog reads progress_at when the score is due."""
    keys = env.runtime.keys
    run_id = env.client.submit("t_linear", {"text": "making progress"})
    env.deliver()  # the first step commits: progress
    run = env.client.status(run_id)
    assert run.status.value == "running" and run.state_version == 1
    env.runtime.client.zadd(keys.active_runs, {run_id: 0.0})  # its deadline as first set, long past
    report = env.watchdog_scan()
    assert report.escalated_runs == 0 and env.client.status(run_id).status.value == "running"
    score = env.runtime.client.zscore(keys.active_runs, run_id)
    assert score == pytest.approx(run.progress_at + env.settings.run_deadline_seconds)
    env.drain()
    assert env.client.status(run_id).status.value == "succeeded"
    assert env.runtime.client.zscore(keys.active_runs, run_id) is None


def test_cancel_stops_the_run_and_records_why(client: Client, worker: Worker) -> None:
    run_id = client.submit("t_linear", {"text": "slow 2 cancel me"})
    wait_until(lambda: statuses(client, run_id).get("summarize") == "running", timeout=10)
    client.cancel(run_id, reason="customer withdrew")
    run = client.status(run_id)
    assert run.status.value == "cancelled"
    with pytest.raises(RunFailed) as info:
        client.result(run_id, timeout=1)
    assert info.value.status == "cancelled"
    wait_until(lambda: client.journal(run_id, step="summarize", types=["commit_rejected", "outcome"]), timeout=15)
    assert statuses(client, run_id) == {"summarize": "cancelled"}  # the late result was not committed
    assert not client.journal(run_id, types=["commit"])
    with pytest.raises(InvalidOperation):
        client.cancel(run_id)


def test_submit_is_idempotent_and_validates_before_writing(env: WorkflowEnvironment) -> None:
    client = env.client
    first = client.submit("t_linear", {"text": "same"}, idempotency_key="order-42")
    assert client.submit("t_linear", {"text": "same"}, idempotency_key="order-42") == first
    with pytest.raises(IdempotencyConflict):
        client.submit("t_linear", {"text": "different"}, idempotency_key="order-42")
    assert len(client.runs(limit=1000, workflow="t_linear")) == len({r.run_id for r in client.runs(limit=1000)
                                                                      if r.workflow == "t_linear"})
    def run_keys() -> set[str]:
        prefix = client.settings.key_prefix
        return set(client.runtime.client.scan_iter(match=f"{prefix}:run:*", count=1000))

    runs_before, keys_before = client.runtime.client.zcard(client.runtime.keys.runs), run_keys()
    with pytest.raises(InvalidInput) as info:
        client.submit("t_linear", {"txt": "typo"})
    assert "text" in str(info.value)
    with pytest.raises(UnknownWorkflow):
        client.submit("no_such_workflow", {})
    with pytest.raises(PayloadRejected):
        client.submit("t_linear", {"text": "x" * (client.settings.max_payload_bytes + 1)})
    assert client.runtime.client.zcard(client.runtime.keys.runs) == runs_before  # nothing was written
    assert run_keys() - keys_before == set()


def test_result_times_out_while_the_run_goes_on(client: Client, worker: Worker) -> None:
    run_id = client.submit("t_linear", {"text": "slow 1 result timeout"})
    with pytest.raises(RunTimeout):
        client.result(run_id, timeout=0.2)
    assert client.result(run_id, timeout=30).summary.startswith("slow 1")


def test_plain_celery_client_can_start_a_run(client: Client, worker: Worker) -> None:
    from celery import Celery

    plain = Celery(broker=client.redis_url, backend=client.redis_url)
    plain.conf.update(broker_transport_options={"global_keyprefix": f"{client.settings.key_prefix}:celery:"},
                      result_backend_transport_options={"global_keyprefix": f"{client.settings.key_prefix}:celery:"})
    reply = plain.send_task("teamster.start_run", queue="teamster.control", kwargs={"message": {
        "workflow": "t_linear", "input": {"text": "from plain celery"}, "idempotency_key": "plain-1"}}).get(timeout=30)
    assert reply["created"] is True
    assert client.result(reply["run_id"], timeout=30).summary == "from plain celery"
    bad = plain.send_task("teamster.start_run", queue="teamster.control", kwargs={"message": {
        "workflow": "t_linear", "input": {"wrong": 1}}})
    with pytest.raises(Exception) as info:
        bad.get(timeout=30)
    assert "text" in str(info.value) and "Field required" in str(info.value)


def test_redis_down_is_a_typed_error() -> None:
    down = Client(load_settings(redis_url="redis://127.0.0.1:1/0", workflow_modules=MODULES.split(",")))
    with pytest.raises(StoreUnavailable):
        down.submit("t_linear", {"text": "x"})
    with pytest.raises(StoreUnavailable):
        down.status("run_x")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url("redis://127.0.0.1:1/0").ping()


def env_settled(env: WorkflowEnvironment, run_id: str) -> Any:
    """Drain the environment's queue; the run is then settled (final or waiting for an operator)."""
    env.drain()
    return env.client.status(run_id)
