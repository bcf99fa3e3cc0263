"""``StepGuard``: the strands hook that enforces an agent's constraints in code.

* Tool allow-list: a call of a tool the spec does not allow is cancelled before it runs and recorded.
* Tool-call budget: calls beyond ``max_tool_calls`` are cancelled and the invocation is stopped.
* Model-call cap: calls beyond ``max_model_calls`` are denied and the invocation is stopped (strands'
  ``limits`` bound the loop too; this is the hard stop that also covers forced structured-output re-asks).
* Idempotency keys: each allowed tool call gets its key in the invocation state before it runs.
* ``Error: ...`` strings: a tool that *returns* an error string instead of raising is marked as failed.
* Events: tool calls, results and blocks are reported to the step's event sink (the journal).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any

from strands.hooks import (
    AfterToolCallEvent,
    BeforeModelCallEvent,
    BeforeToolCallEvent,
    HookProvider,
    HookRegistry,
)
from strands.types._events import ToolResultEvent
from strands.types.tools import AgentTool, ToolSpec, ToolUse

from teamster.agents.outcomes import OUTCOME_TOOL_NAME
from teamster.agents.spec import AgentSpec
from teamster.agents.tools import TEAMSTER_STATE_KEY, tool_call_key
from teamster.errors import TeamsterError

__all__ = ["StepGuard", "StepControl", "EventSink", "RecordedTool"]

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives ``(event_type, payload)`` for every decision of a step (the journal in production)."""


class StepControl:
    """Stops a running step from outside the agent: wall-clock deadline, lost lease, cancelled run, budget breach.

    The first reason given wins. Listeners registered with :meth:`on_abort` run at once: the runner calls strands'
    ``Agent.cancel`` with one (strands checks it between stream chunks and tools see it) and cancels the step's task
    with another, so even a model call that sends nothing stops immediately. :attr:`event` is set too.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def abort(self, reason: str) -> None:
        """Ask the step to stop as soon as possible, for ``reason``."""
        with self._lock:
            first = self.reason is None
            if first:
                self.reason = reason
            listeners = list(self._listeners) if first else []
        self.event.set()
        for listener in listeners:
            listener()

    def on_abort(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the step is aborted (at once if it already was)."""
        with self._lock:
            if self.reason is None:
                self._listeners.append(listener)
                return
        listener()


