"""Provider limits shared by every worker, the shared cool-down and circuit breaker, and run budgets (issue 14).

* The gate's Lua, against a real Redis, from two "workers" (two limiters, as two processes hold): a concurrency
  slot is shared and waiters are served in arrival order; a waiting step says so on its record; a 429 makes every
  worker back off for the provider's retry-after; repeated errors open the breaker, one probe is let through, its
  success closes it; a slot whose holder died lapses with its lease.
* Run budgets in-process (WorkflowEnvironment): across a fan-out, across a retry, per submit; what was spent is on
  every step and on the run.
* Real worker processes against the local model server's rate limit: three workers sharing one limit never send
  more than one request over it in any window of the server, and every run succeeds; a killed worker's slot is
  freed within its lease.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel, ValidationError

from bench.model_server import ModelServer
from teamster import AgentSpec, ProviderLimits, RetryPolicy, RunBudget, Workflow, retry_with
from teamster.agents.recording import RecordingModel
from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import (
    InvalidInput,
    InvalidSettings,
    ModelThrottled,
    ProviderUnavailable,
    RunBudgetExceeded,
    WorkflowDefinitionError,
)
from teamster.orchestrator.client import Client
from teamster.orchestrator.executor import StepExecutor
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.limits import Limiter, RedisGate
from teamster.testing import ScriptedModel, WorkflowEnvironment, finish, throttle
from tests.harness import Worker, wait_settled, wait_until

pytestmark = pytest.mark.integration

MODEL = "openai:gate-test"


def _prefix() -> str:
    """A fresh key prefix under the session's (removed with it at the end)."""
    return f"{os.environ['TEAMSTER_KEY_PREFIX']}-lim-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------------- the gate
@pytest.fixture()
def gate_settings(redis_url: str) -> Iterator[TeamsterSettings]:
    settings = load_settings(key_prefix=_prefix(), lease_seconds=1.5, breaker_errors=2,
                             breaker_open_seconds=0.6, provider_cooldown_seconds=0.5,
                             provider_limits=json.dumps({MODEL: {"concurrency": 1}}))
    yield settings
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
        client.delete(key)
    client.close()


def _gate(settings: TeamsterSettings, redis_url: str, step: str = "s", run: str = "r",
          budget: RunBudget | None = None, limits: ProviderLimits | None = None) -> RedisGate:
    """A gate of its own limiter: what another worker process would hold."""
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    sync.hset(Keys(settings.key_prefix).step(run, step), mapping={"status": '"running"'})
    sync.close()
    return Limiter(settings, redis_url).gate(run_id=run, step_key=step, budget=budget, tenant=None,
                                             agent_limits=limits, workflow="wf")


def _step(settings: TeamsterSettings, redis_url: str, step: str, run: str = "r") -> dict[str, str]:
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sync.hgetall(Keys(settings.key_prefix).step(run, step))  # type: ignore[return-value]
    finally:
        sync.close()


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def test_a_concurrency_slot_is_shared_and_waiters_are_served_in_arrival_order(
        gate_settings: TeamsterSettings, redis_url: str) -> None:
    async def scenario() -> list[str]:
        holder = _gate(gate_settings, redis_url, "holder")
        waiters = [_gate(gate_settings, redis_url, f"w{i}") for i in range(3)]
        permit = await holder.acquire(MODEL, 10)
        order: list[str] = []

        async def wait_turn(gate: RedisGate) -> None:
            granted = await gate.acquire(MODEL, 10)
            order.append(gate.step_key)
            await asyncio.sleep(0.05)  # hold the slot a moment: the next waiter must wait for it
            await gate.release(granted, {"totalTokens": 5}, None)

        tasks = []
        for gate in waiters:  # arrive one after the other
            tasks.append(asyncio.ensure_future(wait_turn(gate)))
            await _until(lambda g=gate: "waiting_for" in _step(gate_settings, redis_url, g.step_key))
        record = _step(gate_settings, redis_url, "w0")
        assert "concurrent-call limit" in json.loads(record["waiting_for"])
        assert float(record["waiting_since"]) <= time.time()
        await asyncio.sleep(0.3)
        assert order == []  # nobody passes while the slot is held
        await holder.release(permit, {"totalTokens": 5}, None)
        await asyncio.gather(*tasks)
        for i in range(3):  # granted: no longer waiting
            assert "waiting_for" not in _step(gate_settings, redis_url, f"w{i}")
        assert all(g.waited_seconds > 0.2 for g in waiters)
        return order

    assert asyncio.run(scenario()) == ["w0", "w1", "w2"]


