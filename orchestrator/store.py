"""The run store on Redis: runs, versioned state, step records, leases with fencing tokens.

Writes that must go together go together: every multi-key change is a :class:`Tx` -- guards (compare a
field with an expected value) plus writes -- executed by one Lua script, so it applies entirely or not at
all. A step commit is guarded by the fencing token (a stale token is rejected, invariant I4), by the step
not being terminal yet (committed once, never twice) and by the run's state version (optimistic
concurrency between parallel branches of one run).

All hash fields hold JSON values (a status is stored as ``"running"``, a counter as ``3``), so Lua can
compare and increment them and Python decodes them with one rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from teamster.errors import RunNotFound, StoreUnavailable
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import RunRecord, StepRecord, StepStatus, now

__all__ = ["RunStore", "Tx", "TxRejected", "Claim", "encode_fields", "decode_fields"]

_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder then return {'busy', holder} end
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {'missing', ''} end
if status ~= '"queued"' and status ~= '"retrying"' and status ~= '"running"' then return {'terminal', status} end
local run_status = redis.call('HGET', KEYS[5], 'status')
if run_status == '"cancelled"' or run_status == '"failed"' or run_status == '"succeeded"' then
  return {'run_final', run_status}
end
if status == '"running"' then redis.call('HINCRBY', KEYS[2], 'lease_expiries', 1) end
local token = redis.call('HINCRBY', KEYS[2], 'fence', 1)
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
redis.call('HSET', KEYS[2], 'status', '"running"', 'started_at', ARGV[2], 'worker', ARGV[3], 'next_retry_at', 'null')
redis.call('HSET', KEYS[3], ARGV[6], '"running"')
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
return {'claimed', tostring(token), status}
"""

_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif (not current) and redis.call('HGET', KEYS[3], 'fence') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

_TX = """
local spec = cjson.decode(ARGV[1])
for i, g in ipairs(spec.g) do
  local v
  if g.f then v = redis.call('HGET', KEYS[g.k], g.f) else v = redis.call('GET', KEYS[g.k]) end
  if v == false then v = nil end
  local ok
  if g.op == 'eq' then ok = (v == g.v)
  elseif g.op == 'ne' then ok = (v ~= g.v)
  elseif g.op == 'in' then
    ok = false
    for _, x in ipairs(g.v) do if v == x then ok = true end end
  elseif g.op == 'nin' then
    ok = true
    for _, x in ipairs(g.v) do if v == x then ok = false end end
  elseif g.op == 'exists' then ok = (v ~= nil)
  elseif g.op == 'absent' then ok = (v == nil)
  end
  if not ok then return {'rejected', g.n, v or ''} end
end
for _, o in ipairs(spec.o) do
  redis.call(o.c, KEYS[o.k], unpack(o.a))
end
return {'ok'}
"""


