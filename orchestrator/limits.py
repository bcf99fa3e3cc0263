"""Provider limits shared by every worker, a shared cool-down and circuit breaker, and run budgets -- in Redis.

Every live model call of a step passes the step's :class:`RedisGate` (a :class:`~teamster.agents.limits.ModelGate`):

* **acquire** runs one Lua script that, atomically for all workers: refuses the call when the run's budget (calls,
  tokens, cost across all its steps) is spent (``run_budget_exceeded``); makes it wait while the provider cools down
  after a 429/529 or while its circuit breaker is open (letting one probe through when it half-opens); and takes
  capacity from the provider's limits -- a sliding minute of requests (``rpm``) and tokens (``tpm``, reserved from an
  estimate) and a concurrency slot with a lease (a slot of a killed worker frees itself when the lease lapses).
  Waiters queue in arrival order, so no step starves. A step that waits is neither failing nor using an attempt:
  its record says ``waiting_for`` (``teamster runs show``), its deadline and lease are extended by the wait.
* **release** runs one script that frees the slot, trues up the tokens, adds the call's tokens and cost to the run's
  spend, and learns from the outcome: a 429/529 starts a cool-down for every worker (the provider's ``retry-after``,
  else ``TEAMSTER_PROVIDER_COOLDOWN_SECONDS``); provider errors in a row open the breaker; a success closes it.

Limits are keyed by provider and model (``openai:gpt-4o``), plus a tenant when the workflow names one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from teamster.agents.limits import Permit, Price, ProviderLimits, RunBudget, cost_of
from teamster.config.settings import TeamsterSettings
from teamster.errors import (
    ModelThrottled,
    ModelTimeout,
    ProviderUnavailable,
    RunBudgetExceeded,
    TeamsterError,
)
from teamster.orchestrator import metrics
from teamster.orchestrator.connection import pool_options
from teamster.orchestrator.keys import Keys

__all__ = ["Limiter", "RedisGate", "LIMIT_KEY_PARTS", "limit_name", "provider_state"]

log = logging.getLogger(__name__)

_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local spend = redis.call('HMGET', KEYS[10], 'spend_calls', 'spend_tokens', 'spend_cost')
local calls, tokens, cost = tonumber(spend[1] or '0'), tonumber(spend[2] or '0'), tonumber(spend[3] or '0')
local spent = {calls, tokens, tostring(cost)}
if ARGV[11] ~= '' and calls + 1 > tonumber(ARGV[11]) then return {'budget', 'model_calls', unpack(spent)} end
if ARGV[12] ~= '' and tokens >= tonumber(ARGV[12]) then return {'budget', 'tokens', unpack(spent)} end
if ARGV[13] ~= '' and cost >= tonumber(ARGV[13]) then return {'budget', 'cost', unpack(spent)} end
local probe = 0
if ARGV[15] == '1' then
  local cooling = redis.call('PTTL', KEYS[6])
  if cooling > 0 then return {'wait', cooling, 'cooldown'} end
  local open = redis.call('PTTL', KEYS[8])
  if open > 0 then return {'wait', open, 'breaker_open'} end
  if tonumber(redis.call('GET', KEYS[7]) or '0') >= tonumber(ARGV[9]) then
    if not redis.call('SET', KEYS[9], ARGV[2], 'NX', 'PX', ARGV[7]) then return {'wait', 200, 'breaker_probe'} end
    probe = 1
  end
end
local rpm, tpm, conc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if rpm > 0 or tpm > 0 or conc > 0 then
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do redis.call('ZREM', KEYS[4], gone) end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  redis.call('ZADD', KEYS[4], 'NX', now, ARGV[1])
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[14]))
  for _, m in ipairs(old) do
    local t = tonumber(redis.call('HGET', KEYS[3], m) or '0')
    if t ~= 0 then redis.call('HINCRBY', KEYS[3], '_sum', -t) end
    redis.call('HDEL', KEYS[3], m)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[14]))
  local free = 1000000000
  if conc > 0 then free = math.min(free, conc - redis.call('ZCARD', KEYS[1])) end
  if rpm > 0 then free = math.min(free, rpm - redis.call('ZCARD', KEYS[2])) end
  local rank = redis.call('ZRANK', KEYS[4], ARGV[1])
  local wait, why = nil, nil
  if rank >= free then
    why = 'limit'
    wait = 20 * (rank - math.max(free, 0) + 1)  -- the further back in the queue, the less often it asks
    if rpm > 0 and redis.call('ZCARD', KEYS[2]) >= rpm then
      local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      wait = math.max(10, tonumber(oldest[2]) + tonumber(ARGV[14]) - now)
      why = 'rpm'
    elseif conc > 0 then
      why = 'concurrency'
    end
  elseif tpm > 0 then
    local used = tonumber(redis.call('HGET', KEYS[3], '_sum') or '0')
    if used > 0 and used + tonumber(ARGV[3]) > tpm then
      local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      wait = oldest[2] and math.max(10, tonumber(oldest[2]) + tonumber(ARGV[14]) - now) or 1000
      why = 'tpm'
    end
  end
  if wait then
    if probe == 1 then redis.call('DEL', KEYS[9]) end
    for i = 4, 5 do redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[14]) + tonumber(ARGV[7])) end
    return {'wait', wait, why}
  end
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  if conc > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[7]), ARGV[2]) end
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HINCRBY', KEYS[3], '_sum', ARGV[3])
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[14]) + tonumber(ARGV[7])) end
end
redis.call('HINCRBY', KEYS[10], 'spend_calls', 1)
if redis.call('EXISTS', KEYS[11]) == 1 then redis.call('HINCRBY', KEYS[11], 'spend_calls', 1) end
return {'ok', probe}
"""

