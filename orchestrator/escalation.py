"""Escalation policies: what happens after a step's failure has been dead-lettered.

Policies are declared per step and tried in order, each at most once per step: ``retry_with`` runs the step
again on a fallback agent or model; ``human_review`` pauses the run as ``needs_human`` until an operator
resolves the dead-letter entry; ``fail_run`` fails the run and calls an alert hook. When no policy is left
the run is ``escalated`` and waits for an operator. Whatever the policy, the dead-letter entry exists.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teamster.agents.spec import AgentSpec

__all__ = ["Policy", "RetryWith", "HumanReview", "FailRun", "retry_with", "human_review", "fail_run", "send_alert"]

log = logging.getLogger(__name__)

AlertHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RetryWith:
    """Run the step again with a fallback agent and/or model (fresh attempts)."""

    agent: str | None = None
    model: str | None = None

    def describe(self) -> str:
        parts = [f"agent={self.agent}" if self.agent else "", f"model={self.model}" if self.model else ""]
        return "retry_with(" + ", ".join(p for p in parts if p) + ")"


@dataclass(frozen=True)
class HumanReview:
    """Pause the run as ``needs_human`` until an operator resolves (or retries, or discards) the entry."""

    def describe(self) -> str:
        return "human_review()"


@dataclass(frozen=True)
class FailRun:
    """Fail the run and alert: ``alert`` is a callable taking the dead-letter entry, or a webhook URL."""

    alert: AlertHook | str | None = None

    def describe(self) -> str:
        return "fail_run()"


Policy = RetryWith | HumanReview | FailRun


def retry_with(agent: AgentSpec[Any, Any] | str | None = None, *, model: str | None = None) -> RetryWith:
    """Escalate by retrying on a fallback ``agent`` (spec or name) and/or ``model`` (provider string)."""
    if agent is None and model is None:
        raise ValueError("retry_with needs an agent or a model")
    name = agent.name if isinstance(agent, AgentSpec) else agent
    if isinstance(agent, AgentSpec):
        from teamster.agents.spec import register_agent  # noqa: PLC0415

        register_agent(agent)
    return RetryWith(agent=name, model=model)


def human_review() -> HumanReview:
    """Escalate to a person: the run waits as ``needs_human``."""
    return HumanReview()


def fail_run(alert: AlertHook | str | None = None) -> FailRun:
    """Escalate by failing the run; ``alert`` (callable or webhook URL) is told about it."""
    return FailRun(alert=alert)


def send_alert(policy: FailRun, entry: dict[str, Any]) -> None:
    """Run the alert hook of ``policy``; an alert failure is logged, never raised (the run already failed)."""
    log.error("teamster: run %s failed at step %s: %s: %s", entry.get("run_id"), entry.get("step_key"),
              entry.get("error_type"), entry.get("message"))
    target = policy.alert
    if target is None:
        return
    try:
        if callable(target):
            target(entry)
        else:
            body = json.dumps({"event": "teamster.run_failed", "entry": entry}, default=str).encode()
            request = urllib.request.Request(target, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - operator-configured URL
                pass
    except Exception:  # noqa: BLE001
        log.exception("teamster: alert hook failed for run %s", entry.get("run_id"))
