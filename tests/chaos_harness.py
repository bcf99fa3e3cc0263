"""Workflows, agents and tools for the fault-injection and bad-input suites (imported by their workers too).

Workers load this module through ``TEAMSTER_WORKFLOW_MODULES="teamster.examples.triage,tests.chaos_harness"``.

* ``chaos_triage`` -- a copy of the example ``ticket_triage`` workflow whose classify agent tags the ticket
  with :func:`chaos_tag_ticket`, a side effect kept in a Redis ledger: ``HSETNX`` keyed by the tool call's
  idempotency key and a counter of applications per key, written together by one Lua script. The example's own
  ``tag_ticket`` keeps its ledger in worker memory, which a SIGKILL erases; this ledger survives worker kills and
  Redis restarts (AOF), so the chaos test checks "applied exactly once per key" against Redis.
* ``rogue_tools`` -- a one-step workflow whose scripted agent asks for a tool outside its allow-list (the
  side-effect tool above); the guard must block it before it runs.

The second half is the fault-injection machinery of ``tests/test_chaos.py`` (its size and knobs, the private
Redis's fsync policy, the supervised worker fleet, the chaos thread, the watchdog loop); workers import it too
and never use it.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, Field
from strands.types.tools import ToolContext

from teamster.agents.scripted import ScriptContext, Turn, call, finish, register_script
from teamster.agents.spec import AgentSpec, Budget
from teamster.agents.tools import idempotency_key, tool
from teamster.config.embedded import EmbeddedRedis
from teamster.config.settings import get_settings
from teamster.errors import StoreUnavailable
from teamster.examples import triage as example
from teamster.orchestrator.client import Client
from teamster.orchestrator.connection import redis_client
from teamster.orchestrator.watchdog import Watchdog, WatchdogReport
from teamster.orchestrator.workflow import Workflow
from teamster.testing import record_model_calls
from tests.harness import SETTLED, Worker
from tests.workflows import effects_key

# Workers count their scripted model calls in Redis (teamster.testing.model_calls_key): the audit reads them.
record_model_calls()

__all__ = [
    "MODULES",
    "WORKFLOWS",
    "ChaosConfig",
    "Fleet",
    "Chaos",
    "WatchdogLoop",
    "durable_redis",
    "submit_retrying",
    "wait_all_settled",
    "CHAOS_WORKFLOW",
    "ROGUE_WORKFLOW",
    "LEDGER",
    "APPLIED",
    "CALLS",
    "chaos_tag_ticket",
    "ledger_keys",
]

CHAOS_WORKFLOW = "chaos_triage"
ROGUE_WORKFLOW = "rogue_tools"

LEDGER = "chaos_tags"
"""Ledger: idempotency key -> the tag applied (written once, with HSETNX)."""
APPLIED = "chaos_tags_applied"
"""Applications: idempotency key -> how many times the side effect was applied (must be 1)."""
CALLS = "chaos_tags_calls"
"""Calls: idempotency key -> how many times the tool ran (redeliveries, recoveries)."""


def ledger_keys(prefix: str) -> tuple[str, str, str]:
    """The Redis keys of the ledger, the applications counter and the calls counter under ``prefix``."""
    return effects_key(prefix, LEDGER), effects_key(prefix, APPLIED), effects_key(prefix, CALLS)


_APPLY_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  return 1
end
return 0
"""


@tool
def chaos_tag_ticket(ticket_id: str, tag: str, tool_context: ToolContext) -> dict[str, object]:
    """Tag a ticket in the helpdesk (a side effect applied at most once per idempotency key, kept in Redis)."""
    settings = get_settings()
    client = redis_client(settings)
    ledger, applied, calls = ledger_keys(settings.key_prefix)
    key = idempotency_key(tool_context)
    client.hincrby(calls, key, 1)
    # the effect and its count in one script: Redis killed between two separate commands would leave an effect
    # without its count (seen once under a CPU hog), and the retried call would find the effect already applied
    if client.eval(_APPLY_ONCE, 2, ledger, applied, key, f"{ticket_id}:{tag}"):
        return {"ticket_id": ticket_id, "tag": tag, "applied": True}
    return {"ticket_id": ticket_id, "tag": tag, "applied": False}


