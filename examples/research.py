"""Example: a research brief -- a supervisor delegating to specialists, then a child workflow that drafts the brief.

    research_brief:  research (research_lead ──ask──> web_researcher, fact_checker)  ──>  draft (child run)
    brief_drafting:  write (brief_writer)  ──>  review (brief_editor, human review when it does not approve)

* ``research_lead`` decides at run time whom to ask: it delegates the question to ``web_researcher`` and the
  finding to ``fact_checker`` (each call a typed, budgeted, journaled sub-call: ``research/web_researcher#1`` in
  ``teamster runs show``). When the fact checker cannot verify a claim, the lead does not guess: it asks a person
  (``needs_human``).
* ``draft`` runs the ``brief_drafting`` workflow as a child run with the verified findings; the parent step is
  parked (no worker thread waits) and continues with the child's output. When the writer cannot write the brief
  (an embargoed topic), the child is escalated -- and the parent with it, linking the child's dead-letter entry.
* A run's budget caps the whole of it (delegations included): ``RunBudget(max_model_calls=20)``.

With ``TEAMSTER_MODEL=scripted`` (``teamster demo --example research``) the scripts below play the model,
deterministically: a topic mentioning a *rumour* cannot be verified (needs human); an *embargoed* topic cannot be
written (escalated through the child); the others succeed.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from teamster.agents.limits import RunBudget
from teamster.agents.scripted import ScriptContext, Turn, call, cannot_complete, finish, needs_human, register_script
from teamster.agents.spec import AgentSpec, Budget, RetryPolicy, register_agent
from teamster.orchestrator.escalation import human_review
from teamster.orchestrator.workflow import Workflow

__all__ = ["BriefRequest", "Brief", "research_brief", "brief_drafting", "SAMPLE_TOPICS"]

# ----------------------------------------------------------------------------- models


class BriefRequest(BaseModel):
    """What the application asks for."""

    topic: str = Field(min_length=3, max_length=300)
    audience: str = "executives"


class Question(BaseModel):
    question: str


class Finding(BaseModel):
    summary: str
    sources: list[str] = Field(default_factory=list)


class Claim(BaseModel):
    claim: str


class Verdict(BaseModel):
    verified: bool
    note: str


class ResearchNotes(BaseModel):
    findings: list[str] = Field(min_length=1)
    sources: list[str] = Field(default_factory=list)


class DraftRequest(BaseModel):
    """The child workflow's input."""

    topic: str
    audience: str
    findings: list[str]


class Draft(BaseModel):
    title: str = Field(min_length=3)
    body: str = Field(min_length=20)


class Review(BaseModel):
    approved: bool
    comments: str = ""


class Brief(BaseModel):
    """The child workflow's output, and the parent's."""

    title: str
    body: str
    approved: bool


class DraftingState(DraftRequest):
    write: Draft | None = None
    review: Review | None = None


class ResearchState(BriefRequest):
    research: ResearchNotes | None = None
    draft: Brief | None = None


# ----------------------------------------------------------------------------- agents

web_researcher = register_agent(AgentSpec(
    name="web_researcher", version="1", input_model=Question, output_model=Finding,
    instructions="Research the question and summarise what matters, with sources.",
    budget=Budget(max_model_calls=3, max_tool_calls=0, timeout_seconds=120)))
fact_checker = register_agent(AgentSpec(
    name="fact_checker", version="1", input_model=Claim, output_model=Verdict,
    instructions="Verify the claim against independent sources. If none confirms it, say you cannot complete.",
    budget=Budget(max_model_calls=3, max_tool_calls=0, timeout_seconds=120)))
research_lead = AgentSpec(
    name="research_lead", version="1", input_model=BriefRequest, output_model=ResearchNotes,
    instructions=("You lead a research brief. Ask web_researcher what matters about the topic, then ask "
                  "fact_checker to verify the main finding. Report only verified findings; if a finding cannot be "
                  "verified, ask a person whether to publish it."),
    delegates=("web_researcher", "fact_checker"),
    budget=Budget(max_model_calls=4, max_tool_calls=3, timeout_seconds=240),
    retry=RetryPolicy(max_attempts=3, backoff_base=0.5, backoff_max=5))
