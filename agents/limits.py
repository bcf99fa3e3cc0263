"""What may be spent, and the gate every model call passes: provider limits, run budgets, prices.

* :class:`ProviderLimits` -- requests per minute, tokens per minute and concurrent calls for one provider and model
  (optionally per tenant): a provider's limits are per account, so every worker shares them (enforced through
  Redis by :mod:`teamster.orchestrator.limits`).
* :class:`RunBudget` -- what one run may spend across all its steps, fan-out branches, retries and escalations:
  model calls, tokens, cost.
* :class:`Price` -- what a model costs per million input and output tokens (``TEAMSTER_MODEL_PRICES``).
* :class:`ModelGate` -- what the runner asks before each live model call and tells after it. A gate may make the
  call wait for capacity (that is neither a failure nor an attempt), refuse it (:class:`~teamster.errors.
  RunBudgetExceeded`), and learns from the outcome (a 429 cools every worker down, repeated provider errors open a
  circuit breaker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from teamster.errors import TeamsterError

__all__ = ["ProviderLimits", "RunBudget", "Price", "Permit", "ModelGate", "cost_of"]


class ProviderLimits(BaseModel):
    """Limits of one provider and model, shared by every worker (0: no limit of that kind).

    Attributes:
        rpm: Requests per period (a sliding period: no interval of ``period_seconds`` holds more).
        tpm: Tokens per period (input + output; each call reserves an estimate, trued up after it).
        concurrency: Calls in flight at once (a slot of a killed worker frees itself when its lease lapses).
        period_seconds: The period ``rpm`` and ``tpm`` count over: a minute, as providers count, unless yours
            counts per second (or a test wants a short one).
        margin_seconds: Added to the period before a request's place is given to another: the provider counts a
            request when it arrives, some time after it was granted here (the network, a busy worker), so without a
            margin two requests granted a period apart may arrive in the same provider window. Default 0.25 s.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    concurrency: int = Field(default=0, ge=0)
    period_seconds: float = Field(default=60.0, gt=0, le=3600)
    margin_seconds: float = Field(default=0.25, ge=0, le=60)

    @property
    def limited(self) -> bool:
        """True when any limit is set."""
        return bool(self.rpm or self.tpm or self.concurrency)


class RunBudget(BaseModel):
    """What one run may spend in total (None: unbounded). A step whose model call would cross it ends as a typed
    ``run_budget_exceeded`` dead-letter entry with the spend so far.

    Attributes:
        max_model_calls: Live model calls of the whole run (retries and escalations included).
        max_tokens: Input + output tokens of the whole run.
        max_cost: Cost of the whole run, in the currency of ``TEAMSTER_MODEL_PRICES`` (USD by convention).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_model_calls: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost: float | None = Field(default=None, gt=0)


class Price(BaseModel):
    """Cost of a model per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


def cost_of(usage: dict[str, int], price: Price | None) -> float:
    """The cost of one call's token usage (0 when the model has no price)."""
    if price is None:
        return 0.0
    return (usage.get("inputTokens", 0) * price.input + usage.get("outputTokens", 0) * price.output) / 1_000_000


@dataclass
class Permit:
    """A granted model call: what it reserved, and how long it waited for capacity."""

    id: str
    model: str
    estimated_tokens: int
    waited_seconds: float = 0.0
    local: bool = False
    """Granted without asking Redis (nothing shared or budgeted applies to it)."""


class ModelGate(Protocol):
    """Asked before each live model call, told after it (see the module docstring)."""

    @property
    def waited_seconds(self) -> float:
        """Seconds this step has spent waiting for capacity (its deadline is extended by as much)."""
        ...

    async def acquire(self, model: str, estimated_tokens: int) -> Permit:
        """Wait for capacity and take it. Raises :class:`~teamster.errors.RunBudgetExceeded`, or a retryable
        error when no capacity came within the wait limit."""
        ...

    async def release(self, permit: Permit, usage: dict[str, int], error: TeamsterError | None) -> None:
        """Give the capacity back, with what the call really used and how it ended."""
        ...
