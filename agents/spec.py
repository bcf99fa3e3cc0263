"""The agent contract: :class:`AgentSpec`, its budgets, success criteria and retry policy, and the registry.

An agent is declared once, in code, and referred to by name everywhere else (messages carry names, never
objects): workers and clients import the same modules (``TEAMSTER_WORKFLOW_MODULES``).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from teamster.agents.limits import ProviderLimits
from teamster.errors import ConfigurationError, UnknownAgent

__all__ = [
    "Budget",
    "RetryPolicy",
    "Criterion",
    "AgentSpec",
    "register_agent",
    "get_agent",
    "registered_agents",
]

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)


class Budget(BaseModel):
    """Hard limits of one agent step. Breaching any of them is a terminal ``budget_exceeded`` failure.

    Attributes:
        max_model_calls: Model calls per step, structured-output re-asks included (default 6).
        max_tool_calls: Tool calls per step (default 10).
        max_total_tokens: Input + output tokens summed over the step's model calls (default 100 000).
        timeout_seconds: Wall-clock limit of the step (default: ``TEAMSTER_STEP_TIMEOUT_SECONDS``).
    """

    model_config = ConfigDict(frozen=True)

    max_model_calls: int = Field(default=6, ge=1)
    max_tool_calls: int = Field(default=10, ge=0)
    max_total_tokens: int = Field(default=100_000, ge=1)
    timeout_seconds: float | None = Field(default=None, gt=0)


class RetryPolicy(BaseModel):
    """How a step retries *retryable* errors (throttling, timeouts, 5xx). Terminal errors never retry.

    Delays grow exponentially from ``backoff_base`` and are capped at ``backoff_max``; with ``jitter`` each
    delay is drawn uniformly from ``[0, capped delay]`` ("full jitter"). ``None`` fields take the
    ``TEAMSTER_RETRY_*`` defaults.
    """

    model_config = ConfigDict(frozen=True)

    max_attempts: int | None = Field(default=None, ge=1)
    backoff_base: float | None = Field(default=None, gt=0)
    backoff_max: float | None = Field(default=None, gt=0)
    jitter: bool | None = None

    def resolved(self, defaults: Any) -> RetryPolicy:
        """This policy with unset fields filled from settings (``TeamsterSettings``)."""
        return RetryPolicy(
            max_attempts=self.max_attempts or defaults.retry_max_attempts,
            backoff_base=self.backoff_base or defaults.retry_backoff_base,
            backoff_max=self.backoff_max or defaults.retry_backoff_max,
            jitter=defaults.retry_jitter if self.jitter is None else self.jitter,
        )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` starts at 1). Needs a resolved policy."""
        base = float(self.backoff_base or 1.0)
        cap = float(self.backoff_max or 60.0)
        delay = min(cap, base * float(2 ** max(0, attempt - 1)))
        if self.jitter:
            delay = (rng or random).uniform(0, delay)
        return delay


@dataclass(frozen=True)
class Criterion(Generic[In, Out]):
    """A named success criterion: ``check(output, input)`` must be true, else the step fails terminally.

    Attributes:
        name: Short identifier (recorded in the failure and the journal).
        check: Predicate over the validated output and input.
        message: What the failure says when the predicate is false.
    """

    name: str
    check: Callable[[Out, In], bool]
    message: str = ""