_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local reserved = redis.call('HGET', KEYS[2], ARGV[1])
if reserved then
  local delta = tonumber(ARGV[3]) - tonumber(reserved)
  redis.call('HINCRBY', KEYS[2], ARGV[1], delta)
  redis.call('HINCRBY', KEYS[2], '_sum', delta)
end
redis.call('HINCRBY', KEYS[3], 'spend_tokens', ARGV[3])
redis.call('HINCRBYFLOAT', KEYS[3], 'spend_cost', ARGV[4])
if redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('HINCRBY', KEYS[8], 'spend_tokens', ARGV[3])
  redis.call('HINCRBYFLOAT', KEYS[8], 'spend_cost', ARGV[4])
end
local outcome = ARGV[5]
if outcome == 'ok' then
  redis.call('DEL', KEYS[4], KEYS[5])
elseif outcome == 'throttled' then
  if redis.call('PTTL', KEYS[7]) < tonumber(ARGV[6]) then redis.call('SET', KEYS[7], '1', 'PX', ARGV[6]) end
elseif outcome == 'error' then
  local n = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], 600)
  if n >= tonumber(ARGV[7]) then redis.call('SET', KEYS[5], '1', 'PX', ARGV[8]) end
end
if ARGV[9] == '1' then redis.call('DEL', KEYS[6]) end
return 1
"""

_RENEW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""

_TICKET_TTL_MS = 10_000
"""A waiter that stops asking for this long (its worker died) leaves the queue."""

_WAIT_LABEL = {"cooldown": "the provider asked every worker to back off (429/529)",
               "breaker_open": "the provider's circuit breaker is open after repeated errors",
               "breaker_probe": "another worker is probing the provider after repeated errors",
               "rpm": "the provider's requests-per-minute limit", "tpm": "the provider's tokens-per-minute limit",
               "concurrency": "the provider's concurrent-call limit", "limit": "the provider's limits"}


LIMIT_KEY_PARTS = ("slots", "log", "tokens", "queue", "alive")
"""The keys of one limit, ``{Keys.limit(name)}:{part}``: held slots, the request log, reserved tokens, the queue of
waiting calls and its members' liveness."""


def limit_name(model: str, tenant: str | None = None) -> str:
    """The limit key of a provider string (``openai:gpt-4o``), optionally per tenant."""
    return f"{model}@{tenant}" if tenant else model


@dataclass
class _LoopClient:
    """One event loop's Redis client and its scripts (sent by SHA: EVALSHA, loaded once)."""

    redis: aioredis.Redis
    acquire: AsyncScript
    release: AsyncScript
    renew: AsyncScript