class StepGuard(HookProvider):
    """Enforces one step's allow-list and budgets; counts what happened.

    Args:
        spec: The agent being run.
        run_id: Run id (for idempotency keys); a local placeholder outside teamster steps.
        step_id: Step id (for idempotency keys).
        on_event: Event sink.
        control: Used to stop the invocation when a budget is breached.
    """

    def __init__(self, spec: AgentSpec[Any, Any], *, run_id: str, step_id: str, on_event: EventSink,
                 control: StepControl, recorded_tools: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.spec = spec
        self.allowed = frozenset(spec.tools)
        self.run_id = run_id
        self.step_id = step_id
        self.on_event = on_event
        self.control = control
        self.model_calls = 0
        self.tool_calls = 0
        self.blocked: list[str] = []
        self.breach: str | None = None
        self.outcome_rejections: list[str] = []
        self.tool_errors: list[str] = []
        self._ordinals: dict[str, int] = {}
        self.running_tools: dict[str, str] = {}
        """Tools started and not yet finished (toolUseId -> name): abandoned if the step is stopped now."""
        self.recorded_tools = recorded_tools
        self.delegation_error: TeamsterError | None = None
        """A delegate's failure that ends this step (see :mod:`teamster.agents.delegation`)."""
        self._lock = threading.Lock()

    def allow(self, names: Iterable[str]) -> None:
        """Also allow these tools (the agent's delegate tools)."""
        self.allowed = self.allowed | frozenset(names)

    def register_hooks(self, registry: HookRegistry, **kwargs: Any) -> None:
        registry.add_callback(BeforeModelCallEvent, self.before_model_call)
        registry.add_callback(BeforeToolCallEvent, self.before_tool_call)
        registry.add_callback(AfterToolCallEvent, self.after_tool_call)

    def breach_budget(self, budget: str, limit: int) -> None:
        """Record a budget breach (first one wins) and stop the invocation."""
        with self._lock:
            if self.breach is None:
                self.breach = budget
        self.on_event("budget_exceeded", {"budget": budget, "limit": limit})
        self.control.abort(f"budget:{budget}")

    def before_model_call(self, event: BeforeModelCallEvent) -> None:
        with self._lock:
            self.model_calls += 1
            count = self.model_calls
        if count > self.spec.budget.max_model_calls:
            event.cancel = f"model call budget of {self.spec.budget.max_model_calls} exhausted"
            self.breach_budget("model_calls", self.spec.budget.max_model_calls)

    def before_tool_call(self, event: BeforeToolCallEvent) -> None:
        use = event.tool_use
        name = str(use.get("name", ""))
        if name == OUTCOME_TOOL_NAME:
            return
        if name not in self.allowed:
            self.blocked.append(name)
            event.cancel_tool = (f"Tool '{name}' is not allowed for agent '{self.spec.name}'. Allowed tools: "
                                 f"{', '.join(sorted(self.allowed)) or 'none'}.")
            self.on_event("tool_blocked", {"tool": name, "input": use.get("input"),
                                           "reason": "not in the agent's allow-list"})
            return
        with self._lock:
            if self.tool_calls >= self.spec.budget.max_tool_calls:
                over = True
            else:
                over = False
                self.tool_calls += 1
                ordinal = self._ordinals.get(name, 0)
                self._ordinals[name] = ordinal + 1
        if over:
            event.cancel_tool = f"tool call budget of {self.spec.budget.max_tool_calls} exhausted"
            self.breach_budget("tool_calls", self.spec.budget.max_tool_calls)
            return
        key = tool_call_key(self.run_id, self.step_id, name, ordinal, use.get("input"))
        state = event.invocation_state.setdefault(TEAMSTER_STATE_KEY, {})
        state.setdefault("tool_keys", {})[str(use.get("toolUseId", ""))] = key
        self.on_event("tool_call", {"tool": name, "input": use.get("input"), "idempotency_key": key})
        with self._lock:
            self.running_tools[str(use.get("toolUseId", ""))] = name
        if self.recorded_tools is not None:  # replay: serve the recorded result, never run the tool
            event.selected_tool = RecordedTool(name, event.selected_tool, self.recorded_tools.get(key))

    def after_tool_call(self, event: AfterToolCallEvent) -> None:
        name = str(event.tool_use.get("name", ""))
        with self._lock:
            self.running_tools.pop(str(event.tool_use.get("toolUseId", "")), None)
        if event.cancel_message is not None:
            return
        result = event.result
        texts = [str(c.get("text", "")) for c in result.get("content", []) if "text" in c]
        if name == OUTCOME_TOOL_NAME:
            if result.get("status") == "error":
                self.outcome_rejections.append(" ".join(texts))
                self.on_event("validation", {"ok": False, "stage": "schema", "errors": " ".join(texts)})
            return
        status = result.get("status")
        if status == "success" and texts and texts[0].lstrip().lower().startswith("error:"):
            # A tool that returns "Error: ..." failed; it must not read as success to the model or to us.
            event.result = {**result, "status": "error"}
            status = "error"
        if status == "error":
            self.tool_errors.append(f"{name}: {' '.join(texts)[:200]}")
        keys = (event.invocation_state.get(TEAMSTER_STATE_KEY) or {}).get("tool_keys", {})
        self.on_event("tool_result", {"tool": name, "status": status, "content": result.get("content"),
                                      "idempotency_key": keys.get(str(event.tool_use.get("toolUseId", ""))),
                                      "error": repr(event.exception) if event.exception else None})


class RecordedTool(AgentTool):
    """Stands in for a tool during replay: returns the journaled result instead of running the tool."""

    def __init__(self, name: str, original: AgentTool | None, recorded: dict[str, Any] | None) -> None:
        super().__init__()
        self._name = name
        self._spec: ToolSpec = original.tool_spec if original is not None else \
            {"name": name, "description": "recorded", "inputSchema": {"json": {"type": "object"}}}
        self._recorded = recorded

    @property
    def tool_name(self) -> str:
        return self._name

    @property
    def tool_spec(self) -> ToolSpec:
        return self._spec

    @property
    def tool_type(self) -> str:
        return "recorded"

    async def stream(self, tool_use: ToolUse, invocation_state: dict[str, Any],
                     **kwargs: Any) -> AsyncGenerator[Any, None]:
        if self._recorded is None:
            text = f"Error: no recorded result for {self._name} (replay diverged)"
            yield ToolResultEvent({"toolUseId": tool_use["toolUseId"], "status": "error", "content": [{"text": text}]})
            return
        yield ToolResultEvent({"toolUseId": tool_use["toolUseId"], "status": self._recorded.get("status", "success"),
                               "content": self._recorded.get("content") or []})