brief_writer = AgentSpec(
    name="brief_writer", version="1", input_model=DraftRequest, output_model=Draft,
    instructions="Write a one-page brief for the audience from the findings only. Refuse embargoed topics.",
    budget=Budget(max_model_calls=3, max_tool_calls=0, timeout_seconds=120))
brief_editor = AgentSpec(
    name="brief_editor", version="1", input_model=DraftingState, output_model=Review,
    instructions="Check the brief is accurate to the findings and fit for its audience.",
    budget=Budget(max_model_calls=3, max_tool_calls=0, timeout_seconds=120))


def _brief(state: DraftingState) -> Brief:
    assert state.write is not None and state.review is not None
    return Brief(title=state.write.title, body=state.write.body, approved=state.review.approved)


brief_drafting = Workflow("brief_drafting", input_model=DraftRequest, state_model=DraftingState, output_model=Brief,
                          output=_brief)
brief_drafting.step("write", brief_writer)
brief_drafting.step("review", brief_editor, after="write", inputs=lambda s: s, escalate=[human_review()])
brief_drafting.register()


def _notes_to_draft(state: ResearchState) -> dict[str, object]:
    assert state.research is not None
    return {"topic": state.topic, "audience": state.audience, "findings": state.research.findings}


def _final(state: ResearchState) -> Brief:
    assert state.draft is not None
    return state.draft


research_brief = Workflow("research_brief", input_model=BriefRequest, state_model=ResearchState, output_model=Brief,
                          output=_final, budget=RunBudget(max_model_calls=20))
research_brief.step("research", research_lead)
research_brief.child("draft", brief_drafting, inputs=_notes_to_draft, after="research")
research_brief.register()

# ----------------------------------------------------------------------------- the scripted model's part

SAMPLE_TOPICS: list[dict[str, str]] = [
    {"topic": "solid-state batteries for delivery vans", "audience": "fleet managers"},
    {"topic": "heat pumps in cold climates", "audience": "city planners"},
    {"topic": "a rumour that our supplier is being acquired", "audience": "procurement"},
    {"topic": "embargoed quarterly earnings", "audience": "investors"},
]


def _lead(ctx: ScriptContext) -> Turn:
    topic = str(ctx.input_json().get("topic", ""))
    if not ctx.tool_results:
        return call("ask_web_researcher", question=f"What matters about {topic}?")
    first = json.loads(ctx.tool_results[0])
    finding = str(first.get("output", {}).get("summary", ""))
    if len(ctx.tool_results) == 1:
        return call("ask_fact_checker", claim=finding)
    verdict = json.loads(ctx.tool_results[1])
    if verdict.get("status") != "succeeded" or not verdict.get("output", {}).get("verified"):
        why = verdict.get("reason") or verdict.get("output", {}).get("note") or "no verdict"
        return needs_human(f"The fact checker could not verify '{finding}' ({why}). Publish it anyway?")
    return finish({"findings": [finding], "sources": first.get("output", {}).get("sources", [])})


def _researcher(ctx: ScriptContext) -> Turn:
    question = str(ctx.input_json().get("question", ""))
    topic = question.removeprefix("What matters about ").rstrip("?")
    summary = (f"Unconfirmed: {topic}" if "rumour" in topic else
               f"{topic}: costs fell 30% in three years and adoption doubled")
    return finish({"summary": summary, "sources": ["https://example.org/report-2026"]})


def _checker(ctx: ScriptContext) -> Turn:
    claim = str(ctx.input_json().get("claim", ""))
    if claim.startswith("Unconfirmed"):
        return cannot_complete("no independent source confirms it")
    return finish({"verified": True, "note": "confirmed by two independent sources"})


def _writer(ctx: ScriptContext) -> Turn:
    data = ctx.input_json()
    topic = str(data.get("topic", ""))
    if "embargoed" in topic:
        return cannot_complete(f"'{topic}' is under embargo: no brief may be written before its release")
    findings = "; ".join(str(f) for f in data.get("findings", []))
    return finish({"title": f"Brief: {topic}", "body": f"For {data.get('audience')}: {findings}."})


register_script("research_lead", _lead)
register_script("web_researcher", _researcher)
register_script("fact_checker", _checker)
register_script("brief_writer", _writer)
register_script("brief_editor", lambda ctx: finish({"approved": True, "comments": "accurate and clear"}))
