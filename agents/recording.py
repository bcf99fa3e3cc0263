"""Record every model exchange, and serve recorded responses instead of calling the model.

:class:`RecordingModel` wraps any strands ``Model``. For each call it reports a :class:`ModelExchange`
(request digest, response content, stop reason, token usage, latency) to a callback -- the journal. Given
``recorded`` responses it first plays those back, in order, without calling the wrapped model: this is how
``replay`` re-executes a run offline (invariant I7) and how a step recovered from a dead worker reuses the
model answers it already paid for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from strands.models.model import Model
from strands.types.content import Messages
from strands.types.streaming import StreamEvent
from strands.types.tools import ToolSpec

from teamster.agents.classify import classify_exception
from teamster.agents.limits import ModelGate
from teamster.errors import StepCancelled, error_from_code

__all__ = ["ModelExchange", "RecordingModel", "ReplayExhausted", "request_digest"]

T = TypeVar("T", bound=BaseModel)


class ModelExchange(BaseModel):
    """One model call as the journal records it."""

    call_index: int
    request_digest: str
    request: dict[str, Any] = Field(default_factory=dict)
    content: list[dict[str, Any]] = Field(default_factory=list)
    stop_reason: str | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    latency_ms: int = 0
    error: str | None = None
    error_info: dict[str, Any] | None = None
    replayed: bool = False


def _error_info(exc: BaseException) -> dict[str, Any]:
    typed = classify_exception(exc)
    return {"error_type": typed.code, "message": typed.message, "details": typed.details}


class ReplayExhausted(RuntimeError):
    """Replay needed a model response that was never recorded (the run took another path)."""


def _request_body(messages: Messages, tool_specs: Sequence[ToolSpec] | None, system_prompt: str | None) -> str:
    return json.dumps({"m": messages, "t": sorted(s["name"] for s in tool_specs or []), "s": system_prompt},
                      sort_keys=True, default=str)


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def request_digest(messages: Messages, tool_specs: Sequence[ToolSpec] | None, system_prompt: str | None) -> str:
    """A short digest of what was sent to the model (detects changed prompts, inputs or tools on replay)."""
    return _digest(_request_body(messages, tool_specs, system_prompt))


def _events_from(exchange: ModelExchange) -> list[StreamEvent]:
    events: list[StreamEvent] = [{"messageStart": {"role": "assistant"}}]
    for block in exchange.content:
        if "toolUse" in block:
            use = block["toolUse"]
            events.append({"contentBlockStart": {"start": {"toolUse": {"name": use["name"],
                                                                      "toolUseId": use["toolUseId"]}}}})
            raw = use["input"] if isinstance(use["input"], str) else json.dumps(use["input"])
            events.append({"contentBlockDelta": {"delta": {"toolUse": {"input": raw}}}})
        elif "reasoningContent" in block:
            continue
        else:
            events.append({"contentBlockStart": {"start": {}}})
            events.append({"contentBlockDelta": {"delta": {"text": str(block.get("text", ""))}}})
        events.append({"contentBlockStop": {}})
    events.append({"messageStop": {"stopReason": exchange.stop_reason or "end_turn"}})  # type: ignore[typeddict-item]
    usage = {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}
    usage.update(exchange.usage)
    events.append({"metadata": {"usage": usage, "metrics": {"latencyMs": 0}}})  # type: ignore[typeddict-item]
    return events


class _Accumulator:
    """Rebuilds content blocks, stop reason and usage from a provider's stream events."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.usage: dict[str, int] = {}

    def feed(self, event: StreamEvent) -> None:
        if "contentBlockStart" in event:
            start = event["contentBlockStart"].get("start") or {}
            use = start.get("toolUse")
            if use is not None:
                self.current = {"toolUse": {"name": use["name"], "toolUseId": use["toolUseId"], "input": ""}}
            else:
                self.current = {"text": ""}
        elif "contentBlockDelta" in event:
            delta = event["contentBlockDelta"]["delta"]
            if self.current is None:
                self.current = {"toolUse": {"name": "", "toolUseId": "", "input": ""}} if "toolUse" in delta \
                    else {"text": ""}
            if "toolUse" in delta and "toolUse" in self.current:
                self.current["toolUse"]["input"] += delta["toolUse"].get("input", "")
            elif "text" in delta:
                self.current.setdefault("text", "")
                self.current["text"] += delta["text"]
        elif "contentBlockStop" in event:
            if self.current is not None:
                self.content.append(self.current)
            self.current = None
        elif "messageStop" in event:
            if self.current is not None:  # providers that omit contentBlockStop
                self.content.append(self.current)
                self.current = None
            self.stop_reason = str(event["messageStop"].get("stopReason"))
        elif "metadata" in event:
            usage = event["metadata"].get("usage", {})
            self.usage = {k: int(v) for k, v in usage.items() if isinstance(v, int)}


