"""Every error teamster raises, in one module, grouped by who handles it.

* **Errors a client handles** (:class:`ClientError`): what ``submit``, ``status``, ``result``, ``cancel`` and the
  operator calls raise -- :class:`InvalidInput` (nothing was written), :class:`PayloadRejected`,
  :class:`IdempotencyConflict`, :class:`RunNotFound`, :class:`RunFailed` (with the dead-letter reason),
  :class:`RunTimeout`, :class:`StoreUnavailable`, :class:`DeadLetterNotFound`, :class:`InvalidOperation`.
* **Errors a step ends with** (:class:`StepError`): the typed reason of a failed attempt, recorded in the journal,
  the dead-letter queue and metrics. :class:`RetryableError` (throttling, timeouts, provider 5xx, Redis briefly
  unreachable) retries with backoff up to the step's policy; :class:`TerminalError` (invalid output, budget
  breach, failed criterion, cannot complete, ...) goes to the dead-letter queue.
* **Configuration errors** (:class:`ConfigurationError`): the deployment or the code is wrong (missing
  credentials, unknown workflow, invalid settings). Retrying will not help; fix the configuration.

Every class has a stable, registered ``code`` (``snake_case``): what crosses process boundaries and what the
dead-letter queue, the journal and metrics record. :func:`error_from_code` maps a code back to its class, and
:data:`ERROR_CODES` lists them all.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "TeamsterError",
    # errors a client handles
    "ClientError",
    "InvalidInput",
    "PayloadRejected",
    "IdempotencyConflict",
    "RunNotFound",
    "RunFailed",
    "RunTimeout",
    "StoreUnavailable",
    "StoreDataLost",
    "DeadLetterNotFound",
    "InvalidOperation",
    # errors a step ends with
    "StepError",
    "RetryableError",
    "ModelThrottled",
    "ModelTimeout",
    "ProviderUnavailable",
    "StepTimeout",
    "LeaseBusy",
    "TerminalError",
    "InvalidOutput",
    "StructuredOutputError",
    "MaxTokensReached",
    "ContextOverflow",
    "BudgetExceeded",
    "GuardrailIntervened",
    "CriterionFailed",
    "ToolNotAllowed",
    "ToolFailed",
    "ProviderRejected",
    "FunctionError",
    "StepCannotComplete",
    "StepNeedsHuman",
    "StepCancelled",
    "RunDeadlineExceeded",
    "RunBudgetExceeded",
    "ChildRunFailed",
    "UnexpectedError",
    "LeaseLost",
    "LeaseExpiredRepeatedly",
    "StaleFencingToken",
    "AlreadyCommitted",
    # configuration errors
    "ConfigurationError",
    "InvalidSettings",
    "MissingCredentials",
    "MissingExtra",
    "UnknownWorkflow",
    "UnknownAgent",
    "UnknownTool",
    "WorkflowDefinitionError",
    "ModelRequestBlocked",
    "error_from_code",
    "ERROR_CODES",
]


class TeamsterError(Exception):
    """Base of every teamster error.

    Attributes:
        code: Stable machine-readable identifier of the error kind.
        retryable: Whether retrying the same work may succeed.
        hint: One line telling the user what to do about it (shown by the CLI).
    """

    code: ClassVar[str] = "teamster_error"
    retryable: ClassVar[bool] = False
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (what the journal and DLQ store)."""
        return {
            "error_type": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "hint": self.hint,
            "details": self.details,
        }

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- errors a client handles


class ClientError(TeamsterError):
    """Raised to an application or operator by the client API and the CLI."""

    code = "client_error"


class InvalidInput(ClientError):
    """An input failed validation against its pydantic model, or cannot be stored. Nothing was written or
    enqueued. (A step whose own input fails validation ends with this code too.)"""

    code = "invalid_input"


class PayloadRejected(ClientError):
    """A message crossing a process boundary was refused (not JSON, pickle, oversized, malformed)."""

    code = "payload_rejected"


class IdempotencyConflict(ClientError):
    """An idempotency key was reused with a different input; the existing run was left alone."""

    code = "idempotency_conflict"
    default_hint = "Use a new idempotency key for a different input."


class RunNotFound(ClientError):
    """No run has that id."""

    code = "run_not_found"
    default_hint = "List runs with `teamster runs list`."