class Limiter:
    """This process's access to the shared limits: settings, prices, one async Redis client per event loop.

    Args:
        settings: teamster settings (``provider_limits``, ``model_prices``, breaker settings).
        redis_url: The Redis of the deployment.
    """

    def __init__(self, settings: TeamsterSettings, redis_url: str) -> None:
        self.settings = settings
        self.url = redis_url
        self.keys = Keys(settings.key_prefix)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = \
            weakref.WeakKeyDictionary()

    def client(self) -> aioredis.Redis:
        """The async Redis client of the running event loop (its pool sized like the process's)."""
        return self._loop_client().redis

    def _loop_client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            # no retry_on_timeout: re-sending an acquire that timed out could take a second slot
            pool = aioredis.BlockingConnectionPool.from_url(self.url, **pool_options(self.settings))
            client = aioredis.Redis(connection_pool=pool)
            found = _LoopClient(client, client.register_script(_ACQUIRE), client.register_script(_RELEASE),
                                client.register_script(_RENEW))
            self._clients[loop] = found
        return found

    def _match(self, table: dict[str, Any], model: str) -> Any:
        provider = model.split(":", 1)[0]
        return table.get(model) or table.get(provider)

    def limits_for(self, model: str, agent_limits: ProviderLimits | None = None) -> ProviderLimits:
        """The limits of a provider string: the agent's own, else ``provider:model``'s, else ``provider``'s."""
        if agent_limits is not None:
            return agent_limits
        found = self._match(self.settings.provider_limits, model)
        return found if isinstance(found, ProviderLimits) else ProviderLimits()

    def price_of(self, model: str) -> Price | None:
        """The price of a provider string (``provider:model`` first, then ``provider``), if set."""
        found = self._match(self.settings.model_prices, model)
        return found if isinstance(found, Price) else None

    def gate(self, *, run_id: str, step_key: str, budget: RunBudget | None, tenant: str | None,
             agent_limits: ProviderLimits | None, workflow: str,
             on_wait: Callable[[float], None] | None = None) -> RedisGate:
        """The gate of one step attempt."""
        return RedisGate(self, run_id=run_id, step_key=step_key, budget=budget, tenant=tenant,
                         agent_limits=agent_limits, workflow=workflow, on_wait=on_wait)