def test_a_429_makes_every_worker_back_off_for_the_providers_retry_after(
        gate_settings: TeamsterSettings, redis_url: str) -> None:
    async def scenario() -> None:
        first, other = _gate(gate_settings, redis_url, "a"), _gate(gate_settings, redis_url, "b")
        permit = await first.acquire(MODEL, 10)
        await first.release(permit, {}, ModelThrottled("429", retry_after=1.0))
        started = time.monotonic()
        task = asyncio.ensure_future(other.acquire(MODEL, 10))
        await _until(lambda: "waiting_for" in _step(gate_settings, redis_url, "b"))
        assert "back off" in json.loads(_step(gate_settings, redis_url, "b")["waiting_for"])
        granted = await task
        assert time.monotonic() - started >= 0.9  # the provider's retry-after, not the 0.5 s default
        await other.release(granted, {}, None)
        # without a retry-after header: TEAMSTER_PROVIDER_COOLDOWN_SECONDS
        permit = await first.acquire(MODEL, 10)
        await first.release(permit, {}, ModelThrottled("429"))
        started = time.monotonic()
        await other.release(await other.acquire(MODEL, 10), {}, None)
        assert 0.4 <= time.monotonic() - started

    asyncio.run(scenario())


def test_repeated_errors_open_the_breaker_one_probe_goes_through_and_its_success_closes_it(
        gate_settings: TeamsterSettings, redis_url: str) -> None:
    async def scenario() -> None:
        a, b, c = (_gate(gate_settings, redis_url, s) for s in "abc")
        for _ in range(2):  # breaker_errors=2
            await a.release(await a.acquire(MODEL, 1), {}, ProviderUnavailable("503"))
        blocked = asyncio.ensure_future(b.acquire(MODEL, 1))
        await _until(lambda: "waiting_for" in _step(gate_settings, redis_url, "b"))
        assert "circuit breaker is open" in json.loads(_step(gate_settings, redis_url, "b")["waiting_for"])
        probe = await blocked  # half-open after 0.6 s: b is the probe
        behind = asyncio.ensure_future(c.acquire(MODEL, 1))
        await _until(lambda: "waiting_for" in _step(gate_settings, redis_url, "c"))
        assert "probing" in json.loads(_step(gate_settings, redis_url, "c")["waiting_for"])
        await b.release(probe, {}, None)  # the probe succeeded: closed for everyone
        await c.release(await behind, {}, None)
        started = time.monotonic()
        await a.release(await a.acquire(MODEL, 1), {}, None)
        assert time.monotonic() - started < 0.5  # closed: no wait (generous bound, nothing else holds the slot)

    asyncio.run(scenario())


def test_a_slot_whose_holder_died_lapses_with_its_lease(gate_settings: TeamsterSettings, redis_url: str) -> None:
    async def scenario() -> None:
        dead = _gate(gate_settings, redis_url, "dead")
        await dead.acquire(MODEL, 1)
        for task in list(dead._renewals.values()):  # the worker died: nothing renews its slot any more
            task.cancel()
        slots = f"{gate_settings.key_prefix}:limit:{MODEL}:slots"
        sync = redis.Redis.from_url(redis_url, decode_responses=True)
        (_member, expires_ms), = sync.zrange(slots, 0, -1, withscores=True)
        seconds, micros = sync.time()
        sync.close()
        assert expires_ms - (seconds * 1000 + micros / 1000) <= gate_settings.lease_seconds * 1000
        live = _gate(gate_settings, redis_url, "live")
        permit = await live.acquire(MODEL, 1)  # waits for the lease to lapse, then gets the slot
        assert live.waited_seconds > 0
        await live.release(permit, {}, None)

    asyncio.run(scenario())