class RunFailed(ClientError):
    """A run ended without succeeding; carries its status and the dead-letter reason.

    Attributes:
        run_id: The run.
        status: Its terminal status (``failed``, ``escalated``, ``needs_human``, ``cancelled``).
        reason: The typed reason, usually the dead-letter entry's error.
    """

    code = "run_failed"

    def __init__(self, message: str, *, run_id: str, status: str, reason: dict[str, Any] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint, run_id=run_id, status=status, reason=reason)
        self.run_id = run_id
        self.status = status
        self.reason = reason or {}


class RunTimeout(ClientError):
    """Waiting for a run's result timed out; the run itself goes on."""

    code = "run_timeout"
    retryable = True


class StoreDataLost(ClientError):
    """Redis no longer holds data teamster wrote (restarted without persistence, flushed, or evicting keys)."""

    code = "store_data_lost"
    default_hint = ("Runs written before that are gone. Run Redis with persistence (appendonly yes) and "
                    "maxmemory-policy noeviction; `teamster doctor` checks both.")


class DeadLetterNotFound(ClientError):
    """No dead-letter entry has that id."""

    code = "dead_letter_not_found"
    default_hint = "List entries with `teamster dlq list --all`."


class InvalidOperation(ClientError):
    """The operation does not apply to the object in its current state (e.g. resolving a resolved entry)."""

    code = "invalid_operation"


# --------------------------------------------------------------------------- errors a step ends with


class StepError(TeamsterError):
    """The typed reason a step attempt ended without success."""

    code = "step_error"


class RetryableError(StepError):
    """A transient failure: retrying the same work with backoff may succeed."""

    code = "retryable_error"
    retryable = True


class ModelThrottled(RetryableError):
    """The model provider throttled the request."""

    code = "model_throttled"


class ModelTimeout(RetryableError):
    """The model provider did not answer in time (connect or read timeout), or the step's deadline passed."""

    code = "model_timeout"


class StepTimeout(RetryableError):
    """The step ran past its wall-clock deadline (``Budget.timeout_seconds``) and was stopped: its model call or
    tool was cancelled (or, for a blocking tool, abandoned). Retried like any timeout, up to the step's policy."""

    code = "step_timeout"


class ProviderUnavailable(RetryableError):
    """The model provider failed transiently (5xx, connection reset, service unavailable)."""

    code = "provider_unavailable"


class StoreUnavailable(RetryableError, ClientError):
    """Redis (broker and run store) could not be reached."""

    code = "store_unavailable"
    default_hint = "Is Redis running and TEAMSTER_REDIS_URL right? `teamster doctor` checks it."


class LeaseBusy(RetryableError):
    """Another live worker holds the step's lease; this delivery is a duplicate."""

    code = "lease_busy"


class TerminalError(StepError):
    """The work cannot succeed as asked; it goes to the dead-letter queue."""

    code = "terminal_error"


class InvalidOutput(TerminalError):
    """A step's output failed validation against its output model."""

    code = "invalid_output"


class StructuredOutputError(TerminalError):
    """The model did not produce valid structured output within its budget of re-asks."""

    code = "structured_output_error"


class MaxTokensReached(TerminalError):
    """The model hit its output-token limit before finishing."""

    code = "max_tokens"


class ContextOverflow(TerminalError):
    """The input does not fit the model's context window."""

    code = "context_overflow"


class BudgetExceeded(TerminalError):
    """A step exceeded one of its budgets (model calls, tool calls, tokens, wall time)."""

    code = "budget_exceeded"


class GuardrailIntervened(TerminalError):
    """The provider's guardrail or content filter stopped the response."""

    code = "guardrail_intervened"


class CriterionFailed(TerminalError):
    """A success criterion of the agent rejected the output."""

    code = "criterion_failed"


class ToolNotAllowed(TerminalError):
    """The model asked for a tool outside the agent's allow-list (blocked and recorded)."""

    code = "tool_not_allowed"


class ToolFailed(TerminalError):
    """A tool failed in a way the agent could not recover from."""

    code = "tool_failed"


class ProviderRejected(TerminalError):
    """The provider rejected the request itself (4xx other than throttling: bad request, access denied)."""

    code = "provider_rejected"


class FunctionError(TerminalError):
    """A function, fan-out or join step (plain code over the state) raised."""

    code = "function_error"


