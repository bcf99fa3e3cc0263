"""The run store on Redis: runs, versioned state, step records with their leases and fencing tokens.

Writes that must go together go together: every multi-key change is a :class:`Tx` -- guards (compare a
field with an expected value) plus writes -- executed by one Lua script, so it applies entirely or not at
all. A step commit is guarded by the fencing token (a stale token is rejected, invariant I4), by the step
not being terminal yet (committed once, never twice) and by the run's state version (optimistic
concurrency between parallel branches of one run): :meth:`RunStore.optimistic` is the one place that
retries on a version conflict.

All hash fields hold JSON values (a status is stored as ``"running"``, a counter as ``3``), so Lua can
compare and increment them and Python decodes them with one rule. This module is the only one that sees that
encoding: everything else gets typed records and enums (the Lua scripts take their literals from the enums).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from json.scanner import make_scanner
from typing import Any, TypeVar

import redis

from teamster.errors import RunNotFound, StoreUnavailable, TeamsterError
from teamster.orchestrator.connection import retrying
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import (
    RUN_TERMINAL,
    STEP_OPEN,
    DeadLetterEntry,
    DeadLetterStatus,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    now,
)

__all__ = [
    "RunStore",
    "Tx",
    "TxRejected",
    "VersionConflict",
    "Claim",
    "encode_fields",
    "decode_fields",
    "literal",
    "MAX_CAS",
]


T = TypeVar("T")

MAX_CAS = 100
"""How often an optimistic write is re-planned after a state-version conflict before giving up."""


_ENCODE = json.JSONEncoder(default=str, separators=(",", ":")).encode


def literal(value: Any) -> str:
    """The stored (JSON) form of ``value``: what Lua compares (``StepStatus.RUNNING`` -> ``"running"``).

    ``json.dumps(value, default=str, separators=(",", ":"))``, with one encoder built once instead of per call (a
    commit encodes dozens of fields; building the encoder was half of each call)."""
    return _ENCODE(value)


def _lua_list(values: Iterable[Any]) -> str:
    return "{" + ", ".join(f"[{literal(v)!r}]=true" for v in values) + "}"


# Redis's clock, in seconds (the one clock every lease is read and written by, whichever host a worker runs on).
_SERVER_NOW = """local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000"""

# A claim reads the step, its run and the run's step index and takes the lease in one round trip, so the worker
# needs no further read before running the step. The lease is a field of the step record, next to its fencing token:
# ``lease_until`` (Redis server time, seconds). A running step whose lease has not run out is "busy"; a running step
# whose lease ran out lost its worker and is taken over (a new token, ``lease_expiries`` + 1).
_CLAIM = f"""
local step = redis.call('HGETALL', KEYS[1])
if #step == 0 then return {{'missing', ''}} end
local fields = {{}}
for i = 1, #step, 2 do fields[step[i]] = step[i + 1] end
local status = fields['status']
if status == {literal(StepStatus.PARKED)!r} then return {{'parked', fields['child_run'] or ''}} end
local open = {_lua_list(STEP_OPEN)}
if not open[status] then return {{'terminal', status}} end
{_SERVER_NOW}
if status == {literal(StepStatus.RUNNING)!r} and tonumber(fields['lease_until'] or '0') > now then
  return {{'busy', fields['fence'] or ''}}
end
local run = redis.call('HGETALL', KEYS[4])
local run_status = ''
for i = 1, #run, 2 do if run[i] == 'status' then run_status = run[i + 1] end end
local final = {_lua_list(RUN_TERMINAL)}
if #run == 0 then return {{'missing', ''}} end
if final[run_status] then return {{'run_final', run_status}} end
local token = tonumber(fields['fence'] or '0') + 1
local expiries = tonumber(fields['lease_expiries'] or '0')
if status == {literal(StepStatus.RUNNING)!r} then expiries = expiries + 1 end
local attempts = tonumber(fields['attempts'] or '0') + 1
local lease_until = string.format('%.6f', now + tonumber(ARGV[1]) / 1000)
redis.call('HSET', KEYS[1], 'status', {literal(StepStatus.RUNNING)!r}, 'started_at', ARGV[2], 'worker', ARGV[3],
           'next_retry_at', 'null', 'fence', token, 'attempts', attempts, 'lease_expiries', expiries,
           'lease_until', lease_until)