class RecordingModel(Model):
    """Wrap ``inner``: report every exchange to ``on_exchange``; serve ``recorded`` responses first.

    Args:
        inner: The real model (None for a pure replay: running out of recorded responses raises
            :class:`ReplayExhausted`).
        on_exchange: Called after each call with its :class:`ModelExchange`.
        recorded: Responses to play back, in call order, before calling ``inner``.
        gate: Asked before, and told after, every live call (provider limits, run budget); recorded responses
            pass without it.
        model_ref: The provider string the gate knows the model by (``openai:gpt-4o``).
        reserve_tokens: Room for the answer, added to a request's estimated tokens (about 4 characters per token of
            the request's text) when the gate reserves them from the provider's tokens per minute.
    """

    def __init__(self, inner: Model | None, on_exchange: Callable[[ModelExchange], None] | None = None,
                 recorded: Sequence[ModelExchange] = (), *, gate: ModelGate | None = None, model_ref: str = "",
                 reserve_tokens: int = 0) -> None:
        self.gate = gate
        self.model_ref = model_ref
        self.reserve_tokens = reserve_tokens
        self.inner = inner
        self.on_exchange = on_exchange
        self.recorded = list(recorded)
        self.calls = 0
        self.live_calls = 0
        self._lock = threading.Lock()
        self._supports_structured_output = bool(getattr(inner, "_supports_structured_output", False))

    @property
    def stateful(self) -> bool:
        return bool(self.inner.stateful) if self.inner is not None else False

    def update_config(self, **model_config: Any) -> None:
        if self.inner is not None:
            self.inner.update_config(**model_config)

    def get_config(self) -> Any:
        return self.inner.get_config() if self.inner is not None else {"model_id": "replay"}

    def structured_output(self, output_model: type[T], prompt: Messages, system_prompt: str | None = None,
                          **kwargs: Any) -> AsyncGenerator[dict[str, T | Any], None]:
        if self.inner is None:
            raise ReplayExhausted("direct structured_output calls are not recorded")
        return self.inner.structured_output(output_model, prompt, system_prompt, **kwargs)

    async def count_tokens(self, messages: Messages, tool_specs: list[ToolSpec] | None = None,
                           system_prompt: str | None = None, system_prompt_content: Any = None) -> int:
        """A cheap estimate (about 4 characters per token of the messages' text).

        strands asks before every model call, for context management; teamster's agents manage no context (their
        conversation manager is ``NullConversationManager``) and the gate estimates from the request it serialises
        anyway, so strands' own estimate -- which serialises the messages and tool specs again -- was spent for
        nothing on every call."""
        chars = len(system_prompt or "")
        for message in messages:
            for block in message.get("content", []):
                chars += len(block.get("text") or "") if isinstance(block, dict) else 0
        return chars // 4

    async def stream(self, messages: Messages, tool_specs: list[ToolSpec] | None = None,
                     system_prompt: str | None = None, **kwargs: Any) -> AsyncIterator[StreamEvent]:
        with self._lock:
            index = self.calls
            self.calls += 1
        body = _request_body(messages, tool_specs, system_prompt)  # serialised once: digest and token estimate
        digest = _digest(body)
        request = {"messages": len(messages), "tools": sorted(s["name"] for s in tool_specs or []),
                   "last_message": messages[-1] if messages else None}
        if index < len(self.recorded):
            recorded = self.recorded[index]
            replayed = recorded.model_copy(update={"call_index": index, "request_digest": digest,
                                                   "request": request, "replayed": True, "latency_ms": 0})
            if recorded.error is not None:  # the recorded call failed: fail again, the same typed way
                self._report(replayed)
                info = recorded.error_info or {"error_type": "unexpected_error", "message": recorded.error}
                raise error_from_code(str(info["error_type"]), str(info["message"]), **info.get("details", {}))
            for event in _events_from(recorded):
                yield event
            self._report(replayed)
            return
        if self.inner is None:
            raise ReplayExhausted(f"replay needs model call {index + 1} but only {len(self.recorded)} were recorded")
        permit = None
        if self.gate is not None:  # may wait for capacity, or refuse (the run's budget is spent)
            permit = await self.gate.acquire(self.model_ref, len(body) // 4 + self.reserve_tokens)
        self.live_calls += 1
        acc = _Accumulator()
        started = time.monotonic()
        try:
            async for event in self.inner.stream(messages, tool_specs, system_prompt, **kwargs):
                acc.feed(event)
                yield event
        except Exception as exc:
            self._report(ModelExchange(call_index=index, request_digest=digest, request=request,
                                       content=acc.content, latency_ms=int((time.monotonic() - started) * 1000),
                                       error=f"{type(exc).__name__}: {exc}", error_info=_error_info(exc)))
            if permit is not None and self.gate is not None:
                await self.gate.release(permit, acc.usage, classify_exception(exc))
            raise
        except BaseException:  # cancelled (deadline, lease lost, run cancelled): give the capacity back all the same
            if permit is not None and self.gate is not None:
                # teamster stopped the call, the provider did not fail it: no evidence for the circuit breaker
                await asyncio.shield(self.gate.release(permit, acc.usage, StepCancelled("the call was cancelled")))
            raise
        if permit is not None and self.gate is not None:
            await self.gate.release(permit, acc.usage, None)
        self._report(ModelExchange(call_index=index, request_digest=digest, request=request, content=acc.content,
                                   stop_reason=acc.stop_reason, usage=acc.usage,
                                   latency_ms=int((time.monotonic() - started) * 1000)))

    def _report(self, exchange: ModelExchange) -> None:
        if self.on_exchange is not None:
            self.on_exchange(exchange)