class RedisGate:
    """One step attempt's gate (see the module docstring)."""

    def __init__(self, limiter: Limiter, *, run_id: str, step_key: str, budget: RunBudget | None,
                 tenant: str | None, agent_limits: ProviderLimits | None, workflow: str,
                 on_wait: Callable[[float], None] | None) -> None:
        self.limiter = limiter
        self.keys = limiter.keys
        self.run_id = run_id
        self.step_key = step_key
        self.budget = budget
        self.tenant = tenant
        self.agent_limits = agent_limits
        self.workflow = workflow
        self.on_wait = on_wait
        self.cost = 0.0
        self.tokens = 0
        self._waited = 0.0
        self._probes: set[str] = set()
        self._renewals: dict[str, asyncio.Task[None]] = {}
        self._unrecorded: dict[str, float] = {"model_calls": 0, "tokens": 0, "cost": 0.0}

    @property
    def waited_seconds(self) -> float:
        return self._waited

    def _limit_keys(self, model: str) -> list[str]:
        base, health = self.keys.limit(limit_name(model, self.tenant)), self.keys.provider(model)
        return [*(f"{base}:{part}" for part in LIMIT_KEY_PARTS),
                f"{health}:cooldown", f"{health}:errors", f"{health}:open", f"{health}:probe",
                self.keys.run(self.run_id), self.keys.step(self.run_id, self.step_key)]

    async def acquire(self, model: str, estimated_tokens: int) -> Permit:
        settings = self.limiter.settings
        limits = self.limiter.limits_for(model, self.agent_limits)
        coordinated = settings.provider_coordination and model != "scripted"
        ticket, permit_id = uuid.uuid4().hex, uuid.uuid4().hex
        if not coordinated and self.budget is None:  # nothing to share or to enforce: no round trip
            return Permit(permit_id, model, estimated_tokens, local=True)
        if not coordinated:  # offline, or each worker on its own: only the run budget applies
            limits = ProviderLimits()
        scripts = self.limiter._loop_client()
        client = scripts.redis
        keys = self._limit_keys(model)
        budget = self.budget or RunBudget()
        args = [ticket, permit_id, estimated_tokens, limits.rpm, limits.tpm, limits.concurrency,
                int(settings.lease_seconds * 1000), _TICKET_TTL_MS, settings.breaker_errors,
                int(settings.breaker_open_seconds * 1000),
                "" if budget.max_model_calls is None else budget.max_model_calls,
                "" if budget.max_tokens is None else budget.max_tokens,
                "" if budget.max_cost is None else repr(budget.max_cost),
                int((limits.period_seconds + limits.margin_seconds) * 1000),
                "1" if coordinated else "0"]
        started = time.monotonic()
        waiting = False
        try:
            while True:
                result = await scripts.acquire(keys=keys, args=args)
                kind = str(result[0])
                if kind == "ok":
                    waited = time.monotonic() - started if waiting else 0.0
                    if waiting:
                        metrics.PROVIDER_WAIT_SECONDS.labels(model).observe(waited)
                    if int(result[1]):
                        self._probes.add(permit_id)
                    if limits.concurrency:  # the slot is leased: renewed while the call runs, lapses if we die
                        self._renewals[permit_id] = asyncio.ensure_future(self._renew_slot(scripts, keys[0],
                                                                                           permit_id))
                    return Permit(permit_id, model, estimated_tokens, waited)
                if kind == "budget":
                    raise self._budget_error(budget, str(result[1]), result[2:5])
                wait_ms, why = int(result[1]), str(result[2])
                if not waiting:
                    waiting = True
                    metrics.PROVIDER_WAITS.labels(model, why).inc()
                    await client.hset(self.keys.step(self.run_id, self.step_key), mapping={  # type: ignore[misc]
                        "waiting_for": json.dumps(f"provider capacity: {model}: {_WAIT_LABEL.get(why, why)}"),
                        "waiting_since": repr(time.time())})
                waited_so_far = time.monotonic() - started
                if waited_so_far > settings.provider_wait_max_seconds:
                    raise ModelThrottled(f"no capacity at {model} after waiting {waited_so_far:.0f}s: "
                                         f"{_WAIT_LABEL.get(why, why)} (TEAMSTER_PROVIDER_WAIT_MAX_SECONDS)",
                                         waited_seconds=round(waited_so_far, 1), waiting_for=why)
                pause = min(wait_ms / 1000.0, 1.0) * random.uniform(0.8, 1.2)
                await asyncio.sleep(pause)
                self._waited += pause
                if self.on_wait is not None:
                    self.on_wait(pause)
        finally:
            if waiting:  # granted, refused, given up or cancelled: the step no longer waits
                await asyncio.shield(self._stop_waiting(client, keys[3], ticket))

    async def _renew_slot(self, scripts: _LoopClient, slots: str, permit_id: str) -> None:
        lease = self.limiter.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3.0)
            try:
                await scripts.renew(keys=[slots], args=[permit_id, int(lease * 1000)])
            except aioredis.RedisError as exc:  # the next renewal may succeed while the lease still holds
                log.warning("renewing a provider concurrency slot failed: %s", exc)

    async def _stop_waiting(self, client: aioredis.Redis, queue: str, ticket: str) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.hdel(self.keys.step(self.run_id, self.step_key), "waiting_for", "waiting_since")
        pipe.zrem(queue, ticket)
        await pipe.execute()

    def _budget_error(self, budget: RunBudget, exhausted: str, spent: list[Any]) -> RunBudgetExceeded:
        spend = {"model_calls": int(spent[0]), "tokens": int(spent[1]), "cost": float(spent[2])}
        metrics.RUN_BUDGET_BREACHES.labels(self.workflow, exhausted).inc()
        return RunBudgetExceeded(
            f"the run's budget of {_budget_text(budget, exhausted)} is spent (so far: {spend['model_calls']} model "
            f"calls, {spend['tokens']} tokens, cost {spend['cost']:.4f})",
            budget=budget.model_dump(exclude_none=True), exhausted=exhausted, spend=spend,
            hint=f"Raise the run's budget (`teamster runs budget {self.run_id} --help`), then retry its dead-letter "
                 "entry (`teamster dlq retry ENTRY`).")

    async def release(self, permit: Permit, usage: dict[str, int], error: TeamsterError | None) -> None:
        renewal = self._renewals.pop(permit.id, None)
        if renewal is not None:
            renewal.cancel()
        settings = self.limiter.settings
        keys = self._limit_keys(permit.model)
        used = int(usage.get("totalTokens", usage.get("inputTokens", 0) + usage.get("outputTokens", 0)))
        cost = cost_of(usage, self.limiter.price_of(permit.model))
        self.cost += cost
        self.tokens += used
        metrics.SPEND_TOKENS.labels(self.workflow, permit.model).inc(used)
        if cost:
            metrics.SPEND_COST.labels(self.workflow, permit.model).inc(cost)
        if permit.local:  # its spend goes out with the step's end (see unrecorded)
            self._unrecorded["model_calls"] += 1
            self._unrecorded["tokens"] += used
            self._unrecorded["cost"] += cost
            return
        outcome, cooldown_ms = "other", 0
        if not settings.provider_coordination or permit.model == "scripted":
            pass  # nothing to learn for the other workers
        elif error is None:
            outcome = "ok"
        elif isinstance(error, ModelThrottled):
            outcome = "throttled"
            after = error.details.get("retry_after")
            cooldown_ms = int(1000 * (float(after) if after is not None else settings.provider_cooldown_seconds))
            metrics.PROVIDER_COOLDOWNS.labels(permit.model).inc()
        elif isinstance(error, (ProviderUnavailable, ModelTimeout)):
            outcome = "error"
        scripts = self.limiter._loop_client()
        await scripts.release(
            keys=[keys[0], keys[2], keys[9], keys[6], keys[7], keys[8], keys[5], keys[10]],
            args=[permit.id, permit.estimated_tokens, used, repr(cost), outcome, cooldown_ms, settings.breaker_errors,
                  int(settings.breaker_open_seconds * 1000), "1" if permit.id in self._probes else "0"])

    def unrecorded(self) -> dict[str, float]:
        """Spend of calls that passed no Redis gate (offline, no budget): the step's end records it in its own
        transaction, so an offline step pays no extra round trip for its accounting."""
        return dict(self._unrecorded)


