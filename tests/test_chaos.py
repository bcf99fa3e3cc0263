"""Fault injection: hundreds of triage runs while workers are SIGKILLed, Redis restarts and the model misbehaves.

The storm (one test, its own Redis, its own key prefix, its own worker processes):

* a private ``redis-server`` (AOF on, ``appendfsync always`` -- see :func:`tests.chaos_harness.durable_redis`)
  in a tmp dir, never the session's Redis, because the test kills and restarts it;
* 3 real Celery worker processes (threads pool) running the scripted model with injected faults (throttling,
  timeouts, invalid JSON, schema-invalid output, refusals, "cannot complete"), a small latency per model call
  so steps are in flight when workers die, short leases (1.5 s) and short retry backoff; they are supervised
  like ``restart: unless-stopped`` in docker-compose: a worker that exits on its own is replaced and counted;
* a watchdog loop in this process (``Watchdog.run_forever`` in a thread; it logs and retries while Redis is
  down) re-sending steps whose worker died or whose message was lost;
* runs of the example ``ticket_triage`` workflow and of ``chaos_triage`` (the same workflow whose classify tool
  keeps its side effects in a Redis ledger, see :mod:`tests.chaos_harness`), alternately, cycling
  ``SAMPLE_TICKETS`` with unique ticket ids and idempotency keys, submitted over time;
* a chaos thread that SIGKILLs a random worker every few seconds and starts a replacement, and once, after 40 %
  of the runs were submitted, SIGKILLs Redis and starts it again on the same port after a short outage
  (``TEAMSTER_CHAOS_REDIS_OUTAGE``; 0 means ``EmbeddedRedis.restart()`` at once), replaying its AOF.

Then it waits until every run is final or waiting for an operator and checks the invariants -- the only
assertions; nothing about timing is asserted: no run lost or left running (I1), every step ended with an
explicit outcome and skipped steps carry a reason (I1), succeeded runs have only succeeded/skipped steps (I2),
at most one commit per step, the same tool input for the same idempotency key, and each side effect applied
once per key and each ticket tagged once in the Redis ledger (I3), every run that did not succeed has a
complete dead-letter entry (I6), and replay of a sample of succeeded runs -- recovered and retried ones first
-- reproduces them with zero model calls (I7). The figures are printed (run pytest with ``-s``) and written to
``chaos-figures.json`` in the test's tmp dir, whose path is printed too.

The other tests here pin down deterministically, as regression tests, what the storm found (a worker exiting
when Redis dies mid-step, a script bug) and what the I6 check watches for but cannot provoke at this size (a
poison-pill step, a run deadline).

Size and knobs (environment variables; the defaults are the CI size: about 1-1.5 minutes on a 2-core machine):

* ``TEAMSTER_CHAOS_RUNS`` -- runs submitted (default 200; e.g. 1000 for a soak of ~5 minutes);
* ``TEAMSTER_CHAOS_RATE`` -- runs submitted per second (default 4);
* ``TEAMSTER_CHAOS_SEED`` -- seed of the fault plan, the kill schedule and the replay sample (default 7);
* ``TEAMSTER_CHAOS_FAULTS`` -- fault rates (default below, the ``TEAMSTER_SCRIPTED_FAULTS`` format);
* ``TEAMSTER_CHAOS_APPENDFSYNC`` -- ``always`` (default) or ``everysec``, to observe what the restart loses;
* ``TEAMSTER_CHAOS_KILL_EVERY`` -- mean seconds between worker kills (default 4, jittered 0.5-1.5x);
* ``TEAMSTER_CHAOS_REDIS_OUTAGE`` -- seconds Redis stays down in its restart (default 2);
* ``TEAMSTER_CHAOS_REPLAY`` -- succeeded runs replayed (default 20).

Run it alone with ``python -m pytest -q -s -m chaos tests/test_chaos.py``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from teamster.agents.scripted import REFUSAL_TEXT
from teamster.config.embedded import EmbeddedRedis
from teamster.config.settings import load_settings
from teamster.errors import TeamsterError
from teamster.examples.triage import SAMPLE_TICKETS
from teamster.orchestrator.client import Client
from teamster.orchestrator.executor import StepExecutor
from teamster.orchestrator.models import STEP_DONE, STEP_TERMINAL, JournalEvent, RunRecord, RunStatus, StepStatus
from teamster.orchestrator.watchdog import Watchdog
from teamster.orchestrator.workflow import get_workflow
from teamster.testing import model_calls_key
from tests.chaos_harness import (
    MODULES,
    WORKFLOWS,
    Chaos,
    ChaosConfig,
    Fleet,
    WatchdogLoop,
    durable_redis,
    ledger_keys,
    submit_retrying,
    wait_all_settled,
)
from tests.harness import SETTLED, Worker, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

WAITING_STEP = (StepStatus.FAILED, StepStatus.CANNOT_COMPLETE, StepStatus.NEEDS_HUMAN)


# --------------------------------------------------------------------------- figures and invariants


def _tool_input(block: dict[str, Any]) -> Any:
    raw = block["toolUse"].get("input")
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def fault_kind(event: JournalEvent) -> str | None:
    """The injected fault a live ``model_call`` event shows, if any (replayed answers are not counted)."""
    data = event.data
    if data.get("replayed"):
        return None
    error = str(data.get("error") or "")
    if error:
        if "throttled (injected fault)" in error:
            return "throttle"
        if "timed out (injected fault)" in error:
            return "timeout"
        return "other_model_error"
    for block in data.get("content") or []:
        if block.get("text") == REFUSAL_TEXT:
            return "refusal"
        if "toolUse" in block and block["toolUse"].get("name") == "final_outcome":
            payload = _tool_input(block)
            if payload is None:
                return "invalid_json"
            if payload.get("output") == {"unexpected": True}:
                return "schema_invalid"
            if payload.get("reason") == "scripted fault: cannot complete":
                return "cannot_complete"
    return None


@dataclass
class Audit:
    """Everything read back from Redis after the storm, and the violations found."""

    violations: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    failure_examples: dict[str, str] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    takeover_runs: set[str] = field(default_factory=set)
    retried_runs: set[str] = field(default_factory=set)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    replay_sample: list[str] = field(default_factory=list)

    def violate(self, text: str) -> None:
        self.violations.append(text)


def audit_runs(client: Client, run_ids: list[str], audit: Audit) -> None:
    """Check I1, I2, I3 (journal side) and I6 on every submitted run; gather the figures."""
    store, dlq = client.runtime.store, client.dlq
    succeeded_tool_keys: dict[str, str] = {}  # chaos tool keys whose call returned, for the ledger check
    for run_id in run_ids:
        try:
            run = store.get_run(run_id)
        except TeamsterError:
            audit.violate(f"lost: run {run_id} has no run record")
            continue
        audit.runs[run_id] = run
        audit.outcomes[run.status.value] += 1
        wf = get_workflow(run.workflow)
        if run.status.value not in SETTLED:
            audit.violate(f"I1: run {run_id} is still {run.status.value}")
        index = store.step_statuses(run_id)
        records = {s.step_key: s for s in store.steps(run_id)}
        if set(index) != set(records):
            audit.violate(f"I1: run {run_id}: step index {sorted(index)} != step records {sorted(records)}")
        for key, record in records.items():
            if index.get(key) != record.status:
                audit.violate(f"I1: {run_id}:{key} index says {index.get(key)}, record says {record.status.value}")
            if record.status not in STEP_TERMINAL:
                audit.violate(f"I1: {run_id}:{key} is {record.status.value} (no terminal outcome)")
            if record.status == StepStatus.SKIPPED and not record.reason:
                audit.violate(f"I1: {run_id}:{key} was skipped without a reason")
        if run.status == RunStatus.SUCCEEDED:
            missing = [s for s in wf.steps if s not in records]
            undone = [f"{k}={r.status.value}" for k, r in records.items() if r.status not in STEP_DONE]
            if missing or undone:
                audit.violate(f"I2: run {run_id} succeeded with steps missing {missing} or not done {undone}")
        events = client.runtime.journal.read(run_id)
        commits: Counter[str] = Counter()
        tool_inputs: dict[str, str] = {}
        for event in events:
            audit.events[event.type] += 1
            if event.type == "commit" and event.step:
                commits[event.step] += 1
            elif event.type == "model_call":
                kind = fault_kind(event)
                if kind:
                    audit.faults[kind] += 1
            elif event.type == "retry":
                audit.retries[str(event.data.get("error_type"))] += 1
                audit.retried_runs.add(run_id)
            elif event.type == "step_start" and event.data.get("takeover"):
                audit.takeover_runs.add(run_id)
            elif event.type == "outcome":
                outcome = event.data.get("outcome") or {}
                if outcome.get("kind") == "failed":
                    audit.failures[str(outcome.get("error_type"))] += 1
                    audit.failure_examples.setdefault(str(outcome.get("error_type")),
                                                      f"{run_id}:{event.step}: {outcome.get('message')}"[:300])
                elif outcome.get("kind") in ("cannot_complete", "needs_human"):
                    audit.failures[str(outcome.get("kind"))] += 1
            elif event.type == "tool_call":
                key = str(event.data.get("idempotency_key"))
                text = json.dumps(event.data.get("input"), sort_keys=True)
                if tool_inputs.setdefault(key, text) != text:
                    audit.violate(f"I3: {run_id}: tool calls with key {key} had different inputs")
            elif (event.type == "tool_result" and event.data.get("tool") == "chaos_tag_ticket"
                  and event.data.get("status") == "success"):
                succeeded_tool_keys[str(event.data.get("idempotency_key"))] = run_id
        for step, count in commits.items():
            if count > 1:
                audit.violate(f"I3: {run_id}:{step} was committed {count} times")
        for key, record in records.items():
            if record.status == StepStatus.SUCCEEDED and commits[key] != 1:
                audit.violate(f"I3: {run_id}:{key} succeeded with {commits[key]} commit events")
        _audit_dead_letters(client, dlq, run, records, audit)
    _audit_ledger(client, succeeded_tool_keys, audit)


def _audit_dead_letters(client: Client, dlq: Any, run: RunRecord, records: dict[str, Any], audit: Audit) -> None:
    """I6: a run that did not succeed has a dead-letter entry enough to understand and replay the failure."""
    run_id = run.run_id
    entries = {e.entry_id: e for e in dlq.list(run_id=run_id, include_closed=True, limit=1000)}
    for key, record in records.items():
        if record.status in WAITING_STEP and not any(e.step_key == key for e in entries.values()):
            audit.violate(f"I6: {run_id}:{key} is {record.status.value} without a dead-letter entry")
    if run.status == RunStatus.SUCCEEDED or run.status.value not in SETTLED:
        return
    error = run.error or {}
    entry = entries.get(str(error.get("dlq_entry")))
    if entry is None:
        audit.violate(f"I6: run {run_id} is {run.status.value} without a dead-letter entry (error={error})")
        return
    problems = []
    if entry.run_id != run_id or entry.step_key not in records:
        problems.append(f"run/step {entry.run_id}:{entry.step_key}")
    if not entry.error_type or not entry.message:
        problems.append("no error type or message")
    if entry.attempts < 1:
        problems.append(f"attempts={entry.attempts}")
    if not entry.trace_id or entry.trace_id != run.trace_id:
        problems.append(f"trace id {entry.trace_id!r} (run: {run.trace_id!r})")
    if not entry.journal_excerpt:
        problems.append("empty journal excerpt")
    if not entry.input or entry.input == {"value": None}:
        problems.append(f"no input ({entry.input!r}, error {entry.error_type})")
    if problems:
        audit.violate(f"I6: dead-letter entry {entry.entry_id} incomplete: {'; '.join(problems)}")


def _audit_ledger(client: Client, succeeded_tool_keys: dict[str, str], audit: Audit) -> None:
    """I3 against Redis: each side effect of chaos_tag_ticket applied exactly once per idempotency key."""
    ledger_key, applied_key, calls_key = ledger_keys(client.settings.key_prefix)
    redis_client = client.runtime.client
    ledger = redis_client.hgetall(ledger_key)
    applied = {k: int(v) for k, v in redis_client.hgetall(applied_key).items()}
    calls = {k: int(v) for k, v in redis_client.hgetall(calls_key).items()}
    audit.ledger = {"keys": len(ledger), "applications": sum(applied.values()), "tool_runs": sum(calls.values())}
    for key, count in applied.items():
        if count != 1:
            audit.violate(f"I3: side effect {key} applied {count} times")
    for key in ledger:
        if applied.get(key) != 1:
            audit.violate(f"I3: ledger entry {key} has {applied.get(key)} applications recorded")
    for key, run_id in succeeded_tool_keys.items():
        if key not in ledger:
            audit.violate(f"I3: {run_id}: the journal shows tool call {key} returned but the ledger lacks it")
    # what a customer would notice: a ticket tagged twice (e.g. a retry computing a new idempotency key)
    tagged = Counter(str(value).rsplit(":", 1)[0] for value in ledger.values())
    for ticket_id, count in tagged.items():
        if count > 1:
            audit.violate(f"I3: ticket {ticket_id} was tagged {count} times")


def audit_replay(client: Client, cfg: ChaosConfig, audit: Audit) -> None:
    """I7: replay succeeded runs offline -- recovered (takeover) and retried ones first -- with zero model calls."""
    succeeded = sorted(r for r, run in audit.runs.items() if run.status == RunStatus.SUCCEEDED)
    rng = random.Random(cfg.seed)
    takeover = [r for r in succeeded if r in audit.takeover_runs]
    retried = [r for r in succeeded if r in audit.retried_runs and r not in audit.takeover_runs]
    rest = [r for r in succeeded if r not in audit.takeover_runs and r not in audit.retried_runs]
    for group in (takeover, retried, rest):
        rng.shuffle(group)
    half, quarter = cfg.replay // 2, cfg.replay // 4
    ordered = takeover[:half] + retried[:quarter] + rest + takeover[half:] + retried[quarter:]
    sample = list(dict.fromkeys(ordered))[: cfg.replay]
    audit.replay_sample = sample
    calls_before = client.runtime.client.hgetall(model_calls_key(client.settings.key_prefix))
    for run_id in sample:
        report = client.replay(run_id)
        audit.replayed += 1
        if not report.identical or report.live_model_calls:
            diffs = {s.step_key: s.differences for s in report.steps if not s.same}
            audit.violate(f"I7: replay of {run_id} differs ({report.live_model_calls} live calls): {diffs}")
        output = audit.runs[run_id].output
        if not output:
            audit.violate(f"I7: succeeded run {run_id} has no output")
    if client.runtime.client.hgetall(model_calls_key(client.settings.key_prefix)) != calls_before:
        audit.violate("I7: replay called the model")


# --------------------------------------------------------------------------- the test


@pytest.fixture()
def chaos_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True)
    server.start()
    durable_redis(server, ChaosConfig().appendfsync)
    yield server
    server.stop()


def _timeout() -> float:
    cfg = ChaosConfig()
    return 300.0 + cfg.submit_seconds + cfg.settle_timeout


@pytest.mark.timeout(_timeout())
def test_runs_survive_worker_kills_redis_restart_and_model_faults(chaos_redis: EmbeddedRedis,
                                                                   tmp_path: Path) -> None:
    cfg = ChaosConfig()
    # The Redis is private, so the prefix can be fixed: run ids (hashes of workflow + idempotency key) and hence
    # the scripted faults (a hash of seed, run, step, attempt, call) are the same from one run of the test to the
    # next; only what the kill timing changes (attempts, takeovers) differs.
    prefix = f"chaos-seed{cfg.seed}"
    env = cfg.env(chaos_redis.url, prefix, tmp_path)
    client = Client(load_settings(**{**env, "workflow_modules": MODULES.split(",")}), redis_url=chaos_redis.url)
    fleet = Fleet(cfg, env)
    chaos = Chaos(cfg, fleet, chaos_redis)
    run_ids: list[str] = []
    started = time.monotonic()
    try:
        fleet.ensure()
        with WatchdogLoop(client) as watchdog:
            chaos.start()
            t0 = time.monotonic()
            for i in range(cfg.runs):
                if i >= cfg.runs * 0.4:
                    chaos.restart_requested.set()
                pause = t0 + i / cfg.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sample = SAMPLE_TICKETS[i % len(SAMPLE_TICKETS)]
                ticket = {**sample, "ticket_id": f"{sample['ticket_id']}-{prefix}-{i:05d}"}
                workflow = WORKFLOWS[i % len(WORKFLOWS)]
                run_ids.append(submit_retrying(client, workflow, ticket, f"{prefix}-{i}", time.monotonic() + 120))
            submitted_in = time.monotonic() - t0
            # keep killing a little longer, make sure Redis was restarted once, then let the system settle
            time.sleep(cfg.kill_every)
            chaos.restart_requested.set()
            wait_until(lambda: chaos.redis_restarts or not chaos.is_alive(), timeout=120, interval=0.2,
                       message=f"the chaos thread did not restart Redis: {chaos.errors}")
            chaos.stop_event.set()
            chaos.join(180)
            fleet.ensure()
            settle_started = time.monotonic()
            final = wait_all_settled(client, run_ids, cfg.settle_timeout)
            settled_in = time.monotonic() - settle_started
    finally:
        chaos.stop_event.set()
        fleet.stop()

    audit = Audit()
    unsettled = {r: s for r, s in final.items() if s not in SETTLED}
    audit_runs(client, run_ids, audit)
    audit_replay(client, cfg, audit)
    if len(set(run_ids)) != cfg.runs:
        audit.violate(f"submitted {cfg.runs} runs but got {len(set(run_ids))} distinct run ids")
    if not chaos.redis_restarts:
        audit.violate("Redis was never restarted (the chaos thread failed?)")
    figures = {
        "runs_submitted": len(run_ids),
        "workflows": dict(Counter(run.workflow for run in audit.runs.values())),
        "outcomes_by_run_status": dict(audit.outcomes),
        "faults_injected_by_kind": dict(audit.faults),
        "step_failures_by_type": dict(audit.failures),
        "step_failure_examples": audit.failure_examples,
        "retries_by_error_type": dict(audit.retries),
        "retries": sum(audit.retries.values()),
        "workers_killed": len(fleet.killed),
        "workers_exited_on_their_own": len(fleet.exited),
        "worker_exit_reasons": dict(Counter(reason.split("] ", 1)[-1][:160] for _, reason in fleet.exited)),
        "redis_restarts": chaos.redis_restarts,
        "redis_restart_seconds": round(chaos.redis_downtime, 3),
        "appendfsync": cfg.appendfsync,
        "lease_recoveries": {"watchdog_lease_recoveries": watchdog.totals["lease_recoveries"],
                             "journal_lease_expired": audit.events["lease_expired"],
                             "runs_with_takeover": len(audit.takeover_runs)},
        "watchdog": {"scans": watchdog.scans, **dict(watchdog.totals)},
        "journal_events": {k: audit.events[k] for k in ("commit", "commit_rejected", "redelivery_ignored",
                                                         "lease_lost", "dead_lettered", "requeued",
                                                         "step_skipped", "tool_call", "tool_blocked")},
        "side_effect_ledger": audit.ledger,
        "replayed_runs": audit.replayed,
        "replayed_with_takeover": len([r for r in audit.replay_sample if r in audit.takeover_runs]),
        "unsettled_at_timeout": len(unsettled),
        "chaos_thread_errors": chaos.errors,
        "seconds": {"submit": round(submitted_in, 1), "settle": round(settled_in, 1),
                    "total": round(time.monotonic() - started, 1)},
        "config": {"runs": cfg.runs, "seed": cfg.seed, "faults": cfg.faults, "kill_every": cfg.kill_every,
                   "rate": cfg.rate, "lease_seconds": cfg.lease_seconds, "latency": cfg.latency,
                   "workers": cfg.workers, "concurrency": cfg.concurrency},
        "violations": len(audit.violations),
        "violation_details": audit.violations[:50],
        "worker_logs": [str(w.log_path) for w in [w for w, _ in fleet.exited][:3] + fleet.killed[:2]],
    }
    out = tmp_path / "chaos-figures.json"
    out.write_text(json.dumps(figures, indent=2, default=str))
    print("\n=== chaos figures ===\n" + json.dumps(figures, indent=2, default=str))
    print(f"=== figures written to {out} ===")
    assert not audit.violations, "\n".join(audit.violations[:50])




@pytest.mark.timeout(240)
def test_a_worker_survives_a_redis_restart_with_a_step_in_flight(chaos_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """Regression (found by the storm): a worker holding an acks_late step when Redis dies must survive.

    celery 5.7 / kombu 5.7 exit with 'Unrecoverable error' on the closed channel and on the late ack of the
    lost connection; tasks/consumer.py hardens the consumer.
    """
    cfg = ChaosConfig()
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    env = {**cfg.env(chaos_redis.url, prefix, tmp_path), "scripted_faults": "", "scripted_latency": 2.0}
    client = Client(load_settings(**{**env, "workflow_modules": MODULES.split(",")}), redis_url=chaos_redis.url)
    worker = Worker("survivor", concurrency=2, env=env).start(timeout=120)
    try:
        run_id = client.submit("ticket_triage", {**SAMPLE_TICKETS[2], "ticket_id": f"T-{prefix}"},
                               idempotency_key=prefix)
        wait_until(lambda: any(s.status == StepStatus.RUNNING for s in client.steps(run_id)), timeout=60)
        chaos_redis.kill()  # a real outage: Redis is gone for a moment, then back with its AOF
        time.sleep(cfg.redis_outage)
        chaos_redis.start()
        durable_redis(chaos_redis, cfg.appendfsync)
        watchdog = Watchdog(client.runtime)

        def settled_or_worker_gone() -> bool:
            try:
                watchdog.scan()
                return not worker.alive() or client.status(run_id).status.value in SETTLED
            except (redis.RedisError, TeamsterError):
                return False

        wait_until(settled_or_worker_gone, timeout=120, interval=0.5)
        assert worker.alive(), "the worker exited after the Redis restart:\n" + "\n".join(
            line for line in worker.log().splitlines() if "CRITICAL" in line or "Restoring" in line)
        assert client.status(run_id).status == RunStatus.SUCCEEDED
    finally:
        worker.stop()


# --------------------------------------------------------------------------- what the storm found, pinned down



def test_scripted_order_lookup_says_cannot_complete_after_a_rejected_outcome() -> None:
    """Regression (found by the storm): after a rejected final answer, the example's lookup script must still
    read the lookup's result (not the rejection) and say cannot_complete for an unknown order."""
    from teamster.agents.outcomes import CannotComplete
    from teamster.agents.runner import run_agent
    from teamster.agents.scripted import ScriptContext, ScriptedModel, Turn, get_script, schema_invalid
    from teamster.examples.triage import extract_order

    script = get_script(extract_order.name)
    assert callable(script)

    def bad_outcome_first(ctx: ScriptContext) -> Turn:
        # the lookup, then a schema-invalid outcome (an injected fault), then the script's own answer
        return schema_invalid() if ctx.call_index == 1 else script(ctx)

    run = run_agent(extract_order, {"category": "order", "urgency": "normal", "order_id": "Z9999"},
                    model=ScriptedModel(bad_outcome_first, agent=extract_order.name),
                    settings=load_settings(model="scripted"))
    assert isinstance(run.outcome, CannotComplete), run.outcome


