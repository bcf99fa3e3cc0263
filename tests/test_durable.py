"""Durable runs against a real Redis and real worker processes (issue: idempotent steps, leases, journal, replay).

* the same step delivered twice -- sequentially and concurrently -- calls the model once and commits once (I3);
* a commit with a stale fencing token is rejected and recorded (I4);
* SIGKILL of a worker mid-step: another worker completes the step once the lease expires, the tool's
  side effect is applied once (counter keyed by idempotency key);
* replay of a recorded run reproduces its outputs with zero model calls (I7).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from teamster.agents.outcomes import Succeeded
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import StepStatus
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.transitions import Transitions
from teamster.orchestrator.watchdog import Watchdog
from teamster.orchestrator.workflow import get_workflow
from teamster.testing import InProcessQueue, model_calls_key
from tests.harness import Worker, wait_settled, wait_until
from tests.workflows import effects_key

pytestmark = pytest.mark.integration

MODULES = "tests.workflows,teamster.examples.triage"
LEASE = 1.5


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=MODULES.split(","), lease_seconds=LEASE))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("durable", concurrency=6, env={"workflow_modules": MODULES, "lease_seconds": LEASE}) as w:
        yield w


def model_calls(client: Client, run_id: str, step: str) -> int:
    """Model calls the scripted model really made for a step (counted by the model itself, in Redis)."""
    value = client.runtime.client.hget(model_calls_key(client.settings.key_prefix), f"{run_id}:{step}")
    return int(value or 0)


def commits(client: Client, run_id: str, step: str) -> int:
    return len(client.journal(run_id, step=step, types=["commit"]))


def test_sequential_redelivery_of_a_committed_step_calls_no_model(client: Client, worker: Worker) -> None:
    run_id = client.submit("t_linear", {"text": "redeliver me"})
    assert wait_settled(client, run_id).status.value == "succeeded"
    assert model_calls(client, run_id, "summarize") == 1
    for _ in range(3):  # the broker delivers the same message again (e.g. after a visibility timeout)
        client.runtime.enqueuer.enqueue(run_id, "summarize")
    wait_until(lambda: len(client.journal(run_id, step="summarize", types=["redelivery_ignored"])) == 3)
    assert model_calls(client, run_id, "summarize") == 1
    assert commits(client, run_id, "summarize") == 1
    assert client.status(run_id).state_version == 3  # 3 commits (v0 -> v3), nothing more


def test_concurrent_duplicate_deliveries_run_the_step_once(client: Client, worker: Worker) -> None:
    run_id = client.submit("t_linear", {"text": "slow 1.5 concurrent duplicates"})
    for _ in range(3):  # three more copies while the first one is running
        client.runtime.enqueuer.enqueue(run_id, "summarize")
    assert wait_settled(client, run_id).status.value == "succeeded"
    assert model_calls(client, run_id, "summarize") == 1
    assert commits(client, run_id, "summarize") == 1
    ignored = client.journal(run_id, step="summarize", types=["redelivery_ignored"])
    assert len(ignored) == 3
    assert {e.data["reason"] for e in ignored} <= {"another worker holds the lease", "step already ended"}


def test_stale_fencing_token_cannot_commit(client: Client) -> None:
    """Worker A's lease lapses, worker B takes the step over; A's late commit is rejected and recorded."""
    settings = client.settings
    # the step messages go to an in-process queue nobody reads: the module's worker must not take the step
    node_a = Runtime(settings, client.runtime.client, InProcessQueue(), worker="A")
    node_b = Runtime(settings, client.runtime.client, InProcessQueue(), worker="B")
    run_id, _ = Transitions(node_a).create_run(get_workflow("t_linear"), {"text": "fencing"}, None)
    claim_a = node_a.store.claim(run_id, "summarize", "A", lease_seconds=0.2)
    assert claim_a.kind == "claimed"
    wait_until(lambda: node_a.store.lease_holder(run_id, "summarize") is None, timeout=5)
    claim_b = node_b.store.claim(run_id, "summarize", "B", lease_seconds=30)
    assert claim_b.kind == "claimed" and claim_b.token > claim_a.token and claim_b.previous == StepStatus.RUNNING

    wf = get_workflow("t_linear")
    run = node_a.store.get_run(run_id)
    record = node_a.store.get_step(run_id, "summarize")
    assert record is not None
    late = Transitions(node_a).commit(run, wf, wf.steps["summarize"], record, claim_a.token,
                                      Succeeded(output={"summary": "from A"}))
    assert late.status == "stale"
    rejected = node_a.journal.read(run_id, types=["commit_rejected"])
    assert rejected and rejected[-1].data["guard"] == "fence" and rejected[-1].data["token"] == claim_a.token
    assert node_a.store.get_step(run_id, "summarize").status == StepStatus.RUNNING  # untouched

    ok = Transitions(node_b).commit(run, wf, wf.steps["summarize"], record, claim_b.token,
                                    Succeeded(output={"summary": "from B"}))
    assert ok.status == "committed"
    again = Transitions(node_b).commit(run, wf, wf.steps["summarize"], record, claim_b.token,
                                       Succeeded(output={"summary": "twice"}))
    assert again.status == "stale"  # a step committed once is never committed again
    state = node_b.store.get_run(run_id).state
    assert state["summarize"] == {"summary": "from B"}
    client.cancel(run_id, reason="test cleanup")


def test_sigkill_mid_step_is_recovered_by_another_worker_without_duplicate_side_effects(client: Client) -> None:
    env = {"workflow_modules": MODULES, "lease_seconds": LEASE, "steps_queue": "killq"}
    victim = Worker("victim", concurrency=2, env=env).start()
    survivor: Worker | None = None
    try:
        # Route this run's steps to the victim only: submit through an enqueuer bound to its queue.
        settings = load_settings(workflow_modules=MODULES.split(","), lease_seconds=LEASE, steps_queue="killq")
        kill_client = Client(settings)
        run_id = kill_client.submit("t_linear", {"text": "side-effect slow 3 then crash"})
        keys = Keys(settings.key_prefix)
        redis = kill_client.runtime.client
        # the tool has applied its side effect and the second model call (3 s) is in flight: kill now
        applied = effects_key(keys.prefix, "applied")
        wait_until(lambda: redis.hlen(applied) and any(k.startswith(run_id) for k in redis.hkeys(applied)),
                   timeout=30)
        wait_until(lambda: model_calls(kill_client, run_id, "summarize") >= 2, timeout=10)
        # ... and the first call's response is journaled (with the tool call it asked for), so a takeover can reuse it
        wait_until(lambda: kill_client.journal(run_id, step="summarize", types=["model_call"]), timeout=10)
        victim.kill()
        survivor = Worker("survivor", concurrency=2, env=env).start()
        watchdog = Watchdog(kill_client.runtime)

        def recovered() -> object:
            watchdog.scan()
            run = kill_client.status(run_id)
            return run if run.status.value in ("succeeded", "failed", "escalated") else None

        run = wait_until(recovered, timeout=60, interval=0.2)
        assert run.status.value == "succeeded"
        record = kill_client.runtime.store.get_step(run_id, "summarize")
        assert record is not None and record.attempts == 2 and record.lease_expiries == 1
        effect_keys = [k for k in redis.hkeys(effects_key(keys.prefix, "applied")) if k.startswith(run_id)]
        assert len(effect_keys) == 1
        assert int(redis.hget(effects_key(keys.prefix, "applied"), effect_keys[0])) == 1  # applied exactly once
        # re-called, deduplicated by its key
        assert int(redis.hget(effects_key(keys.prefix, "attempts"), effect_keys[0])) == 2
        events = kill_client.journal(run_id, step="summarize")
        assert [e.type for e in events if e.type in ("lease_expired", "commit")] == ["lease_expired", "commit"]
        starts = [e for e in events if e.type == "step_start"]
        assert starts[-1].data["takeover"] is True and starts[-1].data["reused_responses"] == 1
        # the survivor paid only for the call the victim never finished: 2 (victim) + 1 (survivor)
        assert model_calls(kill_client, run_id, "summarize") == 3
        replayed = [e for e in events if e.type == "model_call" and e.attempt == 2 and e.data.get("replayed")]
        assert len(replayed) == 1
        assert commits(kill_client, run_id, "summarize") == 1
    finally:
        victim.kill()
        if survivor is not None:
            survivor.stop()


def test_replay_reproduces_outputs_with_zero_model_calls(client: Client, worker: Worker) -> None:
    from teamster.examples.triage import SAMPLE_TICKETS

    run_ids = [client.submit("ticket_triage", t) for t in SAMPLE_TICKETS]
    runs = [wait_settled(client, r) for r in run_ids]
    assert [r.status.value for r in runs].count("succeeded") == 8
    before = client.runtime.client.hgetall(model_calls_key(client.settings.key_prefix))
    for run in runs:
        report = client.replay(run.run_id)
        assert report.identical, [s.differences for s in report.steps if not s.same]
        assert report.live_model_calls == 0
        assert report.steps and all(s.live_model_calls == 0 for s in report.steps)
    assert client.runtime.client.hgetall(model_calls_key(client.settings.key_prefix)) == before  # no model was called


def test_replay_reports_a_changed_prompt(client: Client, worker: Worker) -> None:
    from teamster.agents.spec import register_agent
    from teamster.examples import triage as ex

    run_id = client.submit("ticket_triage", ex.SAMPLE_TICKETS[0])
    assert wait_settled(client, run_id).status.value == "succeeded"
    original = ex.draft_reply
    changed = original.__class__(**{**original.__dict__, "instructions": original.instructions + " Be terse.",
                                    "version": "2"})
    register_agent(changed, replace=True)
    try:
        report = client.replay(run_id)
    finally:
        register_agent(original, replace=True)
    differing = {s.step_key: s.differences for s in report.steps if not s.same}
    assert list(differing) == ["draft_reply"]
    assert any("request differs" in d for d in differing["draft_reply"])
    assert any("version" in d for d in differing["draft_reply"])
    assert report.live_model_calls == 0


def test_journal_records_every_decision_and_redacts_secrets(client: Client, worker: Worker) -> None:
    secret = "sk-" + "A" * 32
    run_id = client.submit("t_linear", {"text": f"side-effect token {secret}"})
    assert wait_settled(client, run_id).status.value == "succeeded"
    events = client.journal(run_id)
    types = [e.type for e in events]
    for expected in ("run_created", "step_queued", "step_start", "agent_start", "model_call", "tool_call",
                     "tool_result", "validation", "outcome", "commit", "run_succeeded"):
        assert expected in types, expected
    raw = str([e.data for e in events])
    assert secret not in raw and "[REDACTED]" in raw
    call = next(e for e in events if e.type == "model_call")
    assert call.data["usage"]["totalTokens"] > 0 and "latency_ms" in call.data


def test_large_payloads_are_bounded_with_a_marker(client: Client) -> None:
    settings = load_settings(journal_payload_cap=1024)
    node = Runtime(settings, client.runtime.client, client.runtime.enqueuer)
    node.journal.append("bounded-run", "tool_result", step="s", data={"content": "x" * 10_000})
    event = node.journal.read("bounded-run")[-1]
    assert event.data["_truncated"] is True and event.data["_original_bytes"] > 10_000
    assert len(event.data["preview"]) < 1024


def test_finished_runs_expire_but_dead_lettered_runs_do_not(client: Client, worker: Worker) -> None:
    ok = client.submit("t_linear", {"text": "expire me"})
    bad = client.submit("t_fanout", {"text": "x", "items": ["bad-item"]})
    assert wait_settled(client, ok).status.value == "succeeded"
    assert wait_settled(client, bad).status.value == "escalated"
    redis = client.runtime.client
    ttl_ok = redis.ttl(client.runtime.keys.journal(ok))
    assert 0 < ttl_ok <= client.settings.finished_run_ttl_seconds
    for key in client.runtime.store.run_keys(bad):
        assert redis.ttl(key) in (-1, -2), key  # no expiry while the entry is unresolved