# ----------------------------------------------------------------------------- chaos_triage

chaos_classify: AgentSpec[example.Ticket, example.Classification] = AgentSpec(
    name="chaos_triage_classify", version="1", input_model=example.Ticket, output_model=example.Classification,
    instructions=example.classify.instructions.replace("tag_ticket", "chaos_tag_ticket"),
    tools=("chaos_tag_ticket",), budget=example.classify.budget, retry=example.classify.retry,
)


def _chaos_classify_script(ctx: ScriptContext) -> Turn:
    """The example's classify script, tagging through the Redis-ledger tool instead of the in-memory one."""
    turn = example._classify_script(ctx)  # noqa: SLF001 - reuse the example's behaviour exactly
    if turn.kind == "tool" and turn.tool == "tag_ticket":
        return call("chaos_tag_ticket", **dict(turn.payload))
    return turn


register_script(chaos_classify.name, _chaos_classify_script)


def _chaos_result(state: example.TriageState) -> example.TriageResult:
    assert state.classify and state.draft_reply and state.policy_review
    return example.TriageResult(
        ticket_id=state.ticket_id, category=state.classify.category, urgency=state.classify.urgency,
        reply_subject=state.draft_reply.subject, reply_body=state.draft_reply.body,
        approved=state.policy_review.approved)


chaos_triage = Workflow(CHAOS_WORKFLOW, input_model=example.Ticket, state_model=example.TriageState,
                        output_model=example.TriageResult, output=_chaos_result, version="1")
chaos_triage.step("classify", chaos_classify)
chaos_triage.step("extract_order", example.extract_order.name, after="classify", when=example.is_order_ticket,
                  inputs=lambda s: s.classify)
chaos_triage.step("draft_reply", example.draft_reply.name, after=["classify", "extract_order"])
chaos_triage.step("policy_review", example.policy_review.name, after="draft_reply",
                  escalate=list(example.triage.steps["policy_review"].escalate))
chaos_triage.register()

# ----------------------------------------------------------------------------- rogue_tools


class RogueNote(BaseModel):
    note: str = Field(min_length=1)


rogue_agent: AgentSpec[example.Ticket, RogueNote] = AgentSpec(
    name="rogue_tool_user", version="1", input_model=example.Ticket, output_model=RogueNote,
    instructions="Look the ticket's order up. You may only use lookup_order.",
    tools=("lookup_order",), budget=Budget(max_model_calls=3, max_tool_calls=2, timeout_seconds=60),
)


def _rogue_script(ctx: ScriptContext) -> Turn:
    """First ask for a tool the agent is not allowed to use; then finish, reporting what the tool said."""
    ticket = ctx.input_json()
    if ctx.call_index == 0:
        return call("chaos_tag_ticket", ticket_id=str(ticket.get("ticket_id", "?")), tag="rogue")
    said = ctx.tool_results[-1] if ctx.tool_results else "nothing"
    return finish({"note": f"the tool answered: {said}"[:500]})


register_script(rogue_agent.name, _rogue_script)

rogue_tools = Workflow(ROGUE_WORKFLOW, input_model=example.Ticket)
rogue_tools.step("act", rogue_agent)
rogue_tools.register()


# ----------------------------------------------------------------------------- the storm's machinery
# Used by tests/test_chaos.py in the test process (workers import this module too, and ignore it).