class StepCannotComplete(TerminalError):
    """The agent said explicitly that it cannot complete the step (its reason is the message)."""

    code = "cannot_complete"


class StepNeedsHuman(TerminalError):
    """The agent asked a question only a person can answer (the question is the message)."""

    code = "needs_human"


class StepCancelled(TerminalError):
    """The step was stopped because its run was cancelled."""

    code = "cancelled"


class RunDeadlineExceeded(TerminalError):
    """The run made no progress past its deadline; the watchdog escalated it."""

    code = "run_deadline_exceeded"


class UnexpectedError(TerminalError):
    """An exception teamster does not know how to classify (terminal, so it is dead-lettered and seen)."""

    code = "unexpected_error"


class RunBudgetExceeded(TerminalError):
    """A model call would have crossed the run's budget (calls, tokens or cost across all its steps); its details
    hold the spend so far and the budget."""

    code = "run_budget_exceeded"


class ChildRunFailed(TerminalError):
    """The child run a child step started did not succeed (escalated, needs_human, failed, cancelled, or gone); its
    details link the child run (``child_run``), its status (``child_status``) and its dead-letter entry
    (``child_entry``), so fixing the child and retrying the parent's entry picks up the child's output."""

    code = "child_run_failed"
    default_hint = ("Look at the child run's dead-letter entry (`teamster dlq show CHILD_ENTRY`); once the child "
                    "succeeds, retry the parent's entry: it takes the child's output without starting it again.")


class LeaseLost(TerminalError):
    """The worker lost the step's lease while running it; another worker owns the step now."""

    code = "lease_lost"


class LeaseExpiredRepeatedly(TerminalError):
    """The step's lease expired too many times: it keeps killing or hanging its workers (poison pill)."""

    code = "lease_expired_repeatedly"


class StaleFencingToken(TerminalError):
    """A commit carried a fencing token that is no longer current; it was rejected."""

    code = "stale_fencing_token"


class AlreadyCommitted(TerminalError):
    """The step already has a committed result; nothing was written again."""

    code = "already_committed"


# --------------------------------------------------------------------------- configuration errors


class ConfigurationError(TeamsterError):
    """The deployment or the code is misconfigured; fix it, do not retry."""

    code = "configuration_error"


class InvalidSettings(ConfigurationError):
    """A ``TEAMSTER_*`` setting has an invalid value or settings contradict each other."""

    code = "invalid_settings"
    default_hint = "Check the TEAMSTER_* environment variables (`teamster doctor` lists them)."


class MissingCredentials(ConfigurationError):
    """A model provider needs credentials that are not configured."""

    code = "missing_credentials"


class MissingExtra(ConfigurationError):
    """A model provider needs an optional dependency that is not installed."""

    code = "missing_extra"


class UnknownWorkflow(ConfigurationError):
    """No workflow is registered under that name."""

    code = "unknown_workflow"
    default_hint = "Is the module defining it listed in TEAMSTER_WORKFLOW_MODULES?"


class UnknownAgent(ConfigurationError):
    """No agent spec is registered under that name."""

    code = "unknown_agent"


class UnknownTool(ConfigurationError):
    """An agent's allow-list names a tool that is not in the tool registry."""

    code = "unknown_tool"


class ModelRequestBlocked(ConfigurationError):
    """A step asked for a real model provider while real model requests are blocked (``teamster.testing``)."""

    code = "model_request_blocked"
    default_hint = "Give the agent a script or model in the test (env.override(...)), or allow real requests."


class WorkflowDefinitionError(ConfigurationError):
    """A workflow is invalid (cycle, unknown step, missing join, ...); raised when it is registered."""

    code = "workflow_definition_error"


def _all_subclasses(cls: type[TeamsterError]) -> list[type[TeamsterError]]:
    out: list[type[TeamsterError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERROR_CODES: dict[str, type[TeamsterError]] = {c.code: c for c in _all_subclasses(TeamsterError)}


def error_from_code(code: str, message: str, **details: Any) -> TeamsterError:
    """Rebuild a typed error from its stable code (unknown codes become a plain :class:`TerminalError`)."""
    cls = ERROR_CODES.get(code, TerminalError)
    if cls is RunFailed:
        return TerminalError(message, **details)
    return cls(message, **details)
