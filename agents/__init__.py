"""The agent contract: specs, outcomes, model providers, the scripted model, tool guards.

Define an agent in a few lines and run it against the offline scripted model::

    from pydantic import BaseModel
    from agents import AgentSpec, run_agent
    from agents.scripted import ScriptedModel, finish

    class Ticket(BaseModel):
        text: str

    class Triage(BaseModel):
        category: str

    triage = AgentSpec(name="triage", input_model=Ticket, output_model=Triage,
                       instructions="Classify the support ticket.")
    run = run_agent(triage, {"text": "My parcel never arrived"},
                    model=ScriptedModel([finish({"category": "shipping"})]))
    assert run.outcome.kind == "succeeded" and run.output.category == "shipping"
"""

from agents.guard import StepControl, StepGuard
from agents.outcomes import CannotComplete, Failed, NeedsHuman, Outcome, Succeeded
from agents.providers import build_model, check_provider
from agents.runner import AgentRun, StepContext, run_agent, validate_input
from agents.scripted import FaultPlan, ScriptedModel
from agents.spec import AgentSpec, Budget, Criterion, RetryPolicy, get_agent, register_agent
from agents.tools import idempotency_key, tool

__all__ = [
    "AgentSpec",
    "Budget",
    "Criterion",
    "RetryPolicy",
    "register_agent",
    "get_agent",
    "Outcome",
    "Succeeded",
    "CannotComplete",
    "NeedsHuman",
    "Failed",
    "run_agent",
    "AgentRun",
    "StepContext",
    "StepControl",
    "StepGuard",
    "validate_input",
    "build_model",
    "check_provider",
    "ScriptedModel",
    "FaultPlan",
    "tool",
    "idempotency_key",
]