@dataclass(frozen=True)
class AgentSpec(Generic[In, Out]):
    """A constrained worker agent: typed input and output, instructions, allowed tools, budgets.

    Attributes:
        name: Unique name (what messages and the journal refer to).
        input_model: Pydantic model the step's input must validate against.
        output_model: Pydantic model the result must validate against.
        instructions: System prompt.
        version: Bump when instructions or models change (recorded in the journal; replay reports it).
        tools: Names of allowed tools (from :mod:`agents.tools`); every other tool call is blocked.
        budget: Hard limits per step.
        criteria: Success criteria checked after schema validation.
        retry: Retry policy for retryable errors.
        model: Provider string overriding ``TEAMSTER_MODEL`` for this agent (e.g. a cheaper fallback).
        limits: Provider limits this agent's calls share with every worker (rpm, tpm, concurrency), instead of
            those ``TEAMSTER_PROVIDER_LIMITS`` sets for its model.
        delegates: Names of registered agents this agent may call, each as a tool ``ask_<name>`` whose call is a
            typed, budgeted, journaled, idempotent sub-call (see :mod:`teamster.agents.delegation`).
    """

    name: str
    input_model: type[In]
    output_model: type[Out]
    instructions: str
    version: str = "1"
    tools: tuple[str, ...] = ()
    budget: Budget = field(default_factory=Budget)
    criteria: tuple[Criterion[Any, Any], ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    model: str | None = None
    limits: ProviderLimits | None = None
    delegates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigurationError(f"agent name {self.name!r} must be alphanumeric (with _ - .)")
        for label, model in (("input_model", self.input_model), ("output_model", self.output_model)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigurationError(f"agent {self.name!r}: {label} must be a pydantic model class")
        if isinstance(self.tools, list):  # accept lists for convenience, keep the spec hashable
            object.__setattr__(self, "tools", tuple(self.tools))
        if isinstance(self.criteria, list):
            object.__setattr__(self, "criteria", tuple(self.criteria))
        if isinstance(self.delegates, (list, str)):
            object.__setattr__(self, "delegates", (self.delegates,) if isinstance(self.delegates, str)
                               else tuple(self.delegates))
        if self.name in self.delegates:
            raise ConfigurationError(f"agent {self.name!r} cannot delegate to itself")
        if len(set(self.delegates)) != len(self.delegates):
            raise ConfigurationError(f"agent {self.name!r} names a delegate twice: {', '.join(self.delegates)}")

    def with_model(self, model: str) -> AgentSpec[In, Out]:
        """A copy that runs on another provider/model (used by ``retry_with(model=...)``); the limits of that model
        come from ``TEAMSTER_PROVIDER_LIMITS``, not from this agent's."""
        return AgentSpec(
            name=self.name, input_model=self.input_model, output_model=self.output_model,
            instructions=self.instructions, version=self.version, tools=self.tools, budget=self.budget,
            criteria=self.criteria, retry=self.retry, model=model, delegates=self.delegates,
        )


_AGENTS: dict[str, AgentSpec[Any, Any]] = {}
_LOCK = threading.Lock()


def register_agent(spec: AgentSpec[In, Out], *, replace: bool = False) -> AgentSpec[In, Out]:
    """Register ``spec`` under its name and return it (re-registering the same spec is a no-op).

    Args:
        spec: The agent.
        replace: Replace an existing, different spec of the same name (tests, hot reload).

    Raises:
        ConfigurationError: if another spec already uses the name, or an allowed tool is unknown.
    """
    from teamster.agents.tools import get_tool  # noqa: PLC0415 - tools import spec types

    for tool_name in spec.tools:
        get_tool(tool_name)  # raises UnknownTool
    with _LOCK:
        existing = _AGENTS.get(spec.name)
        if existing is not None and existing != spec and not replace:
            raise ConfigurationError(f"agent {spec.name!r} is already registered with a different spec")
        _AGENTS[spec.name] = spec
    return spec


def get_agent(name: str) -> AgentSpec[Any, Any]:
    """The registered agent called ``name``.

    Raises:
        UnknownAgent: with the list of known agents.
    """
    try:
        return _AGENTS[name]
    except KeyError:
        known = ", ".join(sorted(_AGENTS)) or "none"
        raise UnknownAgent(f"unknown agent {name!r} (registered: {known})",
                           hint="Register it with agents.register_agent(...) in a module listed in "
                                "TEAMSTER_WORKFLOW_MODULES.") from None


def registered_agents() -> dict[str, AgentSpec[Any, Any]]:
    """A copy of the registry."""
    return dict(_AGENTS)