MODULES = "teamster.examples.triage,tests.chaos_harness"
"""What the workers of both suites import (``TEAMSTER_WORKFLOW_MODULES``)."""
WORKFLOWS = ("ticket_triage", CHAOS_WORKFLOW)
DEFAULT_FAULTS = "throttle=0.05,timeout=0.03,invalid_json=0.03,schema_invalid=0.02,refusal=0.02,cannot_complete=0.02"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass(frozen=True)
class ChaosConfig:
    """The size and knobs of one chaos run (the environment variables are listed in tests/test_chaos.py)."""

    runs: int = field(default_factory=lambda: _env_int("TEAMSTER_CHAOS_RUNS", 200))
    seed: int = field(default_factory=lambda: _env_int("TEAMSTER_CHAOS_SEED", 7))
    faults: str = field(default_factory=lambda: os.environ.get("TEAMSTER_CHAOS_FAULTS") or DEFAULT_FAULTS)
    appendfsync: str = field(default_factory=lambda: os.environ.get("TEAMSTER_CHAOS_APPENDFSYNC") or "always")
    kill_every: float = field(default_factory=lambda: _env_float("TEAMSTER_CHAOS_KILL_EVERY", 4.0))
    rate: float = field(default_factory=lambda: _env_float("TEAMSTER_CHAOS_RATE", 4.0))
    replay: int = field(default_factory=lambda: _env_int("TEAMSTER_CHAOS_REPLAY", 20))
    redis_outage: float = field(default_factory=lambda: _env_float("TEAMSTER_CHAOS_REDIS_OUTAGE", 2.0))
    workers: int = 3
    concurrency: int = 4
    latency: float = 0.15
    lease_seconds: float = 1.5
    stuck_queued_seconds: float = 8.0

    @property
    def submit_seconds(self) -> float:
        return self.runs / self.rate

    @property
    def settle_timeout(self) -> float:
        """Generous: a slow shared CI machine must not fail the invariants by running out of time."""
        return 180.0 + 2.0 * self.runs

    def env(self, redis_url: str, prefix: str, tmp: Path) -> dict[str, Any]:
        """``TEAMSTER_*`` settings shared by the workers and this process (keys without the prefix)."""
        return {
            "redis_url": redis_url, "key_prefix": prefix, "workflow_modules": MODULES, "model": "scripted",
            "scripted_faults": self.faults, "scripted_seed": self.seed, "scripted_latency": self.latency,
            "lease_seconds": self.lease_seconds, "retry_backoff_base": 0.2, "retry_backoff_max": 1.0,
            "stuck_queued_seconds": self.stuck_queued_seconds, "watchdog_interval_seconds": 0.5,
            # Celery's own redelivery backstop, short enough to happen during the test (duplicates are harmless).
            "visibility_timeout": 30, "embedded_dir": tmp / "embedded",
        }


# --------------------------------------------------------------------------- the private Redis


def durable_redis(server: EmbeddedRedis, appendfsync: str) -> None:
    """Set the AOF fsync policy of the chaos Redis (EmbeddedRedis starts it with ``everysec``).

    ``always`` (the default here): Redis writes *and fsyncs* the AOF before it answers a write, so killing
    redis-server -- or the machine -- loses nothing it acknowledged, and "zero runs lost" is an invariant this
    test can assert without flakiness. With ``everysec`` a SIGKILL of the process alone normally loses nothing
    either (the AOF was write(2)-en to the page cache before the reply), but Redis may postpone that write by up
    to 2 s while a background fsync is slow, and a machine crash loses up to the last second: documented Redis
    behaviour, not teamster's. ``TEAMSTER_CHAOS_APPENDFSYNC=everysec`` runs the same storm that way. The policy
    is set right after each start; the milliseconds before it apply to a server that is not killed again.
    """
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    try:
        client.config_set("appendfsync", appendfsync)
    finally:
        client.close()


# --------------------------------------------------------------------------- chaos machinery


class Fleet:
    """The worker processes, supervised like ``restart: unless-stopped``: a worker that exits is replaced.

    ``kill_one`` SIGKILLs a random worker and starts its replacement; ``supervise`` replaces workers that exited
    on their own and records why (the last CRITICAL line of their log).
    """

    def __init__(self, cfg: ChaosConfig, env: dict[str, Any]) -> None:
        self.cfg = cfg
        self.env = env
        self.workers: list[Worker] = []
        self.killed: list[Worker] = []
        self.exited: list[tuple[Worker, str]] = []
        self._n = 0
        self._lock = threading.Lock()

    def spawn(self, wait: bool = True) -> Worker:
        self._n += 1
        worker = Worker(f"chaos{self._n}", concurrency=self.cfg.concurrency, env=self.env)
        self.workers.append(worker)
        return worker.start(wait=wait, timeout=120)

    def kill_one(self, rng: random.Random) -> Worker | None:
        with self._lock:
            alive = [w for w in self.workers if w.alive()]
            if not alive:
                return None
            victim = rng.choice(alive)
            victim.kill()
            victim.stop()  # closes its log file; the process is gone already
            self.workers.remove(victim)
            self.killed.append(victim)
            self.spawn(wait=False)
            return victim

    def supervise(self) -> None:
        with self._lock:
            for worker in [w for w in self.workers if not w.alive()]:
                worker.stop()
                self.workers.remove(worker)
                lines = worker.log().splitlines()
                why = [line for line in lines if "CRITICAL" in line] or [line for line in lines if "Error" in line]
                self.exited.append((worker, why[-1] if why else "exited without an error line"))
                if len(self.exited) > 20:
                    raise RuntimeError("workers keep exiting on their own; see " + str(worker.log_path))
            while len(self.workers) < self.cfg.workers:
                self.spawn(wait=False)

    def ensure(self) -> None:
        self.supervise()
        for worker in list(self.workers):
            worker.wait_ready(120)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=20)


class Chaos(threading.Thread):
    """Kills a random worker every ``kill_every`` seconds (jittered); restarts Redis once when asked."""

    def __init__(self, cfg: ChaosConfig, fleet: Fleet, server: EmbeddedRedis) -> None:
        super().__init__(name="chaos", daemon=True)
        self.cfg = cfg
        self.fleet = fleet
        self.server = server
        self.rng = random.Random(cfg.seed)
        self.stop_event = threading.Event()
        self.restart_requested = threading.Event()
        self.redis_restarts = 0
        self.redis_downtime = 0.0
        self.errors: list[str] = []

    def run(self) -> None:
        next_kill = time.monotonic() + self._gap()
        while not self.stop_event.wait(0.25):
            try:
                self.fleet.supervise()
                if self.restart_requested.is_set() and not self.redis_restarts:
                    self.restart_redis()
                elif time.monotonic() >= next_kill:
                    self.fleet.kill_one(self.rng)
                    next_kill = time.monotonic() + self._gap()
            except Exception as exc:  # noqa: BLE001 - reported in the figures, the test goes on
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _gap(self) -> float:
        return self.rng.uniform(0.5, 1.5) * self.cfg.kill_every

    def restart_redis(self) -> None:
        started = time.monotonic()
        if self.cfg.redis_outage:
            self.server.kill()
            time.sleep(self.cfg.redis_outage)
            self.server.start()
        else:
            self.server.restart()
        durable_redis(self.server, self.cfg.appendfsync)
        self.redis_downtime = time.monotonic() - started
        self.redis_restarts += 1


class WatchdogLoop:
    """``Watchdog.run_forever`` in a thread, summing what its scans did."""

    def __init__(self, client: Client) -> None:
        self.watchdog = Watchdog(client.runtime)
        self.totals: Counter[str] = Counter()
        self.scans = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.watchdog.run_forever, name="watchdog", daemon=True,
                                       args=(self.stop_event, 0.5, self._on_report))

    def _on_report(self, report: WatchdogReport) -> None:
        self.scans += 1
        self.totals.update(report.as_dict())

    def __enter__(self) -> WatchdogLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)


def submit_retrying(client: Client, workflow: str, ticket: dict[str, str], key: str, deadline: float) -> str:
    """Submit, retrying while Redis is down (the same idempotency key gives the same run, never a second)."""
    while True:
        try:
            return client.submit(workflow, ticket, idempotency_key=key)
        except (StoreUnavailable, redis.RedisError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _statuses(client: Client, run_ids: list[str]) -> dict[str, str | None]:
    pipe = client.runtime.client.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(client.runtime.keys.run(run_id), "status")
    return {r: (json.loads(s) if s else None) for r, s in zip(run_ids, pipe.execute(), strict=True)}


def wait_all_settled(client: Client, run_ids: list[str], timeout: float) -> dict[str, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            statuses = _statuses(client, run_ids)
        except redis.RedisError:
            statuses = {}
        if statuses and all(s in SETTLED for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            return statuses
        time.sleep(1.0)
