"""``ScriptedModel``: an offline, deterministic strands ``Model`` for tests, benchmarks and the demo.

It streams exactly the events a real provider streams (message start, content blocks, tool uses, stop
reason, usage metadata), so everything above it -- strands' event loop, structured output, hooks, teamster's
guard, journal and replay -- runs for real. Each model call plays one scripted :class:`Turn`: text, a tool
call, the final outcome, or a fault (throttling, timeout, invalid JSON, schema-invalid output, refusal,
guardrail, "cannot complete"). Faults can also be injected at set rates by a seeded :class:`FaultPlan`,
decided by a hash of (seed, run, step, attempt, call), so a run replays identically.

Example:
    >>> from agents.scripted import ScriptedModel, call, finish
    >>> model = ScriptedModel([call("lookup_order", order_id="A1"), finish({"status": "shipped"})])
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from strands.models.model import Model
from strands.types.content import Messages
from strands.types.exceptions import ModelThrottledException
from strands.types.streaming import StreamEvent
from strands.types.tools import ToolSpec

from teamster.agents.outcomes import OUTCOME_TOOL_NAME
from teamster.agents.tools import TEAMSTER_STATE_KEY
from teamster.errors import ConfigurationError

__all__ = [
    "Turn",
    "ScriptContext",
    "Script",
    "FaultPlan",
    "ScriptedModel",
    "ScriptExhausted",
    "FAULT_KINDS",
    "say",
    "call",
    "finish",
    "cannot_complete",
    "needs_human",
    "invalid_json",
    "schema_invalid",
    "refuse",
    "throttle",
    "timeout",
    "guardrail",
    "register_script",
    "get_script",
    "sample_output",
    "ScriptedSettings",
    "scripted_settings",
    "set_call_observer",
]

TurnKind = Literal["text", "tool", "outcome", "raw_tool", "throttle", "timeout", "guardrail"]
FAULT_KINDS = ("throttle", "timeout", "invalid_json", "schema_invalid", "refusal", "cannot_complete")

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Turn:
    """One scripted model response. Build turns with the helper functions (:func:`call`, :func:`finish`...)."""

    kind: TurnKind
    text: str = ""
    tool: str = ""
    payload: Any = None
    latency: float = 0.0
    fault: str | None = None

    def after(self, seconds: float) -> Turn:
        """The same turn, answered after ``seconds`` of latency."""
        return Turn(self.kind, self.text, self.tool, self.payload, seconds, self.fault)


def say(text: str) -> Turn:
    """A plain text answer (``end_turn``); strands then asks for the structured outcome."""
    return Turn("text", text=text)


def call(tool: str, /, **tool_input: Any) -> Turn:
    """A tool call with the given input."""
    return Turn("tool", tool=tool, payload=tool_input)


def finish(output: BaseModel | dict[str, Any] | None = None) -> Turn:
    """The final structured outcome ``succeeded`` with ``output`` (None: a sample valid for the schema)."""
    data = output.model_dump(mode="json") if isinstance(output, BaseModel) else output
    return Turn("outcome", payload={"status": "succeeded", "output": data})


def cannot_complete(reason: str) -> Turn:
    """The explicit "I cannot complete this" exit."""
    return Turn("outcome", payload={"status": "cannot_complete", "reason": reason}, fault="cannot_complete")


def needs_human(question: str) -> Turn:
    """The explicit "a person must decide" exit."""
    return Turn("outcome", payload={"status": "needs_human", "question": question})


def invalid_json() -> Turn:
    """A call of the outcome tool whose arguments are not JSON (a real provider failure mode)."""
    return Turn("raw_tool", tool=OUTCOME_TOOL_NAME, payload='{"status": "succeeded", "output": {', fault="invalid_json")


def schema_invalid(payload: dict[str, Any] | None = None) -> Turn:
    """A call of the outcome tool with JSON that does not validate against the schema."""
    bad = payload if payload is not None else {"status": "succeeded", "output": {"unexpected": True}}
    return Turn("outcome", payload=bad, fault="schema_invalid")


def refuse(text: str = REFUSAL_TEXT) -> Turn:
    """A refusal: text only, no structured outcome."""
    return Turn("text", text=text, fault="refusal")


def throttle() -> Turn:
    """The provider throttles this call (raises ``ModelThrottledException``)."""
    return Turn("throttle", fault="throttle")


def timeout() -> Turn:
    """The provider times out on this call (raises ``TimeoutError``)."""
    return Turn("timeout", fault="timeout")


def guardrail() -> Turn:
    """The provider's guardrail intervenes (stop reason ``guardrail_intervened``)."""
    return Turn("guardrail", text="[content blocked by guardrail]", fault="guardrail")