def _enc(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def encode_fields(values: Mapping[str, Any]) -> list[str]:
    """Flatten ``{field: value}`` into ``[field, json(value), ...]`` for HSET."""
    out: list[str] = []
    for key, value in values.items():
        out += [key, _enc(value)]
    return out


def decode_fields(raw: Mapping[str, str]) -> dict[str, Any]:
    """Decode a hash whose values are JSON."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


class TxRejected(Exception):
    """A guard of a :class:`Tx` did not hold; nothing was written.

    Attributes:
        guard: Name of the failing guard.
        actual: The value found (JSON text, or ``""`` when absent).
    """

    def __init__(self, guard: str, actual: str) -> None:
        super().__init__(f"guard {guard!r} failed (found {actual or 'nothing'})")
        self.guard = guard
        self.actual = actual


class Tx:
    """A guarded multi-key write, applied atomically by one Lua script (see :meth:`RunStore.apply`)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.guards: list[dict[str, Any]] = []
        self.ops: list[dict[str, Any]] = []

    def _k(self, key: str) -> int:
        if key not in self._index:
            self.keys.append(key)
            self._index[key] = len(self.keys)
        return self._index[key]

    def require(self, name: str, key: str, field: str | None, op: str, value: Any = None) -> Tx:
        """Guard: the hash field (or string when ``field`` is None) must satisfy ``op`` against ``value``.

        ``op`` is ``eq``, ``ne``, ``in``, ``nin`` (value: list), ``exists`` or ``absent``. Values are compared
        in their stored JSON form; pass raw Python values.
        """
        guard: dict[str, Any] = {"n": name, "k": self._k(key), "op": op}
        if field is not None:
            guard["f"] = field
        if op in ("in", "nin"):
            guard["v"] = [_enc(v) for v in value]
        elif op in ("eq", "ne"):
            guard["v"] = _enc(value) if field is not None else str(value)
        self.guards.append(guard)
        return self

    def hset(self, key: str, values: Mapping[str, Any]) -> Tx:
        """HSET with JSON-encoded values."""
        if values:
            self.ops.append({"c": "HSET", "k": self._k(key), "a": encode_fields(values)})
        return self

    def call(self, command: str, key: str, *args: Any) -> Tx:
        """Any other write command on ``key`` (arguments passed as strings)."""
        self.ops.append({"c": command, "k": self._k(key), "a": [str(a) for a in args]})
        return self

    def xadd(self, key: str, fields: Mapping[str, str]) -> Tx:
        """Append a stream entry."""
        flat: list[str] = ["*"]
        for name, value in fields.items():
            flat += [name, value]
        self.ops.append({"c": "XADD", "k": self._k(key), "a": flat})
        return self


@dataclass(frozen=True)
class Claim:
    """Result of :meth:`RunStore.claim`.

    ``kind`` is ``claimed`` (token set), ``busy`` (another live worker holds the lease), ``terminal`` (the
    step already ended -- its committed result is final), ``run_final`` (the run ended) or ``missing``.
    ``previous`` is the step status before the claim: ``running`` means the previous holder died.
    """

    kind: str
    token: int = 0
    previous: str = ""


class RunStore:
    """Typed access to runs and steps in Redis.

    Args:
        client: A Redis client created with ``decode_responses=True``.
        keys: Key naming.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._tx = client.register_script(_TX)

    # ------------------------------------------------------------------ transactions
    def apply(self, tx: Tx) -> None:
        """Apply ``tx`` atomically.

        Raises:
            TxRejected: a guard failed (nothing written).
            StoreUnavailable: Redis could not be reached.
        """
        spec = json.dumps({"g": tx.guards or [], "o": tx.ops or []})
        # cjson decodes [] as an empty object; both loops treat it as empty.
        try:
            result = self._tx(keys=tx.keys, args=[spec])
        except redis.ConnectionError as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        if result[0] != "ok":
            raise TxRejected(str(result[1]), str(result[2]))

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

    # ------------------------------------------------------------------ leases
    def claim(self, run_id: str, step_key: str, worker: str, lease_seconds: float) -> Claim:
        """Take the step's lease with a new fencing token (see :class:`Claim`)."""
        t = now()
        result = self._claim(
            keys=[self.keys.lease(run_id, step_key), self.keys.step(run_id, step_key), self.keys.steps(run_id),
                  self.keys.inflight, self.keys.run(run_id)],
            args=[int(lease_seconds * 1000), _enc(t), _enc(worker), Keys.member(run_id, step_key),
                  t + lease_seconds, step_key],
        )
        kind = str(result[0])
        if kind == "claimed":
            return Claim("claimed", int(result[1]), json.loads(result[2]))
        return Claim(kind, 0, str(result[1]))

    def renew(self, run_id: str, step_key: str, token: int, lease_seconds: float) -> bool:
        """Extend the lease if ``token`` still holds it (or re-take it if it lapsed and nobody else did)."""
        return bool(self._renew(
            keys=[self.keys.lease(run_id, step_key), self.keys.inflight, self.keys.step(run_id, step_key)],
            args=[str(token), int(lease_seconds * 1000), now() + lease_seconds, Keys.member(run_id, step_key)],
        ))

    def lease_holder(self, run_id: str, step_key: str) -> int | None:
        """The fencing token holding the lease, if any."""
        value = self.client.get(self.keys.lease(run_id, step_key))
        return int(value) if value else None  # type: ignore[arg-type]

    # ------------------------------------------------------------------ retention
    def run_keys(self, run_id: str) -> list[str]:
        """Every key of one run."""
        keys = [self.keys.run(run_id), self.keys.steps(run_id), self.keys.journal(run_id), self.keys.run_dlq(run_id)]
        keys += [self.keys.step(run_id, k) for k in self.client.hkeys(self.keys.steps(run_id))]  # type: ignore[union-attr]
        return keys

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

