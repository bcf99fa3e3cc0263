"""Workflows and scripted agents used by the orchestrator tests (imported by test workers too).

Workers load this module through ``TEAMSTER_WORKFLOW_MODULES=tests.workflows``. Scripts decide by the input
text, so a test picks the path a run takes by what it submits.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field
from strands.types.tools import ToolContext

from teamster import AgentSpec, Budget, RetryPolicy, Workflow, fail_run, human_review, retry_with, tool
from teamster.agents.scripted import (
    ScriptContext,
    Turn,
    call,
    cannot_complete,
    finish,
    needs_human,
    register_script,
    say,
    throttle,
)
from teamster.agents.tools import idempotency_key
from teamster.config.settings import get_settings
from teamster.orchestrator.connection import redis_client
from teamster.testing import record_model_calls

# Workers count their scripted model calls in Redis (teamster.testing.model_calls_key): tests read them.
record_model_calls()

# ----------------------------------------------------------------------------- a tool with side effects


def effects_key(prefix: str, name: str) -> str:
    """The Redis hash of a test side-effect ledger (idempotency key -> value)."""
    return f"{prefix}:effects:{name}"


@tool
def record_effect(what: str, tool_context: ToolContext) -> dict[str, object]:
    """Apply a side effect once per idempotency key (counts attempts and applications in Redis)."""
    settings = get_settings()
    client = redis_client(settings)
    prefix = settings.key_prefix
    key = idempotency_key(tool_context)
    client.hincrby(effects_key(prefix, "attempts"), key, 1)
    if client.hsetnx(effects_key(prefix, "ledger"), key, what):
        client.hincrby(effects_key(prefix, "applied"), key, 1)
        return {"applied": True, "key": key}
    return {"applied": False, "key": key, "note": "already applied"}


# ----------------------------------------------------------------------------- models


class Doc(BaseModel):
    text: str
    items: list[str] = Field(default_factory=list)


class Summary(BaseModel):
    summary: str


class Label(BaseModel):
    label: str


class Item(BaseModel):
    item: str


class Check(BaseModel):
    item: str
    ok: bool


class LinearState(Doc):
    summarize: Summary | None = None
    label: Label | None = None
    report: str = ""


class LinearOut(BaseModel):
    summary: str
    label: str
    report: str


# ----------------------------------------------------------------------------- scripts


def _summarize(ctx: ScriptContext) -> Turn:
    text = str(ctx.input_json().get("text", ""))
    if "throttle-once" in text and ctx.attempt == 1:
        return throttle()
    if "throttle-always" in text:
        return throttle()
    if "side-effect" in text and ctx.call_index == 0:
        return call("record_effect", what=text)
    if "slow" in text:
        return finish({"summary": text[:40]}).after(float(text.split("slow")[1].split()[0]))
    if "unsure" in text:
        return cannot_complete("the document does not say")
    if "ask" in text:
        return needs_human("Which customer is this about?")
    return finish({"summary": text[:40]})


def _label(ctx: ScriptContext) -> Turn:
    text = str(ctx.input_json().get("text", ""))
    if "fallback-needed" in text:
        return cannot_complete("primary labeler cannot label this")
    return finish({"label": "urgent" if "urgent" in text else "normal"})


def _label_fallback(ctx: ScriptContext) -> Turn:
    return finish({"label": "fallback"})


def _check(ctx: ScriptContext) -> Turn:
    item = str(ctx.input_json().get("item", ""))
    if item.startswith("bad"):
        return cannot_complete(f"cannot check {item}")
    if ctx.call_index == 0 and item.startswith("talk"):
        return say("thinking")
    return finish({"item": item, "ok": True})


register_script("t_summarize", _summarize)
register_script("t_label", _label)
register_script("t_label_fallback", _label_fallback)
register_script("t_check", _check)

# ----------------------------------------------------------------------------- agents

summarize = AgentSpec(
    name="t_summarize", input_model=Doc, output_model=Summary, instructions="Summarise the text.",
    tools=("record_effect",), retry=RetryPolicy(max_attempts=3, backoff_base=0.2, backoff_max=0.5),
)
label = AgentSpec(name="t_label", input_model=Doc, output_model=Label, instructions="Label the text.",
                  budget=Budget(max_model_calls=3))
label_fallback = AgentSpec(name="t_label_fallback", input_model=Doc, output_model=Label,
                           instructions="Label the text (fallback).")
check = AgentSpec(name="t_check", input_model=Item, output_model=Check, instructions="Check the item.")


def _report(state: LinearState) -> dict[str, str]:
    label_text = state.label.label if state.label else "?"
    return {"report": f"{label_text}: {state.summarize.summary if state.summarize else ''}"}


linear = Workflow(
    "t_linear", input_model=Doc, state_model=LinearState, output_model=LinearOut,
    output=lambda s: {"summary": s.summarize.summary, "label": s.label.label, "report": s.report},
)
linear.step("summarize", summarize)
linear.step("label", label, after="summarize", writes="label")
linear.step("report", fn=_report, after="label")
linear.register()


def is_urgent(state: object) -> bool:
    return state.label.label == "urgent"  # type: ignore[attr-defined]


def is_normal(state: object) -> bool:
    return state.label.label != "urgent"  # type: ignore[attr-defined]


routed = Workflow("t_routed", input_model=Doc)
routed.step("label", label)
routed.step("escalate", fn=lambda s: {"text": s.text + " [paged on-call]"}, after="label", when=is_urgent)
routed.step("queue", fn=lambda s: {"text": s.text + " [queued]"}, after="label", when=is_normal)
routed.step("done", fn=lambda s: {"text": s.text + " [done]"}, after=["escalate", "queue"])
routed.register()

fanout = Workflow("t_fanout", input_model=Doc)
fanout.fan_out("check", check, over=lambda s: [{"item": i} for i in s.items])
fanout.join("checks", fan_out="check")
fanout.step("total", fn=lambda s: {"text": f"{len(s.checks)} checked"}, after="checks")
fanout.register()

human = Workflow("t_human", input_model=Doc)
human.step("summarize", summarize, escalate=[human_review()])
human.step("label", label, after="summarize")
human.register()

fallback = Workflow("t_fallback", input_model=Doc)
fallback.step("label", label, escalate=[retry_with(label_fallback), human_review()])
fallback.register()

# The alert goes to a list in memory (tests/test_orchestrator.py checks a webhook alert with its own workflow).
ALERTS: list[dict[str, object]] = []
failing = Workflow("t_failing", input_model=Doc)
failing.step("summarize", summarize,
             escalate=[fail_run(alert=ALERTS.append)])
failing.register()

slow_deadline = Workflow("t_deadline", input_model=Doc, deadline_seconds=1.0)
slow_deadline.step("summarize", summarize)
slow_deadline.register()

# ----------------------------------------------------------------------------- child workflows


def _child_input(state: Doc) -> dict[str, str]:
    """The child's input; "stall N" makes the parent step wait N s before it starts its child (worker-kill tests)."""
    if "stall" in state.text:
        time.sleep(float(state.text.split("stall")[1].split()[0]))
    return {"text": state.text}