@dataclass(frozen=True)
class ScriptContext:
    """What a script function sees when choosing the next turn.

    Attributes:
        agent: Agent name (from teamster's invocation state, or the model's ``agent`` argument).
        call_index: 0 for the first model call of this step execution, 1 for the next, ...
        attempt: The step's attempt number (1-based); lets a script fail once and then recover.
        run_id: Run id when inside a teamster step.
        step_id: Step id when inside a teamster step.
        prompt: Text of the first user message (the step's input as JSON for teamster agents).
        tool_results: Texts of the tool results so far, in order.
        tool_specs: Names of the tools offered to the model.
    """

    agent: str
    call_index: int
    attempt: int = 1
    run_id: str | None = None
    step_id: str | None = None
    prompt: str = ""
    tool_results: tuple[str, ...] = ()
    tool_specs: tuple[str, ...] = ()

    def input_json(self) -> dict[str, Any]:
        """The step input, parsed from the prompt (teamster sends it as one JSON object)."""
        start = self.prompt.find("{")
        try:
            data = json.loads(self.prompt[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}


Script = Sequence[Turn] | Callable[[ScriptContext], Turn]
"""A list of turns played in order, or a function choosing each turn from the context."""


class ScriptExhausted(RuntimeError):
    """The model was called more times than its script has turns."""


def _unit(*parts: Any) -> float:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class FaultPlan:
    """Fault rates per kind (0..1), decided deterministically per (seed, run, step, attempt, call).

    Args:
        rates: e.g. ``{"throttle": 0.1, "invalid_json": 0.05}``; kinds are :data:`FAULT_KINDS`.
        seed: Changes which calls are hit, not how many on average.
    """

    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ConfigurationError(f"unknown scripted fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        for kind, rate in self.rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ConfigurationError(f"fault rate for {kind!r} must be within 0..1, got {rate}")
        if sum(self.rates.values()) > 1.0:
            raise ConfigurationError(f"fault rates add up to {sum(self.rates.values()):g}; at most 1 fault per call")

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> FaultPlan:
        """Parse ``"throttle=0.1,timeout=0.05"`` (the ``TEAMSTER_SCRIPTED_FAULTS`` format)."""
        rates: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kind, sep, value = part.partition("=")
            try:
                rates[kind.strip()] = float(value) if sep else 1.0
            except ValueError:
                raise ConfigurationError(f"bad fault rate {part!r}: expected kind=0.1") from None
        return cls(rates, seed)

    def pick(self, ctx: ScriptContext) -> Turn | None:
        """The fault turn to play instead of the scripted one, if any.

        One uniform draw per call is compared with the cumulative rates, so each kind is injected at exactly
        its own rate (the kinds are mutually exclusive: at most one fault per call).
        """
        draw = _unit(self.seed, ctx.agent, ctx.run_id, ctx.step_id, ctx.attempt, ctx.call_index)
        threshold = 0.0
        for kind in FAULT_KINDS:
            threshold += self.rates.get(kind, 0.0)
            if draw < threshold:
                return _FAULT_TURNS[kind]()
        return None


_FAULT_TURNS: dict[str, Callable[[], Turn]] = {
    "throttle": throttle,
    "timeout": timeout,
    "invalid_json": invalid_json,
    "schema_invalid": schema_invalid,
    "refusal": refuse,
    "cannot_complete": lambda: cannot_complete("scripted fault: cannot complete"),
}


# --------------------------------------------------------------------------- sample outputs


_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00",
    "duration": "PT1S",
    "email": "sample@example.com",
    "uri": "https://example.com/sample",
    "url": "https://example.com/sample",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}


def _sample_number(schema: dict[str, Any], integer: bool) -> float | int:
    step = float(schema.get("multipleOf", 1 if integer else 0.5))
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if low is not None:
        value = float(low) + (step if "exclusiveMinimum" in schema and "minimum" not in schema else 0.0)
    elif high is not None:
        value = float(high) - (step if "exclusiveMaximum" in schema and "maximum" not in schema else 0.0)
        value = min(value, 0.0)
    else:
        value = 0.0
    if step:
        value = (value // step) * step if value % step == 0 else (value // step + 1) * step
    return int(value) if integer else float(value)


def _sample_string(schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    if fmt in _FORMATS:
        return _FORMATS[fmt]
    low = int(schema.get("minLength", 0))
    high = schema.get("maxLength")
    text = "sample" + "x" * max(0, low - 6)
    if high is not None:
        text = text[: max(low, int(high))]
    return text


def sample_output(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A value valid for a JSON schema: every property filled (optional ones too), enums and consts honoured,
    numeric bounds, string lengths, common formats and array sizes respected (patterns are not)."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return sample_output(defs[schema["$ref"].split("/")[-1]], defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return sample_output(options[0], defs)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: sample_output(sub, defs) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        if "prefixItems" in schema:
            return [sample_output(item, defs) for item in schema["prefixItems"]]
        count = max(1, int(schema.get("minItems", 0)))
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [sample_output(schema.get("items", {}), defs) for _ in range(count)]
    if kind == "string":
        return _sample_string(schema)
    if kind in ("integer", "number"):
        return _sample_number(schema, kind == "integer")
    if kind == "boolean":
        return False
    return None


# --------------------------------------------------------------------------- scripts by agent name


class ScriptedSettings(BaseSettings):
    """How ``TEAMSTER_MODEL=scripted`` behaves in a process (workers of the demo, tests and benchmarks), read from
    ``TEAMSTER_SCRIPTED_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TEAMSTER_SCRIPTED_", extra="ignore")

    faults: str = Field(
        default="",
        description="Fault rates, e.g. 'throttle=0.1,timeout=0.05,invalid_json=0.02' (default none). Kinds: "
        + ", ".join(FAULT_KINDS) + ".")
    latency: float = Field(default=0.0, ge=0, description="Seconds of latency per model call (default 0).")
    seed: int = Field(default=0, description="Seed of the fault injection (default 0).")


@functools.lru_cache(maxsize=1)
def scripted_settings() -> ScriptedSettings:
    """This process's scripted-model settings (read once; ``scripted_settings.cache_clear()`` to reload)."""
    return ScriptedSettings()


_SCRIPTS: dict[str, Script] = {}
_OBSERVER: list[Callable[[ScriptContext], None]] = []


def set_call_observer(observer: Callable[[ScriptContext], None] | None) -> None:
    """Call ``observer`` with the context of every call of every :class:`ScriptedModel` in this process (None
    removes it): how tests and benchmarks count model calls made in worker processes."""
    _OBSERVER[:] = [observer] if observer is not None else []


def register_script(agent: str, script: Script) -> None:
    """Register the scripted behaviour of ``agent`` for the ``scripted`` provider (demo, tests, bench)."""
    _SCRIPTS[agent] = script


def get_script(agent: str) -> Script | None:
    """The script registered for ``agent``, if any."""
    return _SCRIPTS.get(agent)


# --------------------------------------------------------------------------- the model

T = TypeVar("T", bound=BaseModel)


class ScriptedModel(Model):
    """A deterministic strands model that plays a script and injects faults on purpose.

    Args:
        script: Turns played in order, or a function of :class:`ScriptContext` returning the next turn.
            None: always finish with a sample output valid for the outcome schema.
        faults: Faults injected at set rates (before the script's turn is consulted).
        latency: Seconds added to every call (on top of a turn's own latency).
        agent: Name used in :class:`ScriptContext` when not running inside a teamster step.
        on_call: Called with the context of every model call (tests count calls with it).
        tokens_per_char: Usage reported per character of prompt and response (default 0.25).
    """

    def __init__(self, script: Script | None = None, *, faults: FaultPlan | None = None, latency: float = 0.0,
                 agent: str = "agent", on_call: Callable[[ScriptContext], None] | None = None,
                 tokens_per_char: float = 0.25) -> None:
        self.script = script
        self.faults = faults or FaultPlan()
        self.latency = latency
        self.agent = agent
        self.on_call = on_call
        self.tokens_per_char = tokens_per_char
        self.calls: list[ScriptContext] = []
        self._lock = threading.Lock()
        self._config: dict[str, Any] = {"model_id": "scripted"}

    # -- strands Model interface -------------------------------------------------------------
    def update_config(self, **model_config: Any) -> None:
        self._config.update(model_config)

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    async def structured_output(self, output_model: type[T], prompt: Messages, system_prompt: str | None = None,
                                **kwargs: Any) -> AsyncGenerator[dict[str, T | Any], None]:
        """Direct structured output (outside the agent loop): a sample valid instance."""
        schema = output_model.model_json_schema()
        yield {"output": output_model.model_validate(sample_output(schema))}

    async def stream(self, messages: Messages, tool_specs: list[ToolSpec] | None = None,
                     system_prompt: str | None = None, *, invocation_state: dict[str, Any] | None = None,
                     cancel_signal: threading.Event | None = None, **kwargs: Any) -> AsyncIterator[StreamEvent]:
        ctx = self._context(messages, tool_specs or [], invocation_state or {})
        with self._lock:
            self.calls.append(ctx)
        if self.on_call is not None:
            self.on_call(ctx)
        for observer in _OBSERVER:
            observer(ctx)
        turn = self.faults.pick(ctx) or self._scripted_turn(ctx)
        delay = self.latency + turn.latency
        if delay:
            await _sleep(delay, cancel_signal)
        if turn.kind == "throttle":
            raise ModelThrottledException("scripted model: throttled (injected fault)")
        if turn.kind == "timeout":
            raise TimeoutError("scripted model: request timed out (injected fault)")
        prompt_chars = sum(len(json.dumps(m.get("content", []), default=str)) for m in messages)
        async for event in self._emit(turn, ctx, tool_specs or [], prompt_chars):
            yield event

    # -- internals ---------------------------------------------------------------------------
    def _context(self, messages: Messages, tool_specs: list[ToolSpec],
                 invocation_state: dict[str, Any]) -> ScriptContext:
        state = invocation_state.get(TEAMSTER_STATE_KEY) or {}
        prompt = ""
        tool_results: list[str] = []
        for message in messages:
            for block in message.get("content", []):
                if message.get("role") == "user" and not prompt and "text" in block:
                    prompt = str(block["text"])
                if "toolResult" in block:
                    texts = [c.get("text", json.dumps(c.get("json"))) for c in block["toolResult"].get("content", [])]
                    tool_results.append(" ".join(t for t in texts if t))
        return ScriptContext(
            agent=str(state.get("agent", self.agent)),
            call_index=sum(1 for m in messages if m.get("role") == "assistant"),
            attempt=int(state.get("attempt", 1)),
            run_id=state.get("run_id"),
            step_id=state.get("step_id"),
            prompt=prompt,
            tool_results=tuple(tool_results),
            tool_specs=tuple(spec["name"] for spec in tool_specs),
        )

    def _scripted_turn(self, ctx: ScriptContext) -> Turn:
        script = self.script
        if script is None:
            return finish(None)
        if callable(script):
            return script(ctx)
        if ctx.call_index >= len(script):
            raise ScriptExhausted(f"scripted model for {ctx.agent!r} has {len(script)} turns; call "
                                  f"{ctx.call_index + 1} has none")
        return script[ctx.call_index]

    async def _emit(self, turn: Turn, ctx: ScriptContext, tool_specs: list[ToolSpec],
                    prompt_chars: int) -> AsyncIterator[StreamEvent]:
        yield {"messageStart": {"role": "assistant"}}
        emitted = ""
        stop_reason = "end_turn"
        if turn.kind in ("text", "guardrail"):
            emitted = turn.text
            yield {"contentBlockStart": {"start": {}}}
            yield {"contentBlockDelta": {"delta": {"text": turn.text}}}
            yield {"contentBlockStop": {}}
            stop_reason = "guardrail_intervened" if turn.kind == "guardrail" else "end_turn"
        else:
            name, raw = self._tool_call(turn, tool_specs)
            emitted = raw
            tool_use_id = f"tooluse_{ctx.call_index}_{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
            yield {"contentBlockStart": {"start": {"toolUse": {"name": name, "toolUseId": tool_use_id}}}}
            yield {"contentBlockDelta": {"delta": {"toolUse": {"input": raw}}}}
            yield {"contentBlockStop": {}}
            stop_reason = "tool_use"
        yield {"messageStop": {"stopReason": stop_reason}}  # type: ignore[typeddict-item]
        input_tokens = max(1, int(prompt_chars * self.tokens_per_char))
        output_tokens = max(1, int(len(emitted) * self.tokens_per_char))
        yield {"metadata": {"usage": {"inputTokens": input_tokens, "outputTokens": output_tokens,
                                      "totalTokens": input_tokens + output_tokens},
                            "metrics": {"latencyMs": int((self.latency + turn.latency) * 1000)}}}

    def _tool_call(self, turn: Turn, tool_specs: list[ToolSpec]) -> tuple[str, str]:
        if turn.kind == "raw_tool":
            return turn.tool, str(turn.payload)
        if turn.kind == "tool":
            return turn.tool, json.dumps(turn.payload)
        # the final outcome: call the structured-output tool the agent offered
        names = {spec["name"]: spec for spec in tool_specs}
        payload = dict(turn.payload)
        if OUTCOME_TOOL_NAME in names:
            if payload.get("status") == "succeeded" and payload.get("output") is None:
                schema = names[OUTCOME_TOOL_NAME]["inputSchema"]["json"]
                payload["output"] = sample_output(schema["properties"]["output"], schema.get("$defs", {}))
            return OUTCOME_TOOL_NAME, json.dumps(payload)
        structured = next((s for s in tool_specs if "StructuredOutputTool" in s.get("description", "")), None)
        if structured is not None:  # a plain strands agent with its own structured_output_model
            output = payload.get("output")
            if output is None:
                output = sample_output(structured["inputSchema"]["json"])
            return structured["name"], json.dumps(output)
        raise ConfigurationError("scripted outcome turn, but the agent offered no structured-output tool")


async def _sleep(seconds: float, cancel_signal: threading.Event | None) -> None:
    """Sleep, waking early when the invocation is cancelled (wall-clock budget, lease lost)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0 or (cancel_signal is not None and cancel_signal.is_set()):
            return
        await asyncio.sleep(min(remaining, 0.05))
