"""The tool registry, the ``@tool`` decorator and idempotency keys for tool side effects.

Tools are ordinary strands tools registered by name. An agent lists the names it may use; the
:class:`~agents.guard.StepGuard` hook blocks every other call in code. Each allowed call gets an idempotency
key that is stable across redeliveries and retries of the same step (``run:step:tool:n:digest``), so a
tool with side effects can deduplicate them (:func:`idempotency_key`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

from strands import tool as strands_tool
from strands.types.tools import AgentTool, ToolContext

from teamster.errors import ConfigurationError, UnknownTool

__all__ = ["tool", "get_tool", "registered_tools", "idempotency_key", "tool_call_key", "TEAMSTER_STATE_KEY"]

TEAMSTER_STATE_KEY = "teamster"
"""Key of teamster's context inside strands' ``invocation_state``."""

F = TypeVar("F", bound=Callable[..., Any])

_TOOLS: dict[str, AgentTool] = {}
_LOCK = threading.Lock()


@overload
def tool(func: F) -> AgentTool: ...


@overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[F], AgentTool]: ...


def tool(func: F | None = None, *, name: str | None = None,
         description: str | None = None) -> AgentTool | Callable[[F], AgentTool]:
    """Register a function as a tool agents may be allowed to call.

    The function's docstring and type hints form the tool's schema (strands' ``@tool``). If it declares a
    ``tool_context`` parameter it receives strands' :class:`~strands.types.tools.ToolContext`, from which
    :func:`idempotency_key` reads the call's key.

    Example:
        >>> @tool
        ... def lookup_order(order_id: str) -> dict:
        ...     '''Look up an order by id.'''
        ...     return {"order_id": order_id, "status": "shipped"}
    """

    def register(fn: F) -> AgentTool:
        wants_context = "tool_context" in inspect.signature(fn).parameters
        decorated = strands_tool(name=name, description=description, context=wants_context)(fn)
        tool_name = decorated.tool_name
        with _LOCK:
            existing = _TOOLS.get(tool_name)
            if existing is not None and existing.tool_spec != decorated.tool_spec:
                raise ConfigurationError(f"tool {tool_name!r} is already registered with another signature")
            _TOOLS[tool_name] = decorated
        return decorated  # type: ignore[no-any-return]

    if func is not None:
        return register(func)
    return register


def get_tool(name: str) -> AgentTool:
    """The registered tool called ``name``.

    Raises:
        UnknownTool: with the list of registered tools.
    """
    try:
        return _TOOLS[name]
    except KeyError:
        known = ", ".join(sorted(_TOOLS)) or "none"
        raise UnknownTool(f"unknown tool {name!r} (registered: {known})",
                          hint="Decorate the function with agents.tool and import its module first.") from None


def registered_tools() -> dict[str, AgentTool]:
    """A copy of the registry."""
    return dict(_TOOLS)


def tool_call_key(run_id: str, step_id: str, tool_name: str, ordinal: int, tool_input: Any) -> str:
    """The idempotency key of the ``ordinal``-th call of ``tool_name`` in a step, with this input.

    The same step re-executed (redelivery, retry, recovery) makes the same calls in the same order and gets
    the same keys; a call with different arguments gets a different key.
    """
    digest = hashlib.sha256(json.dumps(tool_input, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{run_id}:{step_id}:{tool_name}:{ordinal}:{digest}"


def idempotency_key(tool_context: ToolContext) -> str:
    """The idempotency key of the current tool call (use it to deduplicate side effects).

    Raises:
        ConfigurationError: when the tool runs outside a teamster step (no key was assigned).
    """
    state = (tool_context.invocation_state or {}).get(TEAMSTER_STATE_KEY) or {}
    keys: dict[str, str] = state.get("tool_keys", {})
    tool_use_id = str(tool_context.tool_use.get("toolUseId", ""))
    try:
        return keys[tool_use_id]
    except KeyError:
        raise ConfigurationError("no idempotency key for this tool call: is it running inside a teamster step?") \
            from None