# t_parent runs t_linear as a child run (its output, LinearOut, lands in the state field "sub") and goes on with it
parent = Workflow("t_parent", input_model=Doc)
parent.child("sub", "t_linear", inputs=_child_input)
parent.step("wrap", fn=lambda s: {"text": f"{s.text} => {s.sub.report}"}, after="sub")
parent.register()

parent_review = Workflow("t_parent_review", input_model=Doc)
parent_review.child("sub", linear, escalate=[human_review()])
parent_review.register()

# three levels: t_grand -> t_parent -> t_linear
grand = Workflow("t_grand", input_model=Doc)
grand.child("mid", parent)
grand.register()

parent_deadline = Workflow("t_parent_deadline", input_model=Doc, deadline_seconds=1.0)
parent_deadline.child("sub", "t_linear")
parent_deadline.register()

# a child that can stall past its own 1 s deadline (t_deadline), under a parent with the default deadline
parent_of_stalled = Workflow("t_parent_of_stalled", input_model=Doc)
parent_of_stalled.child("sub", "t_deadline")
parent_of_stalled.register()

# the parent's own step fails its run (fail_run) while its child run goes on
parent_failing = Workflow("t_parent_failing", input_model=Doc)
parent_failing.child("sub", "t_linear", inputs=lambda s: {"text": "all fine here"})
parent_failing.step("summarize", summarize, escalate=[fail_run()])
parent_failing.register()