def test_a_held_slot_is_renewed_while_its_call_runs(gate_settings: TeamsterSettings, redis_url: str) -> None:
    async def scenario() -> None:
        holder, other = _gate(gate_settings, redis_url, "h"), _gate(gate_settings, redis_url, "o")
        permit = await holder.acquire(MODEL, 1)
        waiting = asyncio.ensure_future(other.acquire(MODEL, 1))
        await asyncio.sleep(gate_settings.lease_seconds * 2.5)  # a call far longer than the lease
        assert not waiting.done()  # the slot is still held: the concurrency limit holds for long calls
        await holder.release(permit, {}, None)
        await other.release(await waiting, {}, None)

    asyncio.run(scenario())


def test_requests_per_period_are_a_sliding_window(gate_settings: TeamsterSettings, redis_url: str) -> None:
    limits = ProviderLimits(rpm=3, period_seconds=1.0)

    async def scenario() -> list[float]:
        gates = [_gate(gate_settings, redis_url, f"g{i}", limits=limits) for i in range(7)]
        times: list[float] = []

        async def call(gate: RedisGate) -> None:
            permit = await gate.acquire("openai:rpm-test", 1)
            times.append(time.monotonic())
            await gate.release(permit, {}, None)

        await asyncio.gather(*(call(g) for g in gates))
        return sorted(times)

    times = asyncio.run(scenario())
    for i in range(len(times) - 3):  # no period holds more than 3 grants
        assert times[i + 3] - times[i] >= 0.95, times


def test_a_spent_budget_refuses_the_call_with_the_spend(gate_settings: TeamsterSettings, redis_url: str) -> None:
    async def scenario() -> None:
        gate = _gate(gate_settings, redis_url, "x", run="budgeted", budget=RunBudget(max_model_calls=2))
        for _ in range(2):
            await gate.release(await gate.acquire("scripted", 1), {"totalTokens": 7}, None)
        with pytest.raises(RunBudgetExceeded) as info:
            await gate.acquire("scripted", 1)
        assert info.value.details["spend"] == {"model_calls": 2, "tokens": 14, "cost": 0.0}
        assert info.value.details["exhausted"] == "model_calls"
        assert "teamster runs budget budgeted" in info.value.hint

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- run budgets
class Items(BaseModel):
    items: list[str]


class Item(BaseModel):
    item: str


class Word(BaseModel):
    word: str


def _fan_out(budget: RunBudget | None) -> tuple[Workflow, AgentSpec[Item, Word]]:
    suffix = uuid.uuid4().hex[:6]
    agent = AgentSpec(name=f"bud_{suffix}", input_model=Item, output_model=Word, instructions="One word.",
                      retry=RetryPolicy(max_attempts=3, backoff_base=0.01))
    wf = Workflow(f"bud_flow_{suffix}", input_model=Items, budget=budget)
    wf.fan_out("each", agent, over=lambda s: [{"item": i} for i in s.items])
    wf.join("all", fan_out="each")
    wf.register()
    return wf, agent


def test_a_run_budget_holds_across_a_fan_out() -> None:
    wf, agent = _fan_out(RunBudget(max_model_calls=3))
    with WorkflowEnvironment() as env, env.override(agent.name, script=lambda ctx: finish({"word": "ok"})):
        run = env.run(wf, {"items": ["a", "b", "c", "d"]})
        steps = {s.step_key: s for s in env.client.steps(run.run_id)}
        entry = env.client.dlq.get(run.error["dlq_entry"])
        spend = env.runtime.store.run_spend(run.run_id)
    assert run.status.value == "escalated" and run.error["error_type"] == "run_budget_exceeded"
    branches = [steps[f"each[{i}]"] for i in range(4)]
    assert sorted(b.status.value for b in branches) == ["failed", "succeeded", "succeeded", "succeeded"]
    assert spend["model_calls"] == 3 and spend["tokens"] > 0
    assert sum(b.spend_calls for b in branches) == 3 and sum(b.spend_tokens for b in branches) == spend["tokens"]
    assert entry.error_type == "run_budget_exceeded" and not entry.retryable
    assert entry.details["spend"]["model_calls"] == 3 and entry.details["budget"] == {"max_model_calls": 3}


