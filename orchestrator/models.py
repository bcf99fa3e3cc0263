"""Typed records of the run store: runs, steps, dead-letter entries, journal events.

These are the only shapes that cross process boundaries or are written to Redis (invariant I5: JSON, always
through a pydantic model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "RunStatus",
    "StepStatus",
    "DeadLetterStatus",
    "RUN_TERMINAL",
    "RUN_WAITING",
    "STEP_TERMINAL",
    "STEP_DONE",
    "STEP_OPEN",
    "RunRecord",
    "StepRecord",
    "DeadLetterEntry",
    "JournalEvent",
    "StepMessage",
    "StartRunMessage",
    "Delivery",
    "StepExecution",
    "now",
]


def now() -> float:
    """Wall-clock time in seconds (what every timestamp in the store uses)."""
    return time.time()


class RunStatus(StrEnum):
    """Run lifecycle: pending -> running -> succeeded | failed | escalated | needs_human | cancelled.

    ``escalated`` and ``needs_human`` wait for an operator (dead-letter retry/resolve/discard) and may go back
    to ``running``; ``succeeded``, ``failed`` and ``cancelled`` are final.
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ESCALATED = "escalated"
    NEEDS_HUMAN = "needs_human"
    CANCELLED = "cancelled"


RUN_TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
RUN_WAITING = frozenset({RunStatus.ESCALATED, RunStatus.NEEDS_HUMAN})


class StepStatus(StrEnum):
    """Step lifecycle: queued -> running -> (retrying -> running)* -> one terminal outcome.

    A child step (:meth:`~teamster.orchestrator.workflow.Workflow.child`) is ``parked`` between starting its child
    run and that run settling: no worker thread, no lease; the child's settling transaction queues it again.
    """

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    PARKED = "parked"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANNOT_COMPLETE = "cannot_complete"
    NEEDS_HUMAN = "needs_human"
    CANCELLED = "cancelled"


STEP_TERMINAL = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED,
                           StepStatus.CANNOT_COMPLETE, StepStatus.NEEDS_HUMAN, StepStatus.CANCELLED})
STEP_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})
"""Statuses that let successors proceed."""
STEP_OPEN = frozenset({StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.PARKED})
"""Statuses of a step that has not ended yet (a parked step is open but cannot be claimed)."""


class DeadLetterStatus(StrEnum):
    """``open`` entries wait for an operator; the others record how they were closed."""

    OPEN = "open"
    AUTO_RETRIED = "auto_retried"
    RETRIED = "retried"
    RESOLVED = "resolved"
    DISCARDED = "discarded"


class RunRecord(BaseModel):
    """A run as stored (``{prefix}:run:{run_id}``)."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    workflow: str
    workflow_version: str = "1"
    workflow_module: str | None = None
    status: RunStatus = RunStatus.PENDING
    input: dict[str, Any] = Field(default_factory=dict)
    state: dict[str, Any] = Field(default_factory=dict)
    state_version: int = 0
    state_schema: str = ""
    branches: dict[str, int] = Field(default_factory=dict)
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    trace_id: str = ""
    idempotency_key: str | None = None
    dead_letters: int = 0
    """Dead-letter entries ever written for the run (open or closed)."""
    budget: dict[str, Any] | None = None
    """The run's :class:`~teamster.agents.limits.RunBudget` (its workflow's, or the one given to submit)."""
    tenant: str | None = None
    """The value of the workflow's ``tenant_key`` in the input: provider limits are kept per tenant."""
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    finished_at: float | None = None
    progress_at: float = Field(default_factory=now)
    parent_run: str | None = None
    """For a child run: the run whose child step started it (woken when this run settles)."""
    parent_step: str | None = None
    """For a child run: the step key of that child step."""