redis.call('ZADD', KEYS[3], lease_until, ARGV[4])
return {{'claimed', tostring(token), status, step, run, tostring(attempts), tostring(expiries),
        redis.call('HGETALL', KEYS[2]), lease_until}}
"""

# Renews every lease a worker holds in one round trip: a lease is extended while its token is still the step's and the
# step is still running (a lapsed lease nobody took over is simply extended again). Returns, per lease, 1 (held) or 0
# (lost), followed by the run's status (so a cancelled run stops its running steps).
_RENEW = f"""
local out = {{}}
{_SERVER_NOW}
local n = 0
for i = 1, #ARGV, 3 do
  n = n + 1
  local step, run = KEYS[2 * n - 1], KEYS[2 * n]
  local token, ms, member = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local current = redis.call('HMGET', step, 'fence', 'status')
  local ok = 0
  if current[1] == token and current[2] == {literal(StepStatus.RUNNING)!r} then
    local lease_until = string.format('%.6f', now + tonumber(ms) / 1000)
    redis.call('HSET', step, 'lease_until', lease_until)
    redis.call('ZADD', KEYS[#KEYS], lease_until, member)
    ok = 1
  end
  out[#out + 1] = ok
  out[#out + 1] = redis.call('HGET', run, 'status') or ''
end
return out
"""

# Guards on the same hash are read with one HMGET; then the conditions are evaluated (before any write) and every
# write runs -- a conditional write only when its condition held. All or nothing. Returns 'ok' and, per condition,
# 1 (held) or 0.
_TX = """
local function check(op, v, expected)
  if op == 'eq' then return v == expected
  elseif op == 'ne' then return v ~= expected
  elseif op == 'in' then
    for _, x in ipairs(expected) do if v == x then return true end end
    return false
  elseif op == 'nin' then
    for _, x in ipairs(expected) do if v == x then return false end end
    return true
  elseif op == 'exists' then return v ~= nil
  elseif op == 'absent' then return v == nil
  end
  return false
end
local spec = cjson.decode(ARGV[1])
local wanted = {}
local order = {}
for _, g in ipairs(spec.g) do
  if g.f then
    if not wanted[g.k] then wanted[g.k] = {}; order[#order + 1] = g.k end
    table.insert(wanted[g.k], g.f)
  end
end
-- An unconditional HINCRBY of a hash the guards read anyway, which the transaction also sets with an unconditional
-- HSET, is folded into that HSET (one command fewer): its current value comes with the guards' HMGET. Only when no
-- other write of the transaction touches that field of that hash, so the order of the writes cannot matter.
local folded = {}
for i, o in ipairs(spec.o) do
  if o.c == 'HINCRBY' and not o.w and wanted[o.k] then
    local target, clash = nil, false
    for j, p in ipairs(spec.o) do
      if j ~= i and p.k == o.k then
        if p.c == 'HSET' then
          for x = 1, #p.a, 2 do if p.a[x] == o.a[1] then clash = true end end
          if not p.w and not target then target = p end
        elseif (p.c ~= 'HINCRBY' and p.c ~= 'EXPIRE' and p.c ~= 'PERSIST') or p.a[1] == o.a[1] then
          clash = true
        end
      end
    end
    if target and not clash then
      folded[i] = target
      table.insert(wanted[o.k], o.a[1])
    end
  end
end
local found = {}
for _, k in ipairs(order) do
  local values = redis.call('HMGET', KEYS[k], unpack(wanted[k]))
  for j, f in ipairs(wanted[k]) do found[k .. '|' .. f] = values[j] end
end
for i, g in ipairs(spec.g) do
  local v
  if g.f then v = found[g.k .. '|' .. g.f] else v = redis.call('GET', KEYS[g.k]) end
  if v == false then v = nil end
  if not check(g.op, v, g.v) then return {'rejected', g.n, v or ''} end
end
local held = {}
for i, c in ipairs(spec.c) do
  held[i] = true
  for _, g in ipairs(c) do
    local v = redis.call('HGET', KEYS[g.k], g.f)
    if v == false then v = nil end
    if not check(g.op, v, g.v) then held[i] = false end
  end
end
for i, target in pairs(folded) do
  local inc = spec.o[i]
  local current = found[inc.k .. '|' .. inc.a[1]] or '0'
  table.insert(target.a, inc.a[1])
  table.insert(target.a, string.format('%d', tonumber(current) + tonumber(inc.a[2])))
end
for i, o in ipairs(spec.o) do
  if not folded[i] and ((not o.w) or held[o.w]) then redis.call(o.c, KEYS[o.k], unpack(o.a)) end
end
local out = {'ok'}
for i = 1, #held do out[#out + 1] = held[i] and 1 or 0 end
return out
"""


def encode_fields(values: Mapping[str, Any]) -> list[str]:
    """Flatten ``{field: value}`` into ``[field, json(value), ...]`` for HSET."""
    out: list[str] = []
    for key, value in values.items():
        out += [key, literal(value)]
    return out


# what json.loads runs for one value, without its checks around it (typeshed types the C scanner's argument as itself)
_SCAN: Callable[[str, int], tuple[Any, int]] = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def decode_fields(raw: Mapping[str, str] | list[str]) -> dict[str, Any]:
    """Decode a hash whose values are JSON (a mapping, or the flat ``[field, value, ...]`` list Lua returns); a
    value that is not JSON (none that teamster writes) is kept as the string it is.

    Each value is read by the JSON decoder's scanner directly, which gives what ``json.loads`` gives for a value that
    is exactly one JSON document (in about a quarter of the time: a claim decodes dozens of fields); anything else
    (surrounding spaces, trailing text, not JSON) goes through ``json.loads`` as before."""
    items = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    out: dict[str, Any] = {}
    for key, value in items:
        try:
            decoded, end = _SCAN(value, 0)
            if end == len(value):
                out[key] = decoded
                continue
        except (StopIteration, ValueError, TypeError):
            pass
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


class _GuardFailed(Exception):
    """A guard of a :class:`Tx` did not hold; nothing was written.

    Attributes:
        guard: Name of the failing guard.
        actual: The value found (JSON text, or ``""`` when absent).
    """

    def __init__(self, guard: str, actual: str) -> None:
        super().__init__(f"guard {guard!r} failed (found {actual or 'nothing'})")
        self.guard = guard
        self.actual = actual


class TxRejected(_GuardFailed):
    """A guard of a :class:`Tx` other than ``state_version`` did not hold; nothing was written.

    Not raised for a state-version conflict (:class:`VersionConflict`, a sibling): inside
    :meth:`RunStore.optimistic` that one passes through ``except TxRejected`` to the retry loop.
    """


class VersionConflict(_GuardFailed):
    """The ``state_version`` guard did not hold -- the run's state version moved since the transaction was planned:
    plan it again (:meth:`RunStore.optimistic`). Nothing was written. Not a :class:`TxRejected`."""


class Tx:
    """A guarded multi-key write, applied atomically by one Lua script (see :meth:`RunStore.apply`).

    Args:
        marker: ``(hash key, field)`` the transaction stamps with a unique id: when Redis fails after applying
            it but before answering, the retried apply finds its own stamp and knows it was applied. Without one,
            :meth:`RunStore.apply` stamps a short-lived key of its own (``{prefix}:applied:{stamp}``), so every
            transaction is recognised; a marker on a hash the transaction writes anyway saves that key.
    """

    def __init__(self, marker: tuple[str, str] | None = None) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.guards: list[dict[str, Any]] = []
        self.conditions: list[list[dict[str, Any]]] = []
        self.ops: list[dict[str, Any]] = []
        self.marker: tuple[str, str | None] | None = marker
        self.stamp = uuid.uuid4().hex
        if marker is not None:
            self.hset(marker[0], {marker[1]: self.stamp})

    def _k(self, key: str) -> int:
        if key not in self._index:
            self.keys.append(key)
            self._index[key] = len(self.keys)
        return self._index[key]

    def require(self, name: str, key: str, field: str | None, op: str, value: Any = None) -> Tx:
        """Guard: the hash field (or string when ``field`` is None) must satisfy ``op`` against ``value``.

        ``op`` is ``eq``, ``ne``, ``in``, ``nin`` (value: list), ``exists`` or ``absent``. Values are compared
        in their stored JSON form; pass Python values (enums included). A guard named ``state_version`` that
        fails raises :class:`VersionConflict`; any other raises :class:`TxRejected`.
        """
        guard: dict[str, Any] = {"n": name, **self._check(key, field, op, value)}
        self.guards.append(guard)
        return self

    def _check(self, key: str, field: str | None, op: str, value: Any) -> dict[str, Any]:
        check: dict[str, Any] = {"k": self._k(key), "op": op}
        if field is not None:
            check["f"] = field
        if op in ("in", "nin"):
            check["v"] = [literal(v) for v in value]
        elif op in ("eq", "ne"):
            check["v"] = literal(value) if field is not None else str(value)
        return check

    def condition(self, *checks: tuple[str, str, str, Any]) -> int:
        """A condition for writes that apply only when it holds, instead of rejecting the whole transaction:
        ``(hash key, field, op, value)`` checks (ops as in :meth:`require`), all of which must hold. It is evaluated
        after the guards and before any write. Returns its number, for ``when=`` of the writes and for the list
        :meth:`RunStore.apply` returns."""
        self.conditions.append([self._check(key, field, op, value) for key, field, op, value in checks])
        return len(self.conditions)

    def _op(self, op: dict[str, Any], when: int | None) -> Tx:
        if when is not None:
            op["w"] = when
        self.ops.append(op)
        return self

    def hset(self, key: str, values: Mapping[str, Any], *, when: int | None = None) -> Tx:
        """HSET with JSON-encoded values (``when``: only if that :meth:`condition` holds). Joins the previous
        write when that is an HSET of the same hash under the same condition (one command instead of two; a field
        set twice keeps its last value, as it would)."""
        if not values:
            return self
        k = self._k(key)
        last = self.ops[-1] if self.ops else None
        if last is not None and last["c"] == "HSET" and last["k"] == k and last.get("w") == when:
            last["a"] += encode_fields(values)
            return self
        return self._op({"c": "HSET", "k": k, "a": encode_fields(values)}, when)

    def call(self, command: str, key: str, *args: Any, when: int | None = None) -> Tx:
        """Any other write command on ``key`` (arguments passed as strings)."""
        return self._op({"c": command, "k": self._k(key), "a": [str(a) for a in args]}, when)

    def xadd(self, key: str, fields: Mapping[str, str], *, when: int | None = None) -> Tx:
        """Append a stream entry."""
        flat: list[str] = ["*"]
        for name, value in fields.items():
            flat += [name, value]
        return self._op({"c": "XADD", "k": self._k(key), "a": flat}, when)


@dataclass(frozen=True)
class Claim:
    """Result of :meth:`RunStore.claim`.

    ``kind`` is ``claimed`` (token set; ``step`` and ``run`` are the records as claimed), ``busy`` (another live
    worker holds the lease), ``terminal`` (the step already ended -- its committed result is final;
    ``step_status`` says how), ``parked`` (a child step waiting for its child run, ``holder``; its run's settling
    queues it again), ``run_final`` (the run ended; ``run_status`` says how) or ``missing``.
    ``previous`` is the step status before the claim: ``running`` means the previous holder died.
    """

    kind: str
    token: int = 0
    previous: StepStatus | None = None
    step: StepRecord | None = None
    run: RunRecord | None = None
    step_status: StepStatus | None = None
    run_status: RunStatus | None = None
    holder: str = ""
    statuses: dict[str, StepStatus] | None = None
    """The run's step index as it was at the claim (``claimed`` only)."""


class RunStore:
    """Typed access to runs, steps and dead-letter entries in Redis.

    Args:
        client: A Redis client created with ``decode_responses=True``.
        keys: Key naming.
        retry_seconds: How long a write keeps retrying through transient Redis errors (connection refused or
            reset, timeouts, an exhausted connection pool) before it gives up with :class:`StoreUnavailable`.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, retry_seconds: float = 30.0) -> None:
        self.client = client
        self.keys = keys
        self.retry_seconds = retry_seconds
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._tx = client.register_script(_TX)

    # ------------------------------------------------------------------ transactions
    def apply(self, tx: Tx, *, retry_seconds: float | None = None) -> list[bool]:
        """Apply ``tx`` atomically, retrying in place through transient Redis errors.

        A retry is safe: the guards make a transaction apply at most once, and a transaction that was applied
        before Redis failed to answer is recognised by its stamp (see :class:`Tx`) instead of failing its own guards.

        Returns:
            Per :meth:`Tx.condition`, whether it held (its writes applied). A transaction recognised by its stamp
            reports every condition as held (what it did is unknown; callers only re-send idempotent messages for a
            held condition).

        Raises:
            VersionConflict: the ``state_version`` guard failed (nothing written; plan again). Not a
                :class:`TxRejected`: inside :meth:`optimistic` it reaches the retry loop past ``except TxRejected``.
            TxRejected: any other guard failed (nothing written).
            StoreUnavailable: Redis stayed unreachable for ``retry_seconds``.
        """
        window = self.retry_seconds if retry_seconds is None else retry_seconds
        if tx.marker is None:  # stamped all the same, in a key that outlives every retry of this apply
            tx.marker = (self.keys.applied(tx.stamp), None)
            tx.call("SET", tx.marker[0], tx.stamp, "EX", int(window) + 60)
        spec = json.dumps({"g": tx.guards or [], "c": tx.conditions or [], "o": tx.ops or []})
        # cjson decodes [] as an empty object; both loops treat it as empty.
        tries = 0

        def once() -> Any:
            nonlocal tries
            tries += 1
            return self._tx(keys=tx.keys, args=[spec])

        result = retrying(once, window, "store write")
        if result[0] == "ok":
            return [bool(int(flag)) for flag in result[1:]]
        if tries > 1 and self._stamped(tx):
            return [True] * len(tx.conditions)  # an earlier try was applied; Redis failed before it could say so
        guard, actual = str(result[1]), str(result[2])
        if guard == "state_version":
            raise VersionConflict(guard, actual)
        raise TxRejected(guard, actual)

    def _stamped(self, tx: Tx) -> bool:
        assert tx.marker is not None
        key, field = tx.marker
        try:
            if field is None:
                return bool(self.client.get(key) == tx.stamp)
            return bool(self.client.hget(key, field) == literal(tx.stamp))
        except redis.RedisError:
            return False

    def optimistic(self, what: str, attempt: Callable[[], T], *,
                   gives_up: Callable[[str], TeamsterError] | None = None) -> T:
        """Run ``attempt`` (read, plan, apply a transaction guarded by the state version) until it does not
        meet a :class:`VersionConflict` -- the single optimistic-concurrency loop of teamster.

        Raises:
            StoreUnavailable: (or what ``gives_up`` builds) after :data:`MAX_CAS` conflicts in a row.
        """
        for _ in range(MAX_CAS):
            try:
                return attempt()
            except VersionConflict:
                continue
        message = f"could not {what}: the run's state kept changing ({MAX_CAS} tries)"
        raise gives_up(message) if gives_up is not None else StoreUnavailable(message)

    # ------------------------------------------------------------------ data-loss detection
    def ensure_epoch(self) -> float:
        """Mark this Redis as holding teamster's data (once); returns when the mark was made."""
        self.client.set(self.keys.epoch, literal({"created_at": now()}), nx=True)
        return self.epoch() or now()

    def epoch(self) -> float | None:
        """When teamster's data in this Redis begins (None: no mark -- nothing was ever written, or it was lost)."""
        raw = self.client.get(self.keys.epoch)
        if not raw:
            return None
        try:
            return float(json.loads(raw)["created_at"])  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            return None

    def durability_problems(self) -> list[str]:
        """What in Redis's configuration can lose runs: no persistence, or an eviction policy (empty: none).

        Raises:
            redis.RedisError: Redis cannot be reached (CONFIG refused is reported as a problem instead).
        """
        try:
            config = self.client.config_get("appendonly")
            config.update(self.client.config_get("save"))
            config.update(self.client.config_get("maxmemory-policy"))
        except redis.ResponseError as exc:
            return [f"cannot read Redis's configuration ({exc}); make sure AOF (appendonly yes) is on and "
                    "maxmemory-policy is noeviction"]
        problems = []
        if config.get("appendonly") != "yes":
            snapshots = f"only RDB snapshots ({config.get('save')})" if config.get("save") else "no RDB snapshots"
            problems.append(f"Redis has AOF off (appendonly no, {snapshots}): a restart can lose acknowledged "
                            "commits and queued steps -- set appendonly yes")
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            problems.append(f"Redis evicts keys under memory pressure (maxmemory-policy "
                            f"{config.get('maxmemory-policy')}): it may drop run state and queued steps -- set "
                            "maxmemory-policy noeviction")
        return problems

    # ------------------------------------------------------------------ runs
    def get_run(self, run_id: str) -> RunRecord:
        """The run record.

        Raises:
            RunNotFound: no such run (or it expired).
        """
        raw = self.client.hgetall(self.keys.run(run_id))
        if not raw:
            raise RunNotFound(f"no run {run_id!r}")
        return RunRecord.model_validate(decode_fields(raw))  # type: ignore[arg-type]

    def run_status(self, run_id: str) -> RunStatus | None:
        """The run's status, or None when the run does not exist."""
        raw = self.client.hget(self.keys.run(run_id), "status")
        return RunStatus(json.loads(raw)) if raw else None  # type: ignore[arg-type]

    def list_runs(self, *, limit: int = 50, status: Iterable[str] | None = None,
                  workflow: str | None = None) -> list[RunRecord]:
        """Newest runs first, optionally filtered."""
        wanted = set(status) if status else None
        out: list[RunRecord] = []
        start = 0
        page = max(limit * 2, 100)
        while len(out) < limit:
            ids = self.client.zrevrange(self.keys.runs, start, start + page - 1)
            if not ids:
                break
            start += page
            pipe = self.client.pipeline(transaction=False)
            for run_id in ids:  # type: ignore[union-attr]
                pipe.hgetall(self.keys.run(run_id))
            for raw in pipe.execute():
                if not raw:
                    continue
                rec = RunRecord.model_validate(decode_fields(raw))
                if wanted and rec.status.value not in wanted:
                    continue
                if workflow and rec.workflow != workflow:
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def run_statuses(self, run_ids: Iterable[str]) -> dict[str, RunStatus | None]:
        """Statuses of several runs in one round trip (None: no such run)."""
        ids = list(run_ids)
        pipe = self.client.pipeline(transaction=False)
        for run_id in ids:
            pipe.hget(self.keys.run(run_id), "status")
        return {run_id: RunStatus(json.loads(raw)) if raw else None for run_id, raw in zip(ids, pipe.execute(),
                                                                                            strict=True)}

    # ------------------------------------------------------------------ steps
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None:
        """One step record, or None."""
        raw = self.client.hgetall(self.keys.step(run_id, step_key))
        return StepRecord.model_validate(decode_fields(raw)) if raw else None  # type: ignore[arg-type]

    def step_statuses(self, run_id: str) -> dict[str, StepStatus]:
        """Status of every step record of the run (from the run's step index)."""
        raw = self.client.hgetall(self.keys.steps(run_id))
        return {k: StepStatus(json.loads(v)) for k, v in raw.items()}  # type: ignore[union-attr]

    def steps(self, run_id: str) -> list[StepRecord]:
        """Every step record of the run, in queue order."""
        keys = list(self.step_statuses(run_id))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.keys.step(run_id, key))
        records = [StepRecord.model_validate(decode_fields(raw)) for raw in pipe.execute() if raw]
        return sorted(records, key=lambda s: (s.queued_at, s.step_key))

    def run_spend(self, run_id: str) -> dict[str, float]:
        """What the run spent so far: model_calls, tokens, cost (zeros when nothing yet). Kept in the run's own hash
        (``spend_calls``, ``spend_tokens``, ``spend_cost``), where the provider gate counts live calls and a step's end
        the calls no gate saw."""
        calls, tokens, cost = self.client.hmget(self.keys.run(run_id), ["spend_calls", "spend_tokens", "spend_cost"])  # type: ignore[misc]
        return {"model_calls": int(calls or 0), "tokens": int(tokens or 0), "cost": float(cost or 0.0)}

    # ------------------------------------------------------------------ leases
    def claim(self, run_id: str, step_key: str, worker: str, lease_seconds: float) -> Claim:
        """Take the step's lease with a new fencing token (see :class:`Claim`)."""
        t = now()
        result = self._claim(
            keys=[self.keys.step(run_id, step_key), self.keys.steps(run_id), self.keys.inflight,
                  self.keys.run(run_id)],
            args=[int(lease_seconds * 1000), literal(t), literal(worker), Keys.member(run_id, step_key)],
        )
        kind = str(result[0])
        if kind == "claimed":
            step = decode_fields(result[3])
            step.update(status=StepStatus.RUNNING, started_at=t, worker=worker, next_retry_at=None,
                        fence=int(result[1]), attempts=int(result[5]), lease_expiries=int(result[6]),
                        lease_until=float(result[8]))
            index = result[7]
            statuses = {k: StepStatus(json.loads(v)) for k, v in zip(index[::2], index[1::2], strict=True)}
            return Claim("claimed", int(result[1]), StepStatus(json.loads(result[2])),
                         step=StepRecord.model_validate(step), run=RunRecord.model_validate(decode_fields(result[4])),
                         statuses=statuses)
        if kind == "terminal":
            return Claim(kind, step_status=StepStatus(json.loads(result[1])))
        if kind == "run_final":
            return Claim(kind, run_status=RunStatus(json.loads(result[1])))
        if kind == "parked":
            return Claim(kind, step_status=StepStatus.PARKED, holder=str(json.loads(result[1])) if result[1] else "")
        return Claim(kind, holder=str(result[1]))

    def renew(self, leases: list[tuple[str, str, int]], lease_seconds: float) -> list[tuple[bool, RunStatus | None]]:
        """Extend the leases ``(run_id, step_key, token)`` still held by their tokens, in one round trip.

        Returns:
            Per lease: whether it is still held (its token is the step's and the step runs), and its run's status.
        """
        if not leases:
            return []
        keys: list[str] = []
        args: list[Any] = []
        for run_id, step_key, token in leases:
            keys += [self.keys.step(run_id, step_key), self.keys.run(run_id)]
            args += [str(token), int(lease_seconds * 1000), Keys.member(run_id, step_key)]
        keys.append(self.keys.inflight)
        flat = self._renew(keys=keys, args=args)
        return [(bool(held), RunStatus(json.loads(status)) if status else None)
                for held, status in zip(flat[::2], flat[1::2], strict=True)]

    def _lease(self, run_id: str, step_key: str) -> tuple[int | None, float]:
        """The token holding the step's lease (None: nobody -- not running, or its lease ran out) and the seconds
        left on it, by Redis's clock."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.step(run_id, step_key), ["status", "fence", "lease_until"])
        pipe.time()
        (status, fence, until), (seconds, micros) = pipe.execute()
        if status != literal(StepStatus.RUNNING) or not until:
            return None, 0.0
        left = float(until) - (int(seconds) + int(micros) / 1e6)
        return (int(fence) if fence and left > 0 else None), max(0.0, left)

    def lease_holder(self, run_id: str, step_key: str) -> int | None:
        """The fencing token holding the lease, if any."""
        return self._lease(run_id, step_key)[0]

    def lease_remaining(self, run_id: str, step_key: str) -> float:
        """Seconds left on the step's lease (0 when it lapsed or the step is not running)."""
        return self._lease(run_id, step_key)[1]

    # ------------------------------------------------------------------ dead-letter entries
    def get_entry(self, entry_id: str) -> DeadLetterEntry | None:
        """One dead-letter entry, or None."""
        raw = self.client.hgetall(self.keys.dlq_entry(entry_id))
        return DeadLetterEntry.model_validate(decode_fields(raw)) if raw else None  # type: ignore[arg-type]

    def open_entries(self, run_id: str, exclude: str | None = None) -> list[str]:
        """Open dead-letter entry ids of a run."""
        ids = [i for i in self.client.smembers(self.keys.run_dlq(run_id)) if i != exclude]  # type: ignore[union-attr]
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hget(self.keys.dlq_entry(entry_id), "status")
        return [i for i, status in zip(ids, pipe.execute(), strict=True)
                if status and DeadLetterStatus(json.loads(status)) == DeadLetterStatus.OPEN]

    # ------------------------------------------------------------------ retention
    def run_keys(self, run_id: str) -> list[str]:
        """Every key of one run (its steps read from the run's step index; see :meth:`Keys.run_keys`)."""
        return self.keys.run_keys(run_id, self.client.hkeys(self.keys.steps(run_id)))

    def expire_run(self, run_id: str, ttl_seconds: int) -> None:
        """Let a finished run (and its journal) expire after ``ttl_seconds``."""
        pipe = self.client.pipeline(transaction=False)
        for key in self.run_keys(run_id):
            pipe.expire(key, ttl_seconds)
        pipe.execute()

    def persist_run(self, run_id: str) -> None:
        """Remove any expiry from a run's keys (it has an unresolved dead-letter entry)."""
        pipe = self.client.pipeline(transaction=False)
        for key in self.run_keys(run_id):
            pipe.persist(key)
        pipe.execute()