def test_a_run_budget_counts_retries_and_escalations() -> None:
    wf, agent = _fan_out(None)
    script = lambda ctx: throttle() if ctx.attempt == 1 else finish({"word": "ok"})  # noqa: E731
    with WorkflowEnvironment() as env, env.override(agent.name, script=script):
        ok = env.run(wf, {"items": ["a"]}, budget=RunBudget(max_model_calls=2))  # the 429 and the retry
        spent = env.run(wf, {"items": ["a"]}, budget=RunBudget(max_model_calls=1))  # the retry is refused
        retried = env.client.steps(spent.run_id)
    assert ok.status.value == "succeeded"
    assert spent.status.value == "escalated" and spent.error["error_type"] == "run_budget_exceeded"
    branch = next(s for s in retried if s.step_key == "each[0]")
    assert branch.attempts == 2 and branch.spend_calls == 1

    # an escalation to another model is the same run: its calls count too
    suffix = uuid.uuid4().hex[:6]
    agent2 = AgentSpec(name=f"esc_{suffix}", input_model=Item, output_model=Word, instructions="One word.",
                       retry=RetryPolicy(max_attempts=1))
    flow = Workflow(f"esc_flow_{suffix}", input_model=Item, budget=RunBudget(max_model_calls=1))
    flow.step("pick", agent2, escalate=[retry_with(model="scripted")])
    flow.register()
    with WorkflowEnvironment() as env, env.override(agent2.name, script=lambda ctx: throttle()):
        run = env.run(flow, {"item": "x"})
        journal = env.client.journal(run.run_id, types=["outcome"])
    assert run.error["error_type"] == "run_budget_exceeded"
    assert [o.data["outcome"]["error_type"] for o in journal] == ["model_throttled", "run_budget_exceeded"]


def test_a_submit_budget_replaces_the_workflows_and_cost_comes_from_the_price_table() -> None:
    wf, agent = _fan_out(RunBudget(max_model_calls=1))
    prices = json.dumps({"scripted": {"input": 1_000_000, "output": 1_000_000}})  # 1 per token: easy to check
    with WorkflowEnvironment(model_prices=prices) as env, \
            env.override(agent.name, script=lambda ctx: finish({"word": "ok"})):
        run = env.run(wf, {"items": ["a", "b"]}, budget=RunBudget(max_model_calls=10))
        spend = env.runtime.store.run_spend(run.run_id)
        capped = env.run(wf, {"items": ["a", "b", "c"]}, budget=RunBudget(max_cost=spend["cost"] / 2 + 1))
        record = env.client.status(run.run_id)
    assert run.status.value == "succeeded" and record.budget == {"max_model_calls": 10}
    assert spend["cost"] == pytest.approx(spend["tokens"])  # the price table: one per token
    assert capped.status.value == "escalated" and capped.error["error_type"] == "run_budget_exceeded"


def test_budgets_and_limits_are_validated_with_clear_errors() -> None:
    with pytest.raises(ValidationError):
        RunBudget(max_model_calls=0)
    with pytest.raises(ValidationError):
        ProviderLimits(rpm=-1)
    with pytest.raises(WorkflowDefinitionError, match="tenant_key 'customer' is not a field of Items"):
        Workflow(f"bad_{uuid.uuid4().hex[:6]}", input_model=Items, tenant_key="customer")
    with pytest.raises(InvalidSettings, match="TEAMSTER_PROVIDER_LIMITS"):
        load_settings(provider_limits="{not json")
    with pytest.raises(InvalidSettings, match="TEAMSTER_PROVIDER_LIMITS"):
        load_settings(provider_limits=json.dumps({"openai:gpt-4o": {"rpm": 10, "rpd": 5}}))
    wf, _agent = _fan_out(None)
    with WorkflowEnvironment() as env, pytest.raises(InvalidInput, match="RunBudget"):
        env.submit(wf, {"items": []}, budget={"max_model_calls": 1})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- real workers, real HTTP
MODULES = "tests.limits_flows"
RATE = 8  # requests the model server accepts per window
WINDOW = 2.0


@pytest.fixture(scope="module")
def limited_server() -> Iterator[ModelServer]:
    with ModelServer(latency=0.05, rate_limit=RATE, rate_window=WINDOW) as server:
        yield server