def _idle_client(server: EmbeddedRedis, tmp_path: Path, **overrides: Any) -> Client:
    """A client whose steps go to a queue no worker consumes: the test drives the executor by hand."""
    cfg = ChaosConfig()
    env = {**cfg.env(server.url, f"chaos-{uuid.uuid4().hex[:8]}", tmp_path), "steps_queue": "nobody-listens",
           "workflow_modules": MODULES.split(","), **overrides}
    return Client(load_settings(**env), redis_url=server.url)




def test_poison_pill_dead_letter_entry_keeps_the_step_input(chaos_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """Regression (found by the storm's I6 check): a step dead-lettered for killing its workers keeps the input
    an earlier attempt journaled."""
    client = _idle_client(chaos_redis, tmp_path)
    engine = client.runtime
    ticket = {**SAMPLE_TICKETS[0], "ticket_id": "T-poison"}
    run_id = client.submit("ticket_triage", ticket)
    # The step's first attempt starts (journaling its input), then its worker dies again and again.
    first = engine.store.claim(run_id, "classify", "w1", lease_seconds=0.05)
    assert first.kind == "claimed"
    engine.journal.append(run_id, "step_start", step="classify", attempt=1,
                          data={"token": first.token, "worker": "w1", "takeover": False, "input": ticket})
    for worker in ("w2", "w3"):
        wait_until(lambda: engine.store.lease_holder(run_id, "classify") is None, timeout=5)
        assert engine.store.claim(run_id, "classify", worker, lease_seconds=0.05).kind == "claimed"
    wait_until(lambda: engine.store.lease_holder(run_id, "classify") is None, timeout=5)
    result = StepExecutor(engine).execute(run_id, "classify")
    assert result.status == "dead_lettered"
    entry = client.dlq.get(client.status(run_id).error["dlq_entry"])  # type: ignore[index]
    assert entry.error_type == "lease_expired_repeatedly" and entry.attempts == 4
    record = client.runtime.store.get_step(run_id, "classify")
    assert record is not None and record.lease_expiries == client.settings.max_lease_expiries  # never above it
    assert entry.input == ticket




def test_deadline_dead_letter_entry_keeps_the_step_input(chaos_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """Regression: a run escalated for missing its deadline records the waiting step's input."""
    client = _idle_client(chaos_redis, tmp_path, run_deadline_seconds=0.3)
    ticket = {**SAMPLE_TICKETS[2], "ticket_id": "T-deadline"}
    run_id = client.submit("ticket_triage", ticket)
    watchdog = client.watchdog()
    wait_until(lambda: watchdog.scan().escalated_runs or client.status(run_id).status == RunStatus.ESCALATED,
               timeout=10, interval=0.1)
    run = client.status(run_id)
    assert run.error and run.error["error_type"] == "run_deadline_exceeded"
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.trace_id == run.trace_id and entry.step_key == "classify"
    assert entry.input == ticket, f"input={entry.input!r}, attempts={entry.attempts}"
