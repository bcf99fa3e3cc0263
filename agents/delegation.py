"""Delegation: an agent calls other registered agents as tools, each call a durable sub-call of its step.

An :class:`~teamster.agents.spec.AgentSpec` names the agents it may call (``delegates=("researcher", ...)``); the
model sees one tool per delegate, ``ask_<agent>``, whose input schema is the delegate's input model. Each call:

* is **typed**: the input is validated against the delegate's input model; the delegate runs with its own
  instructions, tools, budget and structured outcome, and the caller gets that outcome back as the tool's result
  (JSON: ``status`` ``succeeded`` with ``output``, ``cannot_complete`` with ``reason``, ``needs_human`` with
  ``question``, or ``failed`` with ``error_type`` and ``message``), which the caller's own contract can act on;
* is **budgeted**: it is one of the caller's tool calls, its tokens count against the caller's token budget, its
  model calls pass the run's gate (provider limits, the run's budget) and add to the caller step's spend, and it
  ends by the caller's deadline;
* is **journaled** as a nested step (``<step>/<agent>#<n>``): ``delegation_start``, the delegate's own model calls,
  tool calls and outcome, then ``delegation_result``;
* is **idempotent**: its key is the caller's tool-call idempotency key (stable across redeliveries, retries and
  takeovers: same step, same delegate, same input, same ordinal). A call whose result is in the journal -- from
  any earlier attempt of the step -- is served from it, not run again; a call a dead worker left half-done reuses
  the model answers it recorded; replay serves the recorded result.

A retryable failure of the delegate (throttled, timed out, provider down), the run's budget being spent, a lost
lease or a cancelled run are not the caller's to handle: the caller step ends with that typed error, so exactly one
layer -- the step's retry policy -- owns retries (and the retry reuses every delegation that already finished).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strands.types._events import ToolResultEvent
from strands.types.tools import AgentTool, ToolResult, ToolSpec, ToolUse

from teamster.agents.guard import EventSink, StepControl
from teamster.agents.limits import ModelGate
from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Succeeded
from teamster.agents.recording import ModelExchange
from teamster.agents.spec import AgentSpec
from teamster.agents.tools import TEAMSTER_STATE_KEY
from teamster.config.settings import TeamsterSettings
from teamster.errors import ConfigurationError, TeamsterError, error_from_code

if TYPE_CHECKING:
    from teamster.agents.runner import StepContext

__all__ = ["DelegationMemory", "DelegateTool", "delegate_tool_name", "nested_step", "MAX_DEPTH",
           "PROPAGATED_ERRORS"]

MAX_DEPTH = 3
"""How deep delegations may nest (an agent's delegate delegating in turn counts one more)."""

PROPAGATED_ERRORS = frozenset({"run_budget_exceeded", "lease_lost", "cancelled", "run_deadline_exceeded"})
"""Terminal errors of a delegate that end the caller's step too (beside every retryable error)."""


def delegate_tool_name(agent: str) -> str:
    """The tool the caller's model sees for delegating to ``agent`` (provider-safe: letters, digits, _ and -)."""
    return "ask_" + re.sub(r"[^a-zA-Z0-9_-]", "_", agent)[:60]


def nested_step(step_id: str, agent: str, ordinal: int) -> str:
    """The journal step of the ``ordinal``-th (0-based) delegation to ``agent`` in ``step_id``."""
    return f"{step_id}/{agent}#{ordinal + 1}"


@dataclass
class DelegationMemory:
    """What the journal holds about a step's delegations, loaded before an attempt runs.

    Attributes:
        results: Finished delegations by idempotency key (from any earlier attempt): the ``delegation_result``
            data, served instead of running the delegate again.
        exchanges: Delegations a dead worker left unfinished, by key: the model answers they recorded (a leading
            run, as for steps), fed back instead of paying for them again.
    """

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    exchanges: dict[str, list[ModelExchange]] = field(default_factory=dict)


@dataclass
class _Caller:
    """What a delegate tool needs from the step that calls it."""

    settings: TeamsterSettings
    context: StepContext
    emit: EventSink
    control: StepControl
    gate: ModelGate | None
    memory: DelegationMemory
    on_usage: Callable[[dict[str, int]], None]
    on_error: Callable[[TeamsterError], None]


class DelegateTool(AgentTool):
    """The ``ask_<agent>`` tool of one delegate, for one step attempt (see the module docstring)."""

    def __init__(self, spec: AgentSpec[Any, Any], caller: _Caller) -> None:
        super().__init__()
        self.spec = spec
        self.caller = caller
        self._name = delegate_tool_name(spec.name)
        summary = " ".join(spec.instructions.split())[:300]
        self._spec: ToolSpec = {
            "name": self._name,
            "description": (f"Delegate a task to the '{spec.name}' agent ({summary}). Its input is "
                            f"{spec.input_model.__name__}. Returns its outcome as JSON: status 'succeeded' with "
                            "'output', 'cannot_complete' with 'reason', 'needs_human' with 'question', or 'failed' "
                            "with 'error_type' and 'message'."),
            "inputSchema": {"json": spec.input_model.model_json_schema()},
        }

    @classmethod
    def for_step(cls, spec: AgentSpec[Any, Any], *, settings: TeamsterSettings, context: StepContext,
                 emit: EventSink, control: StepControl, gate: ModelGate | None, memory: DelegationMemory | None,
                 on_usage: Callable[[dict[str, int]], None],
                 on_error: Callable[[TeamsterError], None]) -> list[DelegateTool]:
        """The delegate tools of ``spec`` for one step attempt (none when it names no delegates)."""
        from teamster.agents.spec import get_agent  # noqa: PLC0415 - the registry, at call time

        if not spec.delegates:
            return []
        if context.depth >= MAX_DEPTH:
            raise ConfigurationError(f"agent {spec.name!r} delegates at depth {context.depth + 1}, deeper than "
                                     f"{MAX_DEPTH}: delegation chains must end")
        caller = _Caller(settings, context, emit, control, gate, memory or DelegationMemory(), on_usage, on_error)
        return [cls(get_agent(name), caller) for name in spec.delegates]

    @property
    def tool_name(self) -> str:
        return self._name

    @property
    def tool_spec(self) -> ToolSpec:
        return self._spec

    @property
    def tool_type(self) -> str:
        return "delegate"

    async def stream(self, tool_use: ToolUse, invocation_state: dict[str, Any],
                     **kwargs: Any) -> AsyncGenerator[Any, None]:
        use_id = str(tool_use.get("toolUseId", ""))
        keys: dict[str, str] = (invocation_state.get(TEAMSTER_STATE_KEY) or {}).get("tool_keys", {})
        key = keys.get(use_id) or f"{self.caller.context.run_id}:{self.caller.context.step_id}:{self._name}:?"
        ordinal = _ordinal(key)
        where = nested_step(self.caller.context.step_id, self.spec.name, ordinal)
        recorded = self.caller.memory.results.get(key)
        if recorded is not None:  # finished before (an earlier attempt, or a worker that died after it): reuse it
            self.caller.emit("delegation_reused", {"_step": where, "agent": self.spec.name, "delegation_key": key,
                                                   "status": recorded.get("status")})
            yield _result(use_id, recorded.get("tool_result") or {"status": "failed", "error_type": "unknown"})
            return
        result = await self._delegate(tool_use.get("input"), key, where)
        yield _result(use_id, result)

    async def _delegate(self, value: Any, key: str, where: str) -> dict[str, Any]:
        from teamster.agents.runner import StepContext, run_agent_async  # noqa: PLC0415 - runner imports this

        caller = self.caller
        ctx = caller.context
        reused = caller.memory.exchanges.get(key, [])
        caller.emit("delegation_start", {"_step": where, "agent": self.spec.name, "agent_version": self.spec.version,
                                         "delegation_key": key, "input": value, "reused_responses": len(reused)})
        control = StepControl()  # the delegate's own (its deadline must not stop the caller) ...
        caller.control.on_abort(lambda: control.abort(caller.control.reason or "caller stopped"))  # ... and ours

        def nested_emit(kind: str, data: dict[str, Any]) -> None:
            caller.emit(kind, {**data, "_step": data.get("_step", where), "delegation_key": key})

        started = time.monotonic()
        run = await run_agent_async(
            self.spec, value, settings=caller.settings, on_event=nested_emit, recorded=reused, control=control,
            gate=caller.gate, memory=caller.memory,
            context=StepContext(run_id=ctx.run_id, step_id=where, attempt=ctx.attempt, trace_id=ctx.trace_id,
                                depth=ctx.depth + 1))
        caller.on_usage(run.usage)
        tool_result = _tool_result(self.spec.name, run.outcome)
        outcome = run.outcome
        propagate = isinstance(outcome, Failed) and (outcome.retryable or outcome.error_type in PROPAGATED_ERRORS)
        caller.emit("delegation_result", {
            "_step": where, "agent": self.spec.name, "delegation_key": key, "status": tool_result["status"],
            "tool_result": tool_result, "model_calls": run.model_calls, "live_model_calls": run.live_model_calls,
            "usage": run.usage, "duration_seconds": round(time.monotonic() - started, 4),
            # a propagated failure is the caller's attempt's end, not a result to reuse: a retry calls again
            "reusable": not propagate})
        if propagate:
            assert isinstance(outcome, Failed)
            caller.on_error(error_from_code(outcome.error_type, f"delegated to {self.spec.name!r}: {outcome.message}",
                                            **{**outcome.details, "delegate": self.spec.name, "delegation": where}))
        return tool_result


def _ordinal(key: str) -> int:
    """The ordinal in a tool-call key (``run:step:tool:ordinal:digest``)."""
    try:
        return int(key.rsplit(":", 2)[-2])
    except (IndexError, ValueError):
        return 0


def _tool_result(agent: str, outcome: Succeeded | CannotComplete | NeedsHuman | Failed) -> dict[str, Any]:
    if isinstance(outcome, Succeeded):
        return {"agent": agent, "status": "succeeded", "output": outcome.output}
    if isinstance(outcome, CannotComplete):
        return {"agent": agent, "status": "cannot_complete", "reason": outcome.reason}
    if isinstance(outcome, NeedsHuman):
        return {"agent": agent, "status": "needs_human", "question": outcome.question}
    return {"agent": agent, "status": "failed", "error_type": outcome.error_type, "message": outcome.message,
            "retryable": outcome.retryable}


def _result(use_id: str, body: dict[str, Any]) -> ToolResultEvent:
    result: ToolResult = {"toolUseId": use_id, "status": "success",
                          "content": [{"text": json.dumps(body, ensure_ascii=False)}]}
    return ToolResultEvent(result)
