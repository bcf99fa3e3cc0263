"""teamster: run LLM agents reliably on a task queue.

Constrained strands-agents workers run as idempotent Celery tasks on Redis, pass explicit pydantic state and end
in an explicit outcome; every failure goes to a dead-letter queue. This module is the public API::

    from teamster import AgentSpec, Budget, Workflow, human_review, submit, result

    extract = AgentSpec(name="extract", input_model=Claim, output_model=Facts, instructions="...")
    claims = Workflow("claims", input_model=Claim)
    claims.step("extract", extract, escalate=[human_review()])
    claims.register()

    run_id = submit("claims", {"claim_id": "C-1", "text": "..."}, idempotency_key="C-1")
    print(result(run_id, timeout=60))

Errors live in :mod:`teamster.errors`; testing helpers for your own test suite (in-process runs, scripted
models, a guard against real model requests) in :mod:`teamster.testing`. The Celery entry point is
``celery -A teamster.tasks.app worker`` (or ``teamster worker``).

Importing ``teamster`` is cheap and has no side effects: the names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teamster.agents.limits import Price, ProviderLimits, RunBudget
    from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Outcome, Succeeded
    from teamster.agents.runner import AgentRun, StepContext, run_agent
    from teamster.agents.spec import AgentSpec, Budget, Criterion, RetryPolicy, get_agent, register_agent
    from teamster.agents.tools import idempotency_key, tool
    from teamster.config.settings import TeamsterSettings, get_settings, load_settings
    from teamster.orchestrator.aclient import AsyncClient
    from teamster.orchestrator.client import Client, cancel, default_client, result, status, submit
    from teamster.orchestrator.escalation import fail_run, human_review, retry_with
    from teamster.orchestrator.models import (
        DeadLetterEntry,
        DeadLetterStatus,
        JournalEvent,
        RunRecord,
        RunStatus,
        StepRecord,
        StepStatus,
    )
    from teamster.orchestrator.workflow import Workflow, get_workflow

__all__ = [
    # agents
    "AgentSpec",
    "Budget",
    "Criterion",
    "RetryPolicy",
    "register_agent",
    "get_agent",
    "tool",
    "idempotency_key",
    "run_agent",
    "AgentRun",
    "StepContext",
    "Outcome",
    "Succeeded",
    "CannotComplete",
    "NeedsHuman",
    "Failed",
    # limits and budgets
    "ProviderLimits",
    "RunBudget",
    "Price",
    # workflows
    "Workflow",
    "get_workflow",
    "retry_with",
    "human_review",
    "fail_run",
    # client
    "Client",
    "AsyncClient",
    "default_client",
    "submit",
    "status",
    "result",
    "cancel",
    # records
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "DeadLetterEntry",
    "DeadLetterStatus",
    "JournalEvent",
    # settings
    "TeamsterSettings",
    "get_settings",
    "load_settings",
    "__version__",
]

_LAZY: dict[str, str] = {
    "Price": "teamster.agents.limits",
    "ProviderLimits": "teamster.agents.limits",
    "RunBudget": "teamster.agents.limits",
    "CannotComplete": "teamster.agents.outcomes",
    "Failed": "teamster.agents.outcomes",
    "NeedsHuman": "teamster.agents.outcomes",
    "Outcome": "teamster.agents.outcomes",
    "Succeeded": "teamster.agents.outcomes",
    "AgentRun": "teamster.agents.runner",
    "StepContext": "teamster.agents.runner",
    "run_agent": "teamster.agents.runner",
    "AgentSpec": "teamster.agents.spec",
    "Budget": "teamster.agents.spec",
    "Criterion": "teamster.agents.spec",
    "RetryPolicy": "teamster.agents.spec",
    "get_agent": "teamster.agents.spec",
    "register_agent": "teamster.agents.spec",
    "idempotency_key": "teamster.agents.tools",
    "tool": "teamster.agents.tools",
    "TeamsterSettings": "teamster.config.settings",
    "get_settings": "teamster.config.settings",
    "load_settings": "teamster.config.settings",
    "AsyncClient": "teamster.orchestrator.aclient",
    "Client": "teamster.orchestrator.client",
    "cancel": "teamster.orchestrator.client",
    "default_client": "teamster.orchestrator.client",
    "result": "teamster.orchestrator.client",
    "status": "teamster.orchestrator.client",
    "submit": "teamster.orchestrator.client",
    "fail_run": "teamster.orchestrator.escalation",
    "human_review": "teamster.orchestrator.escalation",
    "retry_with": "teamster.orchestrator.escalation",
    "DeadLetterEntry": "teamster.orchestrator.models",
    "DeadLetterStatus": "teamster.orchestrator.models",
    "JournalEvent": "teamster.orchestrator.models",
    "RunRecord": "teamster.orchestrator.models",
    "RunStatus": "teamster.orchestrator.models",
    "StepRecord": "teamster.orchestrator.models",
    "StepStatus": "teamster.orchestrator.models",
    "Workflow": "teamster.orchestrator.workflow",
    "get_workflow": "teamster.orchestrator.workflow",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            return version("teamster")
        except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
            return "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'teamster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