def _budget_text(budget: RunBudget, exhausted: str) -> str:
    if exhausted == "model_calls":
        return f"{budget.max_model_calls} model call{'s' if budget.max_model_calls != 1 else ''}"
    if exhausted == "tokens":
        return f"{budget.max_tokens} tokens"
    return f"cost {budget.max_cost}"


def provider_state(client: Any, prefix: str, model: str, *, period_seconds: float = 60.0,
                   breaker_errors: int = 5) -> dict[str, Any]:
    """What the shared limits of one provider string look like right now (sync; for ``teamster doctor``).

    Returns ``in_flight`` (concurrency slots held), ``requests`` and ``tokens`` in the current period, ``waiting``
    (steps queued for capacity), ``cooldown_seconds`` left, ``breaker`` (``closed``/``open``/``half-open``),
    ``breaker_seconds`` left while open and ``errors`` (provider errors in a row).
    """
    keys = Keys(prefix)
    base, health = keys.limit(model), keys.provider(model)
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    pipe = client.pipeline(transaction=False)
    pipe.zcount(f"{base}:slots", now_ms, "+inf")
    pipe.zcount(f"{base}:log", now_ms - int(period_seconds * 1000), "+inf")
    pipe.hget(f"{base}:tokens", "_sum")
    pipe.zcard(f"{base}:queue")
    pipe.pttl(f"{health}:cooldown")
    pipe.pttl(f"{health}:open")
    pipe.get(f"{health}:errors")
    in_flight, requests, tokens, waiting, cooldown, open_ms, errors = pipe.execute()
    errors = int(errors or 0)
    breaker = "open" if open_ms > 0 else "half-open" if errors >= breaker_errors else "closed"
    return {"in_flight": int(in_flight), "requests": int(requests), "tokens": int(tokens or 0),
            "waiting": int(waiting), "cooldown_seconds": max(0, cooldown) / 1000.0, "breaker": breaker,
            "breaker_seconds": max(0, open_ms) / 1000.0, "errors": errors}