class StepRecord(BaseModel):
    """One step of a run (``{prefix}:run:{run_id}:step:{step_key}``).

    ``step_key`` equals the workflow step id, or ``{fan_out_id}[{i}]`` for a fan-out branch.
    """

    model_config = ConfigDict(extra="ignore")

    run_id: str
    step_key: str
    step_id: str
    kind: str = "agent"
    label: str | None = None
    """``workflow.step_id[:agent]``: the name step messages carry for Flower and the worker log."""
    branch_index: int | None = None
    input: Any = None
    status: StepStatus = StepStatus.QUEUED
    attempts: int = 0
    attempt_base: int = 0
    fence: int = 0
    lease_expiries: int = 0
    lease_until: float | None = None
    """While running: when its worker's lease runs out (Redis server time; renewed every lease_seconds/3)."""
    worker: str | None = None
    queued_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    next_retry_at: float | None = None
    outcome: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    reason: str | None = None
    agent: str | None = None
    fallback: dict[str, Any] | None = None
    escalations_used: int = 0
    branches: int | None = None
    model_calls: int = 0
    live_model_calls: int = 0
    tool_calls: int = 0
    tokens: int = 0
    spend_calls: int = 0
    """Live model calls of the step over all its attempts (what counts against the run's budget)."""
    spend_tokens: int = 0
    spend_cost: float = 0.0
    """Cost of the step's live model calls over all its attempts (``TEAMSTER_MODEL_PRICES``)."""
    duration_seconds: float | None = None
    resolved_by: str | None = None
    waiting_for: str | None = None
    """Set while a running step waits for provider capacity (limits, a cool-down, an open breaker)."""
    waiting_since: float | None = None
    child_run: str | None = None
    """For a child step: the child run it started (set when the step parks; the same run for every attempt)."""
    parked_at: float | None = None


class DeadLetterEntry(BaseModel):
    """Everything needed to understand and replay a failure (invariant I6)."""

    model_config = ConfigDict(extra="ignore")

    entry_id: str
    run_id: str
    workflow: str
    workflow_module: str | None = None
    step_key: str
    step_id: str
    agent: str | None = None
    status: DeadLetterStatus = DeadLetterStatus.OPEN
    kind: str = "failure"
    error_type: str
    message: str
    retryable: bool = False
    details: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 0
    input: dict[str, Any] | None = None
    state_version: int = 0
    trace_id: str = ""
    escalation: str = ""
    created_at: float = Field(default_factory=now)
    closed_at: float | None = None
    closed_by: str | None = None
    close_reason: str | None = None
    journal_excerpt: list[dict[str, Any]] = Field(default_factory=list)
    question: str | None = None


class JournalEvent(BaseModel):
    """One journal entry (a Redis Stream entry of ``{prefix}:journal:{run_id}``)."""

    id: str = ""
    type: str
    ts: float = Field(default_factory=now)
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class StepMessage(BaseModel):
    """The step task's payload: which step of which run (the state itself is read from the store)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    step_key: str = Field(min_length=1, max_length=300)


class StartRunMessage(BaseModel):
    """Payload of ``teamster.start_run`` for plain Celery clients (``send_task`` with JSON kwargs)."""

    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(min_length=1)
    input: dict[str, Any]
    idempotency_key: str | None = Field(default=None, max_length=200)


class Delivery(StrEnum):
    """What one delivery of a step message did (:class:`StepExecution`)."""

    COMMITTED = "committed"
    SKIPPED = "skipped"
    RETRY = "retry"
    DEAD_LETTERED = "dead_lettered"
    REQUEUED = "requeued"
    """Dead-lettered and sent again by a ``retry_with`` escalation."""
    ALREADY_DONE = "already_done"
    """A redelivery of a step that had ended: nothing ran."""
    DUPLICATE = "duplicate_in_progress"
    """Another live worker holds the step's lease."""
    PARKED = "parked"
    """A child step started (or waits for) its child run and released its thread and lease."""
    STALE = "stale"
    """The commit was rejected (stale fencing token, or the step ended meanwhile)."""
    LEASE_LOST = "lease_lost"
    RUN_FINAL = "run_final"
    MISSING = "missing"


@dataclass
class StepExecution:
    """What one delivery of a step did (the step task returns it as JSON)."""

    status: Delivery
    run_id: str
    step_key: str
    step_status: StepStatus | None = None
    retry_in: float | None = None
    attempt: int | None = None
    outcome: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``None`` and empty fields left out)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if value in (None, {}):
                continue
            out[key] = value.value if isinstance(value, StrEnum) else value
        return out