def test_workers_sharing_a_limit_never_exceed_it_by_more_than_one_request_per_window(
        limited_server: ModelServer) -> None:
    # The margin must cover how much later than its grant a request can reach the server: the limiter counts grants,
    # the server counts arrivals. Three workers of eight threads on two cores, with the rest of the suite and a CPU
    # hog beside them, delayed some requests past 0.5 s (one full run saw 5 requests of one window arrive in the
    # next); a margin of a whole window covers any delay under one window, and the server's count must still hold.
    limits = json.dumps({"openai:default": {"rpm": RATE, "period_seconds": WINDOW, "margin_seconds": WINDOW}})
    env = {"workflow_modules": MODULES, "model": "openai:default", "model_base_url": limited_server.url,
           "provider_limits": limits}
    client = Client(load_settings(workflow_modules=[MODULES]))
    workers = [Worker(f"lim{i}", concurrency=8, env=env) for i in range(3)]
    try:
        for worker in workers:
            worker.start()
        limited_server.reset()
        run_ids = [client.submit("lim_http", {"text": f"q{i}"}) for i in range(4 * RATE)]
        runs = [wait_settled(client, run_id, timeout=120) for run_id in run_ids]
    finally:
        for worker in workers:
            worker.stop()
    assert [r.status.value for r in runs] == ["succeeded"] * len(runs), [r.error for r in runs if r.error]
    stats = limited_server.stats()
    # the server's own count of every request that reached it, window by window (429s included)
    assert stats["max_requests_per_window"] <= RATE + 1, stats["windows"]
    assert stats["completed"] == len(runs)


def test_a_killed_workers_slot_is_freed_within_its_lease(limited_server: ModelServer, redis_url: str) -> None:
    lease = 3.0
    env = {"workflow_modules": MODULES, "model_base_url": limited_server.url, "lease_seconds": lease,
           "provider_limits": json.dumps({"openai:slot": {"concurrency": 1}})}
    client = Client(load_settings(workflow_modules=[MODULES]))
    slots = f"{client.settings.key_prefix}:limit:openai:slot:slots"
    held = client.submit("lim_slot", {"text": "hold the slot [hang]"})
    with Worker("slotA", concurrency=2, env=env) as first:
        wait_until(lambda: client.runtime.client.zcard(slots) == 1, timeout=30)
        first.kill()
    killed_at = client.runtime.client.time()
    (_member, expires_ms), = client.runtime.client.zrange(slots, 0, -1, withscores=True)
    assert expires_ms - (killed_at[0] * 1000 + killed_at[1] / 1000) <= lease * 1000  # lapses within its lease
    client.cancel(held, reason="its worker was killed; the test moves on")  # a redelivery must not take the slot
    with Worker("slotB", concurrency=2, env=env):
        run = wait_settled(client, client.submit("lim_slot", {"text": "my turn"}), timeout=60)
    assert run.status.value == "succeeded", run.error


def test_an_operator_raises_a_spent_runs_budget_and_retries_its_entry() -> None:
    wf, agent = _fan_out(RunBudget(max_model_calls=1))
    with WorkflowEnvironment() as env, env.override(agent.name, script=lambda ctx: finish({"word": "ok"})):
        run = env.run(wf, {"items": ["a", "b"]})
        assert run.error["error_type"] == "run_budget_exceeded"
        changed = env.client.set_budget(run.run_id, RunBudget(max_model_calls=5), by="ada", reason="two pages")
        assert changed.budget == {"max_model_calls": 5}
        env.client.dlq.retry(run.error["dlq_entry"], by="ada", reason="budget raised")
        env.drain()
        final = env.client.status(run.run_id)
        event = env.client.journal(run.run_id, types=["budget_changed"])[0]
    assert final.status.value == "succeeded"
    assert event.data["by"] == "ada" and event.data["old"] == {"max_model_calls": 1}
    assert event.data["spend"]["model_calls"] == 1


def test_without_coordination_a_429_is_each_workers_own_business(redis_url: str) -> None:
    settings = load_settings(key_prefix=_prefix(), provider_coordination=False,
                             provider_limits=json.dumps({MODEL: {"concurrency": 1}}))

    async def scenario() -> None:
        a, b = _gate(settings, redis_url, "a"), _gate(settings, redis_url, "b")
        first = await a.acquire(MODEL, 1)
        second = await b.acquire(MODEL, 1)  # no shared limit: the concurrency limit is not applied either
        await a.release(first, {}, ModelThrottled("429", retry_after=30))
        await b.release(second, {}, None)
        started = time.monotonic()
        await b.release(await b.acquire(MODEL, 1), {}, None)
        assert time.monotonic() - started < 5  # no 30 s cool-down for the others

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture()
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkflowEnvironment]:
    with WorkflowEnvironment(provider_limits=json.dumps({MODEL: {"concurrency": 1}})) as environment:
        monkeypatch.setenv("TEAMSTER_REDIS_URL", str(environment.settings.redis_url))
        monkeypatch.setenv("TEAMSTER_KEY_PREFIX", environment.settings.key_prefix)
        monkeypatch.setenv("TEAMSTER_PROVIDER_LIMITS", json.dumps({MODEL: {"concurrency": 1}}))
        yield environment


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner  # noqa: PLC0415

    from teamster.orchestrator.cli import app  # noqa: PLC0415

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})


