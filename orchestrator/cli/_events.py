"""One-line summaries of journal events (``teamster journal`` and the excerpt of ``teamster dlq show``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from teamster.orchestrator.cli._support import fmt_duration, short_json

__all__ = ["summarize_event"]

_Summary = Callable[[dict[str, Any]], str]


def _usage(data: dict[str, Any]) -> str:
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        return ""
    total = usage.get("totalTokens") or usage.get("total_tokens")
    if total is None and ("inputTokens" in usage or "outputTokens" in usage):
        total = int(usage.get("inputTokens") or 0) + int(usage.get("outputTokens") or 0)
    return f"{total} tokens" if total is not None else ""


def _join(*parts: object) -> str:
    return ", ".join(str(p) for p in parts if p not in (None, "", [], {}))


def _text(value: Any, limit: int = 80) -> str:
    """Free text or a payload, cut at ``limit`` characters (saying so); ids and names are never cut."""
    return short_json(value, limit) if value not in (None, "", [], {}) else ""


def _content(content: Any) -> str:
    if isinstance(content, list):
        texts = [str(c.get("text")) for c in content if isinstance(c, dict) and c.get("text") is not None]
        if texts:
            return short_json(" ".join(texts), 60)
    return short_json(content, 60) if content is not None else ""


def _outcome(data: dict[str, Any]) -> str:
    outcome = data.get("outcome") or {}
    kind = outcome.get("kind", "?")
    detail = outcome.get("output") if kind == "succeeded" else (
        outcome.get("message") or outcome.get("reason") or outcome.get("question") or outcome.get("error_type"))
    return _join(kind, short_json(detail, 70) if detail is not None else "", _usage(data))


def _delegated(result: Any) -> str:
    """What a delegate answered (its output, reason, question or error)."""
    if not isinstance(result, dict):
        return ""
    detail = result.get("output") or result.get("reason") or result.get("question") or result.get("message")
    return short_json(detail, 60) if detail is not None else ""


def _model_call(data: dict[str, Any]) -> str:
    latency = data.get("latency_ms")
    return _join(f"call {int(data.get('call_index', 0)) + 1}", data.get("stop_reason"), _usage(data),
                 f"{latency:.0f}ms" if isinstance(latency, int | float) else "",
                 "replayed" if data.get("replayed") else "",
                 f"error: {short_json(data['error'], 60)}" if data.get("error") else "")


_SUMMARIES: dict[str, _Summary] = {
    "run_created": lambda d: _join(d.get("workflow"), f"key {d['idempotency_key']}" if d.get("idempotency_key") else "",
                                   f"trace {d.get('trace_id')}" if d.get("trace_id") else "",
                                   f"child of {d['parent_run']} step {d.get('parent_step')}"
                                   if d.get("parent_run") else ""),
    "child_started": lambda d: _join(f"child run {d.get('child_run')}", d.get("workflow"),
                                     f"input {short_json(d.get('input'), 50)}" if d.get("input") is not None else ""),
    "child_settled": lambda d: _join(f"child run {d.get('child_run')} {d.get('status')}",
                                     f"entry {d['dlq_entry']}" if d.get("dlq_entry") else "",
                                     f"by {d['by']}" if d.get("by") else "", "step queued again"),
    "step_parked": lambda d: _join(f"child run {d.get('child_run')}", _text(d.get("reason"))),
    "step_queued": lambda d: _join(d.get("kind"), _text(d.get("reason"))),
    "step_start": lambda d: _join(f"worker {d.get('worker')}", f"token {d.get('token')}",
                                  "takeover" if d.get("takeover") else "", d.get("agent"),
                                  f"state v{d.get('state_version')}" if d.get("state_version") is not None else ""),
    "agent_start": lambda d: _join(f"{d.get('agent')} v{d.get('version')}", d.get("model"),
                                   f"{d['recorded_responses']} recorded responses"
                                   if d.get("recorded_responses") else ""),
    "model_call": _model_call,
    "tool_call": lambda d: _join(d.get("tool"), short_json(d.get("input"), 60)),
    "tool_result": lambda d: _join(d.get("tool"), d.get("status"), _content(d.get("content")),
                                   _text(d.get("error"), 60)),
    "delegation_start": lambda d: _join(f"ask {d.get('agent')}", short_json(d.get("input"), 60),
                                        f"{d['reused_responses']} recorded responses"
                                        if d.get("reused_responses") else ""),
    "delegation_result": lambda d: _join(f"{d.get('agent')}: {d.get('status')}", _delegated(d.get("tool_result")),
                                         _usage(d), f"{d.get('live_model_calls')} model calls"
                                         if d.get("live_model_calls") is not None else ""),
    "delegation_reused": lambda d: _join(f"{d.get('agent')}: {d.get('status')}", "from the journal, not asked again"),
    "validation": lambda d: _join(d.get("stage"), "ok" if d.get("ok") else f"failed: {short_json(d.get('error'), 60)}"),
    "criterion": lambda d: _join(d.get("name"), "ok" if d.get("ok") else f"failed: {_text(d.get('message'), 60)}"),
    "outcome": _outcome,
    "retry": lambda d: _join(d.get("error_type"), short_json(d.get("message", ""), 50),
                             f"next attempt {d.get('next_attempt')}/{d.get('max_attempts')} in "
                             f"{fmt_duration(d.get('delay_seconds'))}"),
    "commit": lambda d: _join(f"state v{d.get('state_version')}", f"by {d.get('by')}" if d.get("by") else "",
                              _text(d.get("reason")), f"queued {d['queued']}" if d.get("queued") else ""),
    "step_skipped": lambda d: _join(f"state v{d.get('state_version')}", _text(d.get("reason")),
                                    f"queued {d['queued']}" if d.get("queued") else ""),
    "commit_rejected": lambda d: _join(f"guard {d.get('guard')}", f"found {_text(d.get('found'), 40)}",
                                       f"token {d.get('token')}"),
    "step_cancelled": lambda d: _text(d.get("reason")),
    "run_cancelled": lambda d: _join(f"by {d.get('by')}", _text(d.get("reason")),
                                     f"steps {', '.join(map(str, d['steps_cancelled']))}"
                                     if d.get("steps_cancelled") else "",
                                     f"with its parent run {d['parent_run']}" if d.get("parent_run") else "",
                                     f"child runs {', '.join(map(str, d['children_cancelled']))}"
                                     if d.get("children_cancelled") else ""),
    "tool_abandoned": lambda d: _join(d.get("tool"), _text(d.get("reason"))),
    "run_succeeded": lambda d: short_json(d.get("output"), 80),
    "dead_lettered": lambda d: _join(d.get("error_type"), short_json(d.get("message", ""), 50),
                                     f"entry {d.get('entry_id')}", d.get("escalation")),
    "dlq_retry": lambda d: _join(f"entry {d.get('entry_id')}", f"by {d.get('by')}", _text(d.get("reason")),
                                 f"state patch {short_json(d['state_patch'], 40)}" if d.get("state_patch") else ""),
    "dlq_resolve": lambda d: _join(f"entry {d.get('entry_id')}", f"by {d.get('by')}", _text(d.get("reason")),
                                   short_json(d.get("output"), 50)),
    "dlq_discard": lambda d: _join(f"entry {d.get('entry_id')}", f"by {d.get('by')}", _text(d.get("reason"))),
    "lease_expired": lambda d: _join(f"worker {d.get('worker')}", f"token {d.get('token')}", d.get("action")),
    "requeued": lambda d: _text(d.get("reason")),
}


def summarize_event(event_type: str, data: dict[str, Any], limit: int = 110) -> str:
    """A short human summary of one journal event's data.

    Free text and payloads are cut (marked ``[+N chars]``; ``teamster journal --json`` prints them whole); ids,
    names and numbers never are. An event of another type is summarised as its JSON, cut at ``limit``.
    """
    func = _SUMMARIES.get(event_type)
    if func is None:
        return short_json(data, limit)
    try:
        return func(data)
    except Exception:  # noqa: BLE001 - an unexpected shape still gets a summary
        return short_json(data, limit)
