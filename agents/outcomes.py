"""Explicit step outcomes and the structured-output envelope offered to the model.

Every agent step ends in exactly one :data:`Outcome`:

* :class:`Succeeded` -- output validated against the agent's output model and its success criteria;
* :class:`CannotComplete` -- the model said explicitly that it cannot do this with what it has;
* :class:`NeedsHuman` -- the model asked a question only a person can answer;
* :class:`Failed` -- a typed error (retryable or terminal).

The model never has to invent an answer: its structured-output contract (:func:`outcome_envelope`) offers
the ``cannot_complete`` and ``needs_human`` exits beside ``succeeded``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model, model_validator

from teamster.errors import TeamsterError

__all__ = [
    "Succeeded",
    "CannotComplete",
    "NeedsHuman",
    "Failed",
    "Outcome",
    "OUTCOME_ADAPTER",
    "OUTCOME_TOOL_NAME",
    "EnvelopeBase",
    "outcome_envelope",
    "failed_from",
]

OUTCOME_TOOL_NAME = "final_outcome"
"""Name of the structured-output tool the model calls to finish (same for every agent)."""

T = TypeVar("T", bound=BaseModel)


class _OutcomeBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Succeeded(_OutcomeBase):
    """The step produced an output that passed schema validation and every success criterion."""

    kind: Literal["succeeded"] = "succeeded"
    output: dict[str, Any]

    def parse(self, model: type[T]) -> T:
        """The output as an instance of ``model`` (the agent's output model)."""
        return model.model_validate(self.output)


class CannotComplete(_OutcomeBase):
    """The model declared it cannot complete the task ("I don't know" / missing information)."""

    kind: Literal["cannot_complete"] = "cannot_complete"
    reason: str


class NeedsHuman(_OutcomeBase):
    """The model needs a person to decide or answer before the work can go on."""

    kind: Literal["needs_human"] = "needs_human"
    question: str


class Failed(_OutcomeBase):
    """The step failed with a typed error.

    Attributes:
        error_type: Stable error code (see :mod:`config.errors`).
        message: Human-readable explanation.
        retryable: Whether the same work may succeed on a retry.
        details: Extra typed context (criterion name, budget kind, blocked tools, ...).
    """

    kind: Literal["failed"] = "failed"
    error_type: str
    message: str
    retryable: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


Outcome = Annotated[Succeeded | CannotComplete | NeedsHuman | Failed, Field(discriminator="kind")]
"""The union of every explicit step outcome (discriminated by ``kind``)."""

OUTCOME_ADAPTER: TypeAdapter[Succeeded | CannotComplete | NeedsHuman | Failed] = TypeAdapter(Outcome)


def failed_from(error: TeamsterError) -> Failed:
    """Build a :class:`Failed` outcome from a typed teamster error."""
    return Failed(error_type=error.code, message=error.message, retryable=error.retryable,
                  details=dict(error.details))


class EnvelopeBase(BaseModel):
    """Call this once, last, to finish the task.

    Set status to "succeeded" and fill output when you completed the task. If you cannot complete it with
    the information and tools you have, set status to "cannot_complete" and explain why in reason: do not
    guess. If a person must decide or answer something first, set status to "needs_human" and ask in
    question.
    """

    status: Literal["succeeded", "cannot_complete", "needs_human"] = Field(
        description="succeeded | cannot_complete | needs_human"
    )
    reason: str | None = Field(default=None, description="Why the task cannot be completed (cannot_complete).")
    question: str | None = Field(default=None, description="What a person must answer or decide (needs_human).")

    @model_validator(mode="after")
    def _exits_are_explicit(self) -> EnvelopeBase:
        output = getattr(self, "output", None)
        if self.status == "succeeded" and output is None:
            raise ValueError("status 'succeeded' requires 'output'")
        if self.status == "cannot_complete" and not (self.reason or "").strip():
            raise ValueError("status 'cannot_complete' requires a non-empty 'reason'")
        if self.status == "needs_human" and not (self.question or "").strip():
            raise ValueError("status 'needs_human' requires a non-empty 'question'")
        return self

    def to_outcome(self) -> Succeeded | CannotComplete | NeedsHuman:
        """The explicit outcome this envelope declares (success criteria are checked by the runner)."""
        if self.status == "cannot_complete":
            return CannotComplete(reason=str(self.reason))
        if self.status == "needs_human":
            return NeedsHuman(question=str(self.question))
        output = getattr(self, "output")  # noqa: B009 - declared on the generated subclass
        return Succeeded(output=output.model_dump(mode="json"))


@functools.lru_cache(maxsize=256)
def outcome_envelope(output_model: type[BaseModel]) -> type[EnvelopeBase]:
    """The structured-output model for an agent whose output model is ``output_model``.

    The generated class is named :data:`OUTCOME_TOOL_NAME` (strands names the tool after the class).
    """
    return create_model(  # type: ignore[call-overload,no-any-return]
        OUTCOME_TOOL_NAME,
        __base__=EnvelopeBase,
        __doc__=EnvelopeBase.__doc__,
        output=(output_model | None,  # type: ignore[arg-type]
                Field(default=None, description="The result (required when succeeded).")),
    )