def test_runs_show_says_waiting_for_provider_capacity_and_the_spend_then_an_operator_raises_the_budget(
        cli_env: WorkflowEnvironment) -> None:
    wf, agent = _fan_out(RunBudget(max_model_calls=1))
    with cli_env.override(agent.name, script=lambda ctx: finish({"word": "ok"})):
        run = cli_env.run(wf, {"items": ["a", "b"]})
    shown = _cli("runs", "show", run.run_id)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "spent 1 model call," in text and "of a budget of 1 model calls" in text
    assert "run_budget_exceeded" in text

    refused = _cli("runs", "budget", run.run_id, "--by", "ada")
    assert refused.exit_code == 1 and "give --unlimited, or at least one of" in refused.stderr
    raised = _cli("runs", "budget", run.run_id, "--max-model-calls", "5", "--by", "ada", "--reason", "two pages")
    assert raised.exit_code == 0, raised.output
    assert "a budget of 5 model calls (spent so far: 1 model call" in " ".join(raised.output.split())
    assert f"teamster dlq retry '{run.error['dlq_entry']}' --by ada --wait" in raised.output  # quoted: each[1]
    cli_env.client.dlq.retry(run.error["dlq_entry"], by="ada")  # as that command does (its message to this queue)
    cli_env.drain()
    assert cli_env.client.status(run.run_id).status.value == "succeeded"

    # a running step that waits for a concurrency slot another worker holds
    store = cli_env.runtime.store
    waiting_run = cli_env.submit(wf, {"items": ["c"]})
    fan_out = cli_env.queue.pop()
    assert fan_out == (waiting_run, "each")
    StepExecutor(cli_env.runtime).execute(*fan_out)  # the fan-out runs; its branch is queued
    claim = store.claim(waiting_run, "each[0]", "test-worker", 30)
    assert claim.kind == "claimed"
    holder = _gate(cli_env.settings, str(cli_env.settings.redis_url), "holder", run="elsewhere")
    waiter = cli_env.runtime.limiter.gate(run_id=waiting_run, step_key="each[0]", budget=None, tenant=None,
                                          agent_limits=None, workflow=wf.name)

    async def scenario() -> None:
        permit = await holder.acquire(MODEL, 1)
        task = asyncio.ensure_future(waiter.acquire(MODEL, 1))
        await _until(lambda: bool(store.get_step(waiting_run, "each[0]").waiting_for))  # type: ignore[union-attr]
        shown = await asyncio.to_thread(_cli, "runs", "show", waiting_run)
        assert shown.exit_code == 0, shown.output
        text = " ".join(shown.output.split())
        assert "waiting" in text and "provider capacity: openai:gate-test: the provider's concurrent-call limit" \
            in text, text
        assert not re.search(r"each\[0\]\s+branch\s+running", shown.output)
        await holder.release(permit, {}, None)
        await waiter.release(await task, {}, None)

    asyncio.run(scenario())
    assert store.get_step(waiting_run, "each[0]").waiting_for is None  # type: ignore[union-attr]


