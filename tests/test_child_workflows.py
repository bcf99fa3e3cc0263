"""Child workflows: a step starts a run of another workflow, parks (no thread, no lease), and goes on with the child's
output -- or fails typed, linked to the child's dead-letter entry.

The state machine runs in-process on :class:`teamster.testing.WorkflowEnvironment` (the session's real Redis, the
real executor, messages delivered one by one or drained in the test's thread): the child succeeds, escalates, is
fixed and the parent's entry retried, is cancelled, the parent is cancelled (recursively), redeliveries while parked,
lost messages and a lost wake-up, a worker that loses its lease before it could start the child, the parent's
progress deadline, the operator commands. The paths that are about worker processes -- a parent cancelled while a
worker runs its child's slow step, workers killed (SIGKILL) around the child's creation and while it runs -- use real
workers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from teamster.config.settings import load_settings
from teamster.errors import ChildRunFailed, InvalidOperation
from teamster.orchestrator.child_steps import ChildSteps
from teamster.orchestrator.children import child_run_id
from teamster.orchestrator.cli import app
from teamster.orchestrator.client import Client
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import Delivery, RunRecord, RunStatus, StepStatus
from teamster.orchestrator.store import Tx
from teamster.orchestrator.transitions import Transitions
from teamster.orchestrator.watchdog import Watchdog
from teamster.orchestrator.workflow import get_workflow
from teamster.testing import WorkflowEnvironment
from tests.harness import Worker, wait_until

pytestmark = pytest.mark.integration

MODULES = "tests.workflows"


@pytest.fixture()
def env() -> Iterator[WorkflowEnvironment]:
    with WorkflowEnvironment([MODULES]) as environment:
        yield environment


def children_of(client: Client, run_id: str) -> list[RunRecord]:
    """Every run whose parent is ``run_id`` (what the store holds, whatever its id)."""
    return [run for run in client.runs(limit=10_000) if run.parent_run == run_id]


def events(client: Client, run_id: str, kind: str, step: str | None = None) -> list[Any]:
    return client.journal(run_id, step=step, types=[kind])


def step_status(client: Client, run_id: str, key: str) -> StepStatus:
    record = client.runtime.store.get_step(run_id, key)
    assert record is not None
    return record.status


# ----------------------------------------------------------------------------- the transaction's conditional writes


def test_conditional_writes_apply_only_where_their_condition_holds(env: WorkflowEnvironment) -> None:
    store, keys = env.runtime.store, env.runtime.keys
    key = f"{keys.prefix}:unit:cond"
    store.client.hset(key, mapping={"status": json.dumps("parked")})
    tx = Tx()
    parked = tx.condition((key, "status", "eq", StepStatus.PARKED))
    running = tx.condition((key, "status", "eq", StepStatus.RUNNING), (key, "status", "exists", None))
    tx.hset(key, {"a": 1}, when=parked)
    tx.hset(key, {"b": 2}, when=running)
    tx.hset(key, {"status": StepStatus.QUEUED}, when=parked)  # conditions are read before any write
    tx.hset(key, {"c": 3})
    assert store.apply(tx) == [True, False]
    assert store.client.hgetall(key) == {"status": '"queued"', "a": "1", "c": "3"}


# ----------------------------------------------------------------------------- the child succeeds


def test_child_succeeds_and_the_parent_continues_with_its_output(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = env.submit("t_parent", {"text": "hello child"})
    [parked] = env.deliver()
    child_id = child_run_id(run_id, "sub")
    assert parked.status == Delivery.PARKED and parked.detail == {"child_run": child_id, "created": True}
    record = client.runtime.store.get_step(run_id, "sub")
    assert record is not None and record.status == StepStatus.PARKED and record.child_run == child_id
    assert client.runtime.store.lease_holder(run_id, "sub") is None  # no lease held while parked
    assert client.runtime.client.zscore(client.runtime.keys.inflight, Keys.member(run_id, "sub")) is None
    assert client.runtime.client.zscore(client.runtime.keys.parked, Keys.member(run_id, "sub")) is not None
    child = client.status(child_id)
    assert (child.parent_run, child.parent_step, child.status) == (run_id, "sub", RunStatus.RUNNING)
    assert child.trace_id == client.status(run_id).trace_id  # one trace for the parent and its child

    env.drain()
    run = client.status(run_id)
    assert run.status == RunStatus.SUCCEEDED
    assert run.output is not None and run.output["sub"] == client.status(child_id).output
    assert run.output["text"] == "hello child => normal: hello child"  # the next step read the child's output
    assert [c.run_id for c in children_of(client, run_id)] == [child_id]
    assert len(events(client, run_id, "child_started")) == 1
    settled = events(client, run_id, "child_settled")
    assert [(e.data["child_run"], e.data["status"]) for e in settled] == [(child_id, "succeeded")]
    assert len(events(client, run_id, "commit", "sub")) == 1
    assert client.runtime.client.zcard(client.runtime.keys.parked) == 0


def test_a_child_given_as_a_workflow_object_and_three_levels_deep(env: WorkflowEnvironment) -> None:
    run = env.run("t_grand", {"text": "deep"})
    assert run.status == RunStatus.SUCCEEDED
    mid = env.client.status(child_run_id(run.run_id, "mid"))
    leaf = env.client.status(child_run_id(mid.run_id, "sub"))
    assert (mid.workflow, mid.parent_run, leaf.workflow, leaf.parent_run) == ("t_parent", run.run_id, "t_linear",
                                                                            mid.run_id)
    assert run.output is not None and run.output["mid"]["text"] == "deep => normal: deep"


def test_redelivery_of_the_parent_message_while_parked_does_nothing(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = env.submit("t_parent", {"text": "duplicates"})
    env.deliver()  # parked
    for _ in range(3):
        client.runtime.enqueuer.enqueue(run_id, "sub")
    env.deliver(1)  # the child's first step
    duplicates = env.deliver(3)
    assert [d.status for d in duplicates] == [Delivery.PARKED] * 3
    assert all(d.detail["redelivery"] for d in duplicates)
    assert step_status(client, run_id, "sub") == StepStatus.PARKED
    env.drain()
    assert client.status(run_id).status == RunStatus.SUCCEEDED
    assert len(children_of(client, run_id)) == 1 and len(events(client, run_id, "child_started")) == 1
    assert len(events(client, run_id, "commit", "sub")) == 1
    ignored = events(client, run_id, "redelivery_ignored", "sub")
    assert len(ignored) == 3 and all(e.data["child_run"] == child_run_id(run_id, "sub") for e in ignored)


# ----------------------------------------------------------------------------- the child fails


def test_an_escalated_child_escalates_the_parent_with_the_link(env: WorkflowEnvironment) -> None:
    client = env.client
    run = env.run("t_parent", {"text": "unsure about this"})
    child = client.status(child_run_id(run.run_id, "sub"))
    assert child.status == RunStatus.ESCALATED and child.error is not None
    assert run.status == RunStatus.ESCALATED and run.error is not None
    assert run.error["error_type"] == ChildRunFailed.code and run.error["step"] == "sub"
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.error_type == "child_run_failed" and not entry.retryable
    assert entry.details["child_run"] == child.run_id and entry.details["child_status"] == "escalated"
    assert entry.details["child_entry"] == child.error["dlq_entry"]
    assert entry.details["child_error_type"] == "cannot_complete"
    assert entry.input == {"text": "unsure about this"}  # what inputs() gave the child
    assert client.runtime.store.get_step(run.run_id, "wrap") is None  # nothing downstream ran


def test_the_parent_steps_escalation_policy_runs(env: WorkflowEnvironment) -> None:
    run = env.run("t_parent_review", {"text": "ask someone"})  # the child needs a human
    child = env.client.status(child_run_id(run.run_id, "sub"))
    assert child.status == RunStatus.NEEDS_HUMAN
    assert run.status == RunStatus.NEEDS_HUMAN and run.error is not None  # human_review() of the child step
    entry = env.client.dlq.get(run.error["dlq_entry"])
    assert entry.details["child_status"] == "needs_human" and entry.escalation == "human_review()"
    # an operator may answer for the child step directly: validated as the child's output model
    with pytest.raises(Exception, match="report"):
        env.client.dlq.resolve(entry.entry_id, {"summary": "s", "label": "l"}, by="ada")
    env.client.dlq.resolve(entry.entry_id, {"summary": "s", "label": "l", "report": "r"}, by="ada")
    env.drain()
    assert env.client.status(run.run_id).status == RunStatus.SUCCEEDED


def test_fix_the_child_then_retry_the_parent_entry_without_a_second_child(env: WorkflowEnvironment) -> None:
    client = env.client
    run = env.run("t_parent", {"text": "unsure, fix me"})
    child = client.status(child_run_id(run.run_id, "sub"))
    assert run.error is not None and child.error is not None
    parent_entry, child_entry = run.error["dlq_entry"], child.error["dlq_entry"]
    client.dlq.resolve(child_entry, {"summary": "fixed by hand"}, by="ada", reason="read the document")
    env.drain()
    assert client.status(child.run_id).status == RunStatus.SUCCEEDED
    assert client.status(run.run_id).status == RunStatus.ESCALATED  # the parent waits for its own operator
    client.dlq.retry(parent_entry, by="ada", reason="the child is fixed")
    env.drain()
    run = client.status(run.run_id)
    assert run.status == RunStatus.SUCCEEDED
    assert run.output is not None and run.output["sub"]["summary"] == "fixed by hand"
    assert [c.run_id for c in children_of(client, run.run_id)] == [child.run_id]
    assert len(events(client, run.run_id, "child_started")) == 1


def test_retrying_the_parent_entry_while_the_child_runs_again_parks_it_again(env: WorkflowEnvironment) -> None:
    client = env.client
    run = env.run("t_parent", {"text": "unsure, retry both"})
    child_id = child_run_id(run.run_id, "sub")
    assert run.error is not None
    child_entry = client.status(child_id).error["dlq_entry"]  # type: ignore[index]
    client.dlq.retry(child_entry, by="ada", state_patch={"text": "retry both, sure now"})  # the child runs again
    client.dlq.retry(run.error["dlq_entry"], by="ada")
    [parked] = [d for d in env.deliver(2) if d.run_id == run.run_id]
    assert parked.status == Delivery.PARKED and parked.detail["created"] is False
    assert [e.data["child_run"] for e in events(client, run.run_id, "step_parked")] == [child_id]
    env.drain()
    run = client.status(run.run_id)
    assert run.status == RunStatus.SUCCEEDED
    assert run.output is not None and run.output["sub"]["summary"] == "retry both, sure now"
    assert len(children_of(client, run.run_id)) == 1 and len(events(client, run.run_id, "child_started")) == 1


def test_retrying_the_parent_entry_after_its_child_failed_for_good_fails_it_again(env: WorkflowEnvironment) -> None:
    client = env.client
    run = env.run("t_parent_review", {"text": "unsure, discard"})
    assert run.status == RunStatus.NEEDS_HUMAN and run.error is not None
    child = client.status(child_run_id(run.run_id, "sub"))
    client.dlq.discard(child.error["dlq_entry"], by="ada", reason="not worth it")  # type: ignore[index]
    assert client.status(child.run_id).status == RunStatus.FAILED
    client.dlq.retry(run.error["dlq_entry"], by="ada")
    env.drain()
    run = client.status(run.run_id)
    assert run.status == RunStatus.NEEDS_HUMAN and run.error is not None
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.details["child_status"] == "failed" and "discarded by ada" in entry.message
    assert len(children_of(client, run.run_id)) == 1  # never a second child


def test_cancelling_a_child_wakes_the_parent_whose_step_fails_typed(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = env.submit("t_parent", {"text": "cancel the child"})
    env.deliver()  # parked
    child_id = child_run_id(run_id, "sub")
    client.cancel(child_id, reason="not needed", by="ada")
    assert step_status(client, run_id, "sub") == StepStatus.QUEUED  # woken in the cancelling transaction
    env.drain()
    run = client.status(run_id)
    assert run.status == RunStatus.ESCALATED and run.error is not None
    assert run.error["error_type"] == "child_run_failed"
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.details["child_status"] == "cancelled" and entry.details["child_entry"] is None
    assert client.status(child_id).status == RunStatus.CANCELLED
    assert not events(client, child_id, "commit")  # the child's queued step never ran


# ----------------------------------------------------------------------------- the parent is cancelled


def test_cancelling_the_parent_cancels_its_children_recursively(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = env.submit("t_grand", {"text": "cancel the family"})
    env.deliver(2)  # t_grand parks on t_parent, which parks on t_linear
    mid = child_run_id(run_id, "mid")
    leaf = child_run_id(mid, "sub")
    assert client.status(leaf).status == RunStatus.RUNNING
    client.cancel(run_id, reason="customer withdrew", by="ada")
    for rid in (run_id, mid, leaf):
        assert client.status(rid).status == RunStatus.CANCELLED, rid
    assert step_status(client, run_id, "mid") == StepStatus.CANCELLED
    assert step_status(client, mid, "sub") == StepStatus.CANCELLED
    assert step_status(client, leaf, "summarize") == StepStatus.CANCELLED
    assert "parent run" in str(client.status(leaf).error)
    [cancelled] = events(client, run_id, "run_cancelled")
    assert cancelled.data["children_cancelled"] == [mid]
    env.drain()  # the leaf's queued message finds its run cancelled
    assert not events(client, leaf, "commit") and not events(client, run_id, "child_settled")
    assert client.runtime.client.zcard(client.runtime.keys.parked) == 0
    with pytest.raises(InvalidOperation):
        client.cancel(mid)


def test_a_step_that_lost_its_lease_cannot_start_a_child(env: WorkflowEnvironment) -> None:
    """Worker A claims the child step and stalls; its lease lapses and B takes over. A's late attempt to start the
    child is rejected by the fencing token: whoever starts the child holds the step, so there is one child."""
    client, store = env.client, env.runtime.store
    run_id = env.submit("t_parent", {"text": "zombie"})
    env.queue.pop()  # this test delivers the step itself
    claim_a = store.claim(run_id, "sub", "A", lease_seconds=0.2)
    assert claim_a.kind == "claimed"
    wait_until(lambda: store.lease_holder(run_id, "sub") is None, timeout=5)
    claim_b = store.claim(run_id, "sub", "B", lease_seconds=0.2)  # B takes over, then dies too
    assert claim_b.kind == "claimed" and claim_b.token > claim_a.token
    wf = get_workflow("t_parent")
    assert claim_a.run is not None and claim_a.step is not None
    late = ChildSteps(env.runtime, Transitions(env.runtime)).run(
        claim_a.run, wf, wf.steps["sub"], claim_a.step, claim_a.token,
        wf.state_model.model_validate(claim_a.run.state), {})
    assert not isinstance(late, tuple) and late.status == Delivery.STALE
    assert store.run_status(child_run_id(run_id, "sub")) is None  # nothing was created
    wait_until(lambda: store.lease_holder(run_id, "sub") is None, timeout=5)
    client.runtime.enqueuer.enqueue(run_id, "sub")  # the watchdog's re-send
    env.drain()
    assert client.status(run_id).status == RunStatus.SUCCEEDED
    assert len(children_of(client, run_id)) == 1 and len(events(client, run_id, "child_started")) == 1
    rejected = events(client, run_id, "commit_rejected", "sub")
    assert [e.data["guard"] for e in rejected] == ["fence"]


# ----------------------------------------------------------------------------- lost messages, the watchdog


def test_lost_messages_around_a_child_are_sent_again_by_the_watchdog() -> None:
    with WorkflowEnvironment([MODULES], stuck_queued_seconds=0.2) as env:
        client = env.client
        run_id = env.submit("t_parent", {"text": "lossy"})
        env.deliver()  # parked: the child's first step message is in the queue...
        env.queue.messages.clear()  # ...and is lost (a worker killed right after the parking transaction)
        child_id = child_run_id(run_id, "sub")
        wait_until(lambda: env.watchdog_scan().requeued, timeout=10, interval=0.1)
        for _ in range(10):
            if client.status(child_id).status != RunStatus.RUNNING:
                break
            env.deliver()
        assert client.status(child_id).status == RunStatus.SUCCEEDED
        assert step_status(client, run_id, "sub") == StepStatus.QUEUED  # woken...
        env.queue.messages.clear()  # ...but its message is lost
        wait_until(lambda: env.watchdog_scan().requeued, timeout=10, interval=0.1)
        env.drain()
        assert client.status(run_id).status == RunStatus.SUCCEEDED
        assert len(children_of(client, run_id)) == 1


def test_the_watchdog_wakes_a_parked_step_whose_child_settled_without_waking_it() -> None:
    with WorkflowEnvironment([MODULES], stuck_queued_seconds=0.2) as env:
        client, keys = env.client, env.runtime.keys
        run_id = env.submit("t_parent", {"text": "unsure: lost wake-up"})
        env.deliver(2)  # parked, then the child escalates and wakes the step
        child_id = child_run_id(run_id, "sub")
        assert client.status(child_id).status == RunStatus.ESCALATED
        # fault injection: the wake-up is undone, as if the settling path had forgotten it
        env.queue.messages.clear()
        member = Keys.member(run_id, "sub")
        tx = Tx().hset(keys.step(run_id, "sub"), {"status": StepStatus.PARKED})
        tx.hset(keys.steps(run_id), {"sub": StepStatus.PARKED})
        tx.call("ZREM", keys.inflight, member).call("ZADD", keys.parked, 0, member)
        env.runtime.store.apply(tx)
        assert env.watchdog_scan().child_wakeups == 1
        env.drain()
        run = client.status(run_id)
        assert run.status == RunStatus.ESCALATED and run.error is not None
        assert run.error["error_type"] == "child_run_failed"
        assert events(client, run_id, "child_settled")[-1].data["by"] == "watchdog"


def test_the_watchdog_cancels_the_child_of_a_parent_that_failed() -> None:
    with WorkflowEnvironment([MODULES], stuck_queued_seconds=0.2) as env:
        client = env.client
        run_id = env.submit("t_parent_failing", {"text": "unsure: the parent fails"})
        env.deliver(2)  # the child step parks; the parent's own step fails the run (fail_run)
        child_id = child_run_id(run_id, "sub")
        assert client.status(run_id).status == RunStatus.FAILED
        assert client.status(child_id).status == RunStatus.RUNNING
        wait_until(lambda: env.watchdog_scan().orphans_cancelled, timeout=10, interval=0.1)
        assert client.status(child_id).status == RunStatus.CANCELLED
        assert step_status(client, run_id, "sub") == StepStatus.CANCELLED
        assert "its parent run" in str(client.status(child_id).error)


def test_a_parent_is_not_escalated_while_its_child_progresses(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = env.submit("t_parent_deadline", {"text": "takes a while"})  # a 1 s progress deadline
    env.deliver()  # parked; its child (t_linear, deadline 1 h) has not started yet
    assert wait_until(lambda: env.watchdog_scan().deadlines_deferred, timeout=10, interval=0.2)
    assert client.status(run_id).status == RunStatus.RUNNING
    env.drain()
    assert client.status(run_id).status == RunStatus.SUCCEEDED


def test_a_stalled_child_is_escalated_and_its_parent_step_fails_typed(env: WorkflowEnvironment) -> None:
    client = env.client
    run_id = env.submit("t_parent_of_stalled", {"text": "stalls"})
    env.deliver()  # parked; the child (t_deadline: 1 s deadline) never runs: nothing drains the queue
    child_id = child_run_id(run_id, "sub")
    env.queue.messages.clear()
    wait_until(lambda: env.watchdog_scan().escalated_runs, timeout=10, interval=0.2)
    assert client.status(child_id).status == RunStatus.ESCALATED
    assert client.status(child_id).error["error_type"] == "run_deadline_exceeded"  # type: ignore[index]
    env.drain()
    run = client.status(run_id)
    assert run.status == RunStatus.ESCALATED and run.error is not None
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.details["child_error_type"] == "run_deadline_exceeded"


def test_replay_of_a_parent_rederives_the_childs_input(env: WorkflowEnvironment) -> None:
    run = env.run("t_parent", {"text": "replay me"})
    report = env.client.replay(run.run_id)
    assert report.identical and report.live_model_calls == 0
    assert {s.step_key: s.kind for s in report.steps} == {"sub": "child", "wrap": "function"}


# ----------------------------------------------------------------------------- what an operator sees


@pytest.fixture()
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkflowEnvironment]:
    with WorkflowEnvironment([MODULES]) as environment:
        monkeypatch.setenv("TEAMSTER_REDIS_URL", str(environment.settings.redis_url))
        monkeypatch.setenv("TEAMSTER_KEY_PREFIX", environment.settings.key_prefix)
        monkeypatch.setenv("TEAMSTER_WORKFLOW_MODULES", MODULES)
        yield environment


def ok(*args: str) -> Result:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result


def test_runs_show_journal_and_dlq_show_link_parent_and_child(cli_env: WorkflowEnvironment) -> None:
    env = cli_env
    run_id = env.submit("t_parent", {"text": "unsure, show me"})
    env.deliver()
    child_id = child_run_id(run_id, "sub")
    shown = " ".join(ok("runs", "show", run_id).output.split())
    assert "parked" in shown and f"child run {child_id} (running)" in shown
    assert f"teamster runs show {child_id}" in shown
    data = json.loads(ok("runs", "show", run_id, "--json").output)
    assert data["steps"][0]["child"] == {"run_id": child_id, "status": "running"}
    assert data["steps"][0]["status"] == "parked"

    env.drain()
    child = env.client.status(child_id)
    assert child.error is not None
    child_entry, parent_entry = child.error["dlq_entry"], env.client.status(run_id).error["dlq_entry"]  # type: ignore[index]
    shown = " ".join(ok("runs", "show", child_id).output.split())
    assert f"parent run {run_id} (step sub)" in shown
    journal = " ".join(ok("journal", run_id).output.split())
    assert "child_started" in journal and "child_settled" in journal and f"child run {child_id}" in journal
    assert f"child of {run_id} step sub" in " ".join(ok("journal", child_id).output.split())

    entry = " ".join(ok("dlq", "show", parent_entry).output.split())
    assert "child_run_failed" in entry and "the child run's dead-letter entry" in entry
    assert f"teamster dlq show {child_entry}" in entry and f"teamster runs show {child_id}" in entry
    data = json.loads(ok("dlq", "show", parent_entry, "--json").output)
    assert data["child_entry"]["entry_id"] == child_entry
    commands = [n["command"] for n in data["next"]]
    assert commands[0] == f"teamster dlq show {child_entry}"
    assert f"teamster dlq retry {parent_entry} --by you --wait" in commands
    assert f"child run of {run_id}" in " ".join(ok("dlq", "show", child_entry).output.split())


# ----------------------------------------------------------------------------- real worker processes

LEASE = 1.5


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=[MODULES], lease_seconds=LEASE))


def test_a_parent_cancelled_while_a_worker_runs_its_childs_slow_step(client: Client) -> None:
    with Worker("child-cancel", concurrency=4, env={"workflow_modules": MODULES, "lease_seconds": LEASE}):
        run_id = client.submit("t_parent", {"text": "slow 3 cancel the parent"})
        child_id = child_run_id(run_id, "sub")
        wait_until(lambda: client.runtime.store.run_status(child_id) is not None
                   and step_status(client, child_id, "summarize") == StepStatus.RUNNING, timeout=30)
        assert step_status(client, run_id, "sub") == StepStatus.PARKED
        client.cancel(run_id, reason="customer withdrew", by="ada")
        assert client.status(run_id).status == RunStatus.CANCELLED
        assert client.status(child_id).status == RunStatus.CANCELLED
        # the worker's slow step ends; its result is dropped, and nothing wakes the cancelled parent
        wait_until(lambda: events(client, child_id, "commit_rejected", "summarize")
                   or events(client, child_id, "outcome", "summarize"), timeout=30)
        wait_until(lambda: client.runtime.store.lease_holder(child_id, "summarize") is None, timeout=30)
        assert not events(client, child_id, "commit")
        assert step_status(client, child_id, "summarize") == StepStatus.CANCELLED
        assert client.status(child_id).status == RunStatus.CANCELLED
        assert not events(client, run_id, "child_settled")
        assert len(children_of(client, run_id)) == 1


def _recover(client: Client, run_id: str) -> RunRecord:
    watchdog = Watchdog(client.runtime)

    def settled() -> RunRecord | None:
        watchdog.scan()
        run = client.status(run_id)
        return run if run.status.value in ("succeeded", "failed", "escalated", "cancelled") else None

    run = wait_until(settled, timeout=90, interval=0.2)
    assert isinstance(run, RunRecord)
    return run


@pytest.mark.parametrize("moment", ["before the child is created", "while the child runs"])
def test_a_worker_killed_around_the_child_is_recovered_with_exactly_one_child(moment: str) -> None:
    queue = f"childkill{int(time.time() * 1000) % 100000}"
    env = {"workflow_modules": MODULES, "lease_seconds": LEASE, "steps_queue": queue, "stuck_queued_seconds": 1}
    settings = load_settings(workflow_modules=[MODULES], lease_seconds=LEASE, steps_queue=queue,
                             stuck_queued_seconds=1)
    client = Client(settings)
    victim = Worker("child-victim", concurrency=2, env=env).start()
    survivor: Worker | None = None
    try:
        text = "stall 4 kill me" if moment == "before the child is created" else "slow 4 kill me"
        run_id = client.submit("t_parent", {"text": text})
        child_id = child_run_id(run_id, "sub")
        if moment == "before the child is created":
            # the parent step is claimed and stalls in its inputs(), before the parking transaction
            wait_until(lambda: step_status(client, run_id, "sub") == StepStatus.RUNNING, timeout=30)
        else:
            wait_until(lambda: client.runtime.store.run_status(child_id) is not None
                       and step_status(client, child_id, "summarize") == StepStatus.RUNNING, timeout=30)
        victim.kill()
        if moment == "before the child is created":
            assert client.runtime.store.run_status(child_id) is None
        survivor = Worker("child-survivor", concurrency=2, env=env).start()
        run = _recover(client, run_id)
        assert run.status == RunStatus.SUCCEEDED, run.error
        assert [c.run_id for c in children_of(client, run_id)] == [child_id]
        assert len(events(client, run_id, "child_started")) == 1
        assert len(events(client, run_id, "commit", "sub")) == 1
        assert len(events(client, child_id, "commit", "summarize")) == 1
        expired = events(client, run_id if moment == "before the child is created" else child_id, "lease_expired")
        assert expired, "the recovery went through an expired lease"
    finally:
        victim.kill()
        if survivor is not None:
            survivor.stop()
