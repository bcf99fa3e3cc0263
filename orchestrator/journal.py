"""The append-only journal of a run (a Redis Stream per run), with redaction and bounded payloads.

One event per decision: step start, model request/response (tokens, latency), tool call and result,
validation, criterion, retry, outcome, commit (or rejected commit), escalation, operator action. Every
payload passes the redaction hooks first, then is bounded (``TEAMSTER_JOURNAL_PAYLOAD_CAP``; model responses
kept for replay have their own, larger cap); a cut payload is replaced by a preview marked ``_truncated``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from teamster.agents.delegation import DelegationMemory
from teamster.agents.recording import ModelExchange
from teamster.orchestrator.connection import aretrying, retrying
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import JournalEvent, now

__all__ = ["Journal", "Redactor", "RedactingFilter", "register_redactor", "bound_payload", "REDACTED"]

REDACTED = "[REDACTED]"

_DEFAULT_PATTERNS = (
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"(?i)(?<=aws_secret_access_key[\"'=:\s])\s*[A-Za-z0-9/+=]{40}",
    r"(?i)bearer\s+[A-Za-z0-9._~+/=-]{8,}",
    r"\bsk-[A-Za-z0-9_-]{16,}",  # OpenAI / Anthropic style keys
    r"\bxox[abpr]-[A-Za-z0-9-]{10,}",  # Slack tokens
)
_SECRET_KEYS = re.compile(r"(?i)^(password|passwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|"
                          r"authorization|aws_secret_access_key|private[_-]?key)$")

_HOOKS: list[Callable[[Any], Any]] = []
_HOOK_LOCK = threading.Lock()


def register_redactor(hook: Callable[[Any], Any]) -> None:
    """Add a redaction hook: called with every payload (dict) before it is journaled; returns the payload."""
    with _HOOK_LOCK:
        _HOOKS.append(hook)


class Redactor:
    """Replaces secrets in strings (built-in patterns + ``TEAMSTER_REDACT_PATTERNS``) and secret-named keys."""

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self.patterns = [re.compile(p) for p in (*_DEFAULT_PATTERNS, *extra_patterns)]
        # one pass per string: every pattern in one alternation (each keeps its own inline flags)
        self._combined = re.compile("|".join(f"(?:{p.pattern})" if not p.pattern.startswith("(?i)") else
                                             f"(?i:{p.pattern[4:]})" for p in self.patterns))

    def __call__(self, value: Any) -> Any:
        value = self._walk(value)
        for hook in list(_HOOKS):
            value = hook(value)
        return value

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._combined.sub(REDACTED, value) if value else value
        if isinstance(value, dict):
            return {k: (REDACTED if isinstance(k, str) and _SECRET_KEYS.match(k) and v else self._walk(v))
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._walk(v) for v in value]
        return value


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message through a :class:`Redactor` (worker logs)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logged as it is
            return True
        redacted = self.redactor(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def bound_payload(data: dict[str, Any], cap: int) -> tuple[str, bool]:
    """Serialise ``data`` as JSON of at most about ``cap`` bytes; returns (json, truncated)."""
    text = json.dumps(data, default=str, separators=(",", ":"))
    if len(text.encode()) <= cap:
        return text, False
    preview = text.encode()[: max(0, cap - 200)].decode(errors="ignore")
    marker = {"_truncated": True, "_original_bytes": len(text.encode()), "preview": preview}
    return json.dumps(marker, separators=(",", ":")), True


class Journal:
    """Append-only per-run event log on Redis Streams.

    Args:
        client: Redis client (``decode_responses=True``).
        keys: Key naming for this deployment.
        payload_cap: Largest journaled payload (bytes).
        model_response_cap: Largest recorded model exchange (bytes) -- kept whole for replay when it fits.
        redact_patterns: Extra regular expressions to redact.
        retry_seconds: How long :meth:`append` retries through transient Redis errors (the runtime passes
            ``TEAMSTER_STORE_RETRY_SECONDS``, as for store writes).
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, payload_cap: int = 16 * 1024,
                 model_response_cap: int = 256 * 1024, redact_patterns: Iterable[str] = (),
                 retry_seconds: float = 10.0) -> None:
        self.client = client
        self.retry_seconds = retry_seconds
        self.keys = keys
        self.payload_cap = payload_cap
        self.model_response_cap = model_response_cap
        self.redact = Redactor(redact_patterns)

    def fields(self, event_type: str, *, step: str | None = None, attempt: int | None = None,
               data: dict[str, Any] | None = None) -> dict[str, str]:
        """The stream fields of one event (redacted and bounded), for use inside a transaction.

        An event of a nested step (a delegated call) names it in ``data["_step"]``; it is journaled under that step.
        """
        if data and "_step" in data:
            data = dict(data)
            step = str(data.pop("_step"))
        cap = self.model_response_cap if event_type in ("model_call", "step_start") else self.payload_cap
        payload, truncated = bound_payload(self.redact(data or {}), cap)
        fields = {"type": event_type, "ts": f"{now():.6f}", "data": payload}
        if step is not None:
            fields["step"] = step
        if attempt is not None:
            fields["attempt"] = str(attempt)
        if truncated:
            fields["truncated"] = "1"
        return fields

    def append(self, run_id: str, event_type: str, *, step: str | None = None, attempt: int | None = None,
               data: dict[str, Any] | None = None) -> str:
        """Append one event; returns its stream id. Transient Redis errors are retried like a store write (an
        event appended twice after a lost reply is harmless; a lost one is not).

        Raises:
            StoreUnavailable: Redis stayed unreachable for ``retry_seconds``.
        """
        fields = self.fields(event_type, step=step, attempt=attempt, data=data)
        key = self.keys.journal(run_id)
        return str(retrying(lambda: self.client.xadd(key, fields),  # type: ignore[arg-type]
                            self.retry_seconds, "journal append"))

    def append_many(self, run_id: str, events: Iterable[tuple[str, dict[str, Any]]], *, step: str | None = None,
                    attempt: int | None = None) -> None:
        """Append several ``(event_type, data)`` events of one step in one round trip (in order)."""
        self._xadds(self.client.pipeline(transaction=False), run_id, events, step, attempt).execute()

    async def append_many_async(self, client: aioredis.Redis, run_id: str, events: Sequence[tuple[str, dict[str, Any]]],
                                *, step: str | None = None, attempt: int | None = None) -> None:
        """:meth:`append_many` with an asyncio client, retried through transient Redis errors like :meth:`append`
        (the agent loop journals a running step with it).

        Raises:
            StoreUnavailable: Redis stayed unreachable for ``retry_seconds``.
        """
        await aretrying(lambda: self._xadds(client.pipeline(transaction=False), run_id, events, step,
                                            attempt).execute(), self.retry_seconds, "journal append")

    def _xadds(self, pipe: Any, run_id: str, events: Iterable[tuple[str, dict[str, Any]]], step: str | None,
               attempt: int | None) -> Any:
        key = self.keys.journal(run_id)
        for event_type, data in events:
            pipe.xadd(key, self.fields(event_type, step=step, attempt=attempt, data=data))
        return pipe

    def read(self, run_id: str, *, types: Iterable[str] | None = None, step: str | None = None,
             after: str = "-", count: int | None = None, step_prefix: str | None = None) -> list[JournalEvent]:
        """Events of a run in order, optionally filtered by type, step, or steps whose name starts with
        ``step_prefix`` (filtered before their data is decoded)."""
        wanted = set(types) if types else None
        start = after if after == "-" else f"({after}"
        raw = self.client.xrange(self.keys.journal(run_id), min=start, max="+", count=count)
        events: list[JournalEvent] = []
        for event_id, fields in raw:  # type: ignore[union-attr]
            if wanted is not None and fields.get("type") not in wanted:
                continue
            if step is not None and fields.get("step") != step:
                continue
            if step_prefix is not None and not fields.get("step", "").startswith(step_prefix):
                continue
            events.append(_decode(event_id, fields))
        return events

    def excerpt(self, run_id: str, step: str, limit: int = 25) -> list[dict[str, Any]]:
        """The last ``limit`` events of ``step``, compacted for a dead-letter entry."""
        events = self.read(run_id, step=step)[-limit:]
        out = []
        for event in events:
            data = event.data
            if event.type == "model_call":
                data = {k: data.get(k) for k in ("call_index", "stop_reason", "usage", "latency_ms", "error",
                                                  "replayed")}
            text, _ = bound_payload(data, 2048)
            out.append({"id": event.id, "type": event.type, "attempt": event.attempt, "ts": event.ts,
                        "data": json.loads(text)})
        return out

    def exchanges(self, run_id: str, step: str, attempt: int) -> list[ModelExchange]:
        """The model exchanges recorded for one attempt of a step, in call order, each call once.

        A write retried after its reply was lost (Redis restarted mid-write) appends its events again: an exchange
        whose call index was already read is that duplicate, and is left out, so replay and takeover serve each
        recorded answer to its own call."""
        result = []
        seen: set[Any] = set()
        for event in self.read(run_id, types=("model_call",), step=step):
            if event.attempt != attempt or event.data.get("_truncated"):
                continue
            index = event.data.get("call_index")
            if index in seen:
                continue
            seen.add(index)
            result.append(ModelExchange.model_validate(event.data))
        return result

    def delegations(self, run_id: str, step: str, takeover_attempt: int | None) -> DelegationMemory:
        """What the journal holds about the delegations of ``step`` (see :class:`DelegationMemory`): finished
        ones from any attempt, and -- when ``takeover_attempt`` died mid-step -- the answers its unfinished
        delegations recorded."""
        memory = DelegationMemory()
        nested = self.read(run_id, types=("delegation_result", "model_call", "outcome"), step_prefix=f"{step}/")
        for event in nested:
            key = str(event.data.get("delegation_key") or "")
            if event.type == "delegation_result" and key and event.data.get("reusable", True):
                memory.results[key] = event.data
        if takeover_attempt is None:
            return memory
        ended = {str(e.data.get("delegation_key")) for e in nested if e.type == "outcome"
                 and e.attempt == takeover_attempt}
        calls: dict[str, list[ModelExchange]] = {}
        for event in nested:
            key = str(event.data.get("delegation_key") or "")
            if event.type != "model_call" or event.attempt != takeover_attempt or not key or key in ended \
                    or key in memory.results or event.data.get("_truncated"):
                continue
            calls.setdefault(key, []).append(ModelExchange.model_validate(
                {k: v for k, v in event.data.items() if k != "delegation_key"}))
        for key, exchanges in calls.items():
            if resumable := _leading_run(exchanges):
                memory.exchanges[key] = resumable
        return memory

    def reusable_exchanges(self, run_id: str, step: str, attempt: int) -> list[ModelExchange]:
        """Answers from an attempt that died mid-step (no outcome), usable instead of paying for them again.

        Only the leading run of successful exchanges ``0, 1, 2...`` is returned: a conversation can be resumed
        from its recorded prefix, not from a gap.
        """
        if any(e.attempt == attempt for e in self.read(run_id, types=("outcome",), step=step)):
            return []
        return _leading_run(self.exchanges(run_id, step, attempt))


def _leading_run(exchanges: Iterable[ModelExchange]) -> list[ModelExchange]:
    """The successful exchanges ``0, 1, 2...`` up to the first gap or failure: what a conversation resumes from."""
    run: list[ModelExchange] = []
    for exchange in sorted(exchanges, key=lambda x: x.call_index):
        if exchange.call_index < len(run):  # the same call journaled twice (a write retried after a lost reply)
            continue
        if exchange.error or exchange.call_index != len(run):
            break
        run.append(exchange)
    return run


def _decode(event_id: str, fields: dict[str, str]) -> JournalEvent:
    try:
        data = json.loads(fields.get("data", "{}"))
    except json.JSONDecodeError:
        data = {"_raw": fields.get("data")}
    attempt = fields.get("attempt")
    return JournalEvent(id=event_id, type=fields.get("type", "?"), ts=float(fields.get("ts", 0)),
                        step=fields.get("step"), attempt=int(attempt) if attempt else None, data=data)