def test_doctor_shows_each_providers_limits_and_their_state_now(redis_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    limits = json.dumps({MODEL: {"rpm": 100, "concurrency": 2}})
    settings = load_settings(key_prefix=_prefix(), provider_limits=limits, provider_cooldown_seconds=60)
    for name, value in {"TEAMSTER_REDIS_URL": redis_url, "TEAMSTER_KEY_PREFIX": settings.key_prefix,
                        "TEAMSTER_PROVIDER_LIMITS": limits, "TEAMSTER_MODEL": "openai:unlimited",
                        "OPENAI_API_KEY": "sk-test"}.items():
        monkeypatch.setenv(name, value)

    async def hold_and_throttle() -> None:
        gate = _gate(settings, redis_url, "held")
        await gate.acquire(MODEL, 1)  # one call in flight
        for task in gate._renewals.values():
            task.cancel()
        other = _gate(settings, redis_url, "throttled")
        await other.release(await other.acquire(MODEL, 1), {}, ModelThrottled("429"))  # a cool-down starts

    asyncio.run(hold_and_throttle())
    report = json.loads(_cli("doctor", "--for", "production", "--json").stdout)
    found = {c["detail"].split(":")[0] + ":" + c["detail"].split(":")[1]: c for c in report["checks"]
             if c["name"] == "provider limits"}
    limited = found[MODEL]
    assert limited["status"] == "WARN" and "cooling down" in limited["detail"], limited
    assert "100 requests per minute, 2 concurrent (TEAMSTER_PROVIDER_LIMITS)" in limited["detail"]
    assert "now 1 in flight, 2 requests" in limited["detail"]
    unlimited = found["openai:unlimited"]
    assert unlimited["status"] == "WARN" and "none shared" in unlimited["detail"]
    assert "TEAMSTER_PROVIDER_LIMITS='{\"openai:unlimited\"" in unlimited["fix"]


def test_doctor_sums_each_tenants_state_and_shows_the_models_a_provider_key_limits(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate keys a limit by model and tenant (limit_name), and a provider's own key limits each of its models on
    its own: doctor reads the keys the gate writes."""
    limits = json.dumps({MODEL: {"rpm": 100, "concurrency": 2}, "anthropic": {"concurrency": 3}})
    settings = load_settings(key_prefix=_prefix(), provider_limits=limits)
    for name, value in {"TEAMSTER_REDIS_URL": redis_url, "TEAMSTER_KEY_PREFIX": settings.key_prefix,
                        "TEAMSTER_PROVIDER_LIMITS": limits, "TEAMSTER_MODEL": MODEL,
                        "OPENAI_API_KEY": "sk-test"}.items():
        monkeypatch.setenv(name, value)

    async def hold() -> None:  # one call in flight each, for a tenant
        for model, tenant in ((MODEL, "acme"), ("anthropic:gate-test", "ops@acme.example")):
            gate = Limiter(settings, redis_url).gate(run_id="r", step_key=tenant, budget=None, tenant=tenant,
                                                     agent_limits=None, workflow="wf")
            await gate.acquire(model, 1)
            for task in gate._renewals.values():
                task.cancel()

    asyncio.run(hold())
    report = json.loads(_cli("doctor", "--json").stdout)
    found = {c["detail"].split(": ")[0]: c for c in report["checks"] if c["name"] == "provider limits"}
    assert "now 1 in flight, 1 requests" in found[MODEL]["detail"], found[MODEL]
    provider = found["anthropic"]
    assert provider["status"] == "OK", provider
    assert "3 concurrent (TEAMSTER_PROVIDER_LIMITS, for each anthropic model on its own)" in provider["detail"]
    assert "anthropic:gate-test 1 in flight, 1 requests" in provider["detail"], provider


def test_cancelled_calls_give_their_slot_back_and_do_not_open_the_breaker(
        gate_settings: TeamsterSettings, redis_url: str) -> None:
    """A call teamster stops (deadline, lease lost, run cancelled) says nothing about the provider's health."""
    async def scenario() -> None:
        for i in range(3):  # breaker_errors=2: three provider errors would open it
            model = RecordingModel(ScriptedModel([finish({"word": "late"})], latency=30),
                                   gate=_gate(gate_settings, redis_url, f"c{i}"), model_ref=MODEL)
            call = asyncio.ensure_future(_drain(model.stream([{"role": "user", "content": [{"text": "hi"}]}])))
            await _until(lambda m=model: m.live_calls == 1)  # holds the slot, waiting for its answer
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        other = _gate(gate_settings, redis_url, "next")
        permit = await asyncio.wait_for(other.acquire(MODEL, 1), 5)  # concurrency 1: every slot was given back
        assert other.waited_seconds == 0  # and no breaker stood in the way
        await other.release(permit, {}, None)

    asyncio.run(scenario())


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass
