"""Example: support-ticket triage, a four-agent pipeline with a lookup tool, routing and escalations.

    classify ──> extract_order (only for order tickets; tool: lookup_order) ──> draft_reply ──> policy_review

* ``classify`` labels the ticket (category, urgency, order id) and tags it in the helpdesk (a side effect
  made idempotent by the tool's idempotency key).
* ``extract_order`` looks the order up; if the order system does not know it, the agent says it *cannot
  complete* instead of inventing facts: the run is escalated to the dead-letter queue.
* ``draft_reply`` writes the answer; ``policy_review`` approves it, or -- for refunds above the
  auto-approval limit -- asks a human (the run waits as ``needs_human`` until an operator resolves it).

The same workflow runs on any provider (``TEAMSTER_MODEL=bedrock:...``, ``openai:...``); with
``TEAMSTER_MODEL=scripted`` the scripts below play the model, deterministically: ticket ``T-1007`` is
throttled on its first classification (and recovers on the retry), an unknown order id ends in
``cannot_complete``, a refund above $500 needs a human.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field
from strands.types.tools import ToolContext

from teamster.agents.scripted import (
    ScriptContext,
    Turn,
    call,
    cannot_complete,
    finish,
    needs_human,
    register_script,
    throttle,
)
from teamster.agents.spec import AgentSpec, Budget, Criterion, RetryPolicy
from teamster.agents.tools import idempotency_key, tool
from teamster.orchestrator.escalation import human_review
from teamster.orchestrator.workflow import Workflow

__all__ = ["Ticket", "TriageResult", "triage", "ORDERS", "SAMPLE_TICKETS", "REFUND_LIMIT"]

REFUND_LIMIT = 500.0

# ----------------------------------------------------------------------------- models


class Ticket(BaseModel):
    """A support ticket as the helpdesk sends it."""

    ticket_id: str = Field(min_length=1, max_length=64)
    customer: str = Field(min_length=1)
    subject: str
    body: str = Field(min_length=1, max_length=20_000)


class Classification(BaseModel):
    category: Literal["order", "billing", "technical", "other"]
    urgency: Literal["low", "normal", "high"]
    order_id: str | None = None
    refund_amount: float | None = Field(default=None, ge=0)


class OrderFacts(BaseModel):
    order_id: str
    status: str
    carrier: str | None = None
    eta: str | None = None


class Draft(BaseModel):
    subject: str = Field(min_length=1)
    body: str = Field(min_length=20)


class Review(BaseModel):
    approved: bool
    issues: list[str] = Field(default_factory=list)


class TriageState(Ticket):
    classify: Classification | None = None
    extract_order: OrderFacts | None = None
    draft_reply: Draft | None = None
    policy_review: Review | None = None


class TriageResult(BaseModel):
    """What the helpdesk gets back."""

    ticket_id: str
    category: str
    urgency: str
    reply_subject: str
    reply_body: str
    approved: bool


class DraftInput(BaseModel):
    customer: str
    subject: str
    body: str
    classify: Classification
    extract_order: OrderFacts | None = None


class ReviewInput(BaseModel):
    classify: Classification
    draft_reply: Draft


# ----------------------------------------------------------------------------- tools

ORDERS: dict[str, dict[str, str]] = {
    "A1001": {"status": "shipped", "carrier": "DHL", "eta": "2026-11-27"},
    "A1002": {"status": "processing", "carrier": "", "eta": "2026-11-30"},
    "A1003": {"status": "delivered", "carrier": "UPS", "eta": "2026-11-20"},
    "A1004": {"status": "returned", "carrier": "UPS", "eta": ""},
}


@tool
def lookup_order(order_id: str) -> dict[str, str] | str:
    """Look up an order in the order system by its id (e.g. A1001)."""
    order = ORDERS.get(order_id.strip().upper())
    if order is None:
        return f"Error: order {order_id} not found"
    return {"order_id": order_id.upper(), **order}


_TAGS: dict[str, str] = {}


@tool
def tag_ticket(ticket_id: str, tag: str, tool_context: ToolContext) -> dict[str, object]:
    """Tag a ticket in the helpdesk (idempotent: a redelivered step does not tag twice)."""
    key = idempotency_key(tool_context)
    first = key not in _TAGS
    _TAGS.setdefault(key, f"{ticket_id}:{tag}")
    return {"ticket_id": ticket_id, "tag": tag, "applied": first}


# ----------------------------------------------------------------------------- agents

classify = AgentSpec(
    name="triage_classify", version="1", input_model=Ticket, output_model=Classification,
    instructions=("You triage customer support tickets. Decide the category (order, billing, technical, other) "
                  "and urgency, extract the order id (like A1001) and any refund amount asked for, and tag the "
                  "ticket with its category using tag_ticket."),
    tools=("tag_ticket",), budget=Budget(max_model_calls=4, max_tool_calls=2, timeout_seconds=120),
    retry=RetryPolicy(max_attempts=3, backoff_base=0.5, backoff_max=5),
)
extract_order = AgentSpec(
    name="triage_extract_order", version="1", input_model=Classification, output_model=OrderFacts,
    instructions=("Look the order up with lookup_order and report its status, carrier and ETA exactly as the "
                  "order system says. If the order cannot be found, say you cannot complete the task."),
    tools=("lookup_order",), budget=Budget(max_model_calls=4, max_tool_calls=3, timeout_seconds=120),
    criteria=(Criterion("status_known", lambda out, _in: out.status in {o["status"] for o in ORDERS.values()},
                        "the order status must be one the order system uses"),),
)
draft_reply = AgentSpec(
    name="triage_draft_reply", version="1", input_model=DraftInput, output_model=Draft,
    instructions=("Write a short, friendly reply to the customer. Use only the facts given; never promise a "
                  "refund or a date the order system did not give."),
    budget=Budget(max_model_calls=3, max_tool_calls=0, timeout_seconds=120),
)
policy_review = AgentSpec(
    name="triage_policy_review", version="1", input_model=ReviewInput, output_model=Review,
    instructions=(f"Review the reply against policy: no legal advice, no promises beyond the facts, refunds "
                  f"above ${REFUND_LIMIT:.0f} need a human decision (ask for it)."),
    budget=Budget(max_model_calls=3, max_tool_calls=0, timeout_seconds=120),
    criteria=(Criterion("approved", lambda out, _in: out.approved, "the reply was not approved by policy"),),
)


def is_order_ticket(state: TriageState) -> bool:
    """Route order tickets through the order lookup."""
    return state.classify is not None and state.classify.category == "order"


def _result(state: TriageState) -> TriageResult:
    assert state.classify and state.draft_reply and state.policy_review
    return TriageResult(ticket_id=state.ticket_id, category=state.classify.category, urgency=state.classify.urgency,
                        reply_subject=state.draft_reply.subject, reply_body=state.draft_reply.body,
                        approved=state.policy_review.approved)


triage = Workflow("ticket_triage", input_model=Ticket, state_model=TriageState, output_model=TriageResult,
                  output=_result, version="1")
triage.step("classify", classify)
triage.step("extract_order", extract_order, after="classify", when=is_order_ticket,
            inputs=lambda s: s.classify)
triage.step("draft_reply", draft_reply, after=["classify", "extract_order"])
triage.step("policy_review", policy_review, after="draft_reply", escalate=[human_review()])
triage.register()

# ----------------------------------------------------------------------------- the scripted model's part

_ORDER_ID = re.compile(r"\b([A-Z]\d{4})\b")
_AMOUNT = re.compile(r"\$\s?(\d+(?:\.\d+)?)")


def _classify_script(ctx: ScriptContext) -> Turn:
    ticket = ctx.input_json()
    text = f"{ticket.get('subject', '')} {ticket.get('body', '')}"
    if ticket.get("ticket_id") == "T-1007" and ctx.attempt == 1:
        return throttle()  # the provider is busy once; the step retries and recovers
    lowered = text.lower()
    order = _ORDER_ID.search(text)
    amount = _AMOUNT.search(text)
    if "refund" in lowered or "charge" in lowered or "invoice" in lowered:
        category = "billing"
    elif order or "order" in lowered or "parcel" in lowered or "delivery" in lowered:
        category = "order"
    elif "error" in lowered or "crash" in lowered or "login" in lowered:
        category = "technical"
    else:
        category = "other"
    if ctx.call_index == 0:
        return call("tag_ticket", ticket_id=str(ticket.get("ticket_id")), tag=category)
    urgency = "high" if ("urgent" in lowered or "asap" in lowered) else "normal"
    return finish({"category": category, "urgency": urgency, "order_id": order.group(1) if order else None,
                   "refund_amount": float(amount.group(1)) if amount else None})


def _extract_script(ctx: ScriptContext) -> Turn:
    data = ctx.input_json()
    order_id = data.get("order_id")
    if not order_id:
        return cannot_complete("the ticket does not contain an order id")
    # the lookup's answers only: after a rejected final answer the last tool result is that rejection
    lookups = [r for r in ctx.tool_results if r.startswith("Error: order") or '"order_id"' in r]
    if not lookups:
        return call("lookup_order", order_id=order_id)
    facts = ORDERS.get(str(order_id).upper())
    if lookups[-1].startswith("Error:") or facts is None:
        return cannot_complete(f"order {order_id} is not in the order system; cannot state its status")
    return finish({"order_id": order_id, "status": facts["status"], "carrier": facts["carrier"] or None,
                   "eta": facts["eta"] or None})


def _draft_script(ctx: ScriptContext) -> Turn:
    data = ctx.input_json()
    cls = data.get("classify") or {}
    order = data.get("extract_order")
    name = str(data.get("customer", "there")).split()[0]
    if order:
        line = f"your order {order['order_id']} is {order['status']}"
        if order.get("eta"):
            line += f" (expected {order['eta']})"
    elif cls.get("category") == "billing":
        line = "we have received your billing request and are reviewing it"
    else:
        line = "we are looking into your request"
    return finish({"subject": f"Re: {data.get('subject', 'your ticket')}",
                   "body": f"Hi {name}, thanks for reaching out: {line}. We will update you within one business day."})


def _review_script(ctx: ScriptContext) -> Turn:
    data = ctx.input_json()
    amount = (data.get("classify") or {}).get("refund_amount")
    if amount is not None and amount > REFUND_LIMIT:
        return needs_human(f"Refund of ${amount:.2f} exceeds the ${REFUND_LIMIT:.0f} auto-approval limit: "
                           "approve the reply?")
    return finish({"approved": True, "issues": []})


register_script(classify.name, _classify_script)
register_script(extract_order.name, _extract_script)
register_script(draft_reply.name, _draft_script)
register_script(policy_review.name, _review_script)

# ----------------------------------------------------------------------------- the demo batch

SAMPLE_TICKETS: list[dict[str, str]] = [
    {"ticket_id": "T-1001", "customer": "Ada Lovelace", "subject": "Where is my order?",
     "body": "Hi, my order A1001 has not arrived yet. Can you check?"},
    {"ticket_id": "T-1002", "customer": "Alan Turing", "subject": "Order status",
     "body": "What is happening with order A1002? It says processing for days."},
    {"ticket_id": "T-1003", "customer": "Grace Hopper", "subject": "Login error",
     "body": "I get an error when I try to log in since yesterday."},
    {"ticket_id": "T-1004", "customer": "Edsger Dijkstra", "subject": "Invoice copy",
     "body": "Please send me a copy of my last invoice."},
    {"ticket_id": "T-1005", "customer": "Barbara Liskov", "subject": "Delivered?",
     "body": "The tracking page says order A1003 was delivered but I cannot find the parcel."},
    {"ticket_id": "T-1006", "customer": "Donald Knuth", "subject": "Missing order",
     "body": "My order Z9999 never showed up. Where is it?"},
    {"ticket_id": "T-1007", "customer": "Margaret Hamilton", "subject": "Return",
     "body": "I returned order A1004 last week; has it been received?"},
    {"ticket_id": "T-1008", "customer": "Ken Thompson", "subject": "Refund request",
     "body": "I was charged twice. Please refund $850 for the duplicate charge, urgent."},
    {"ticket_id": "T-1009", "customer": "Frances Allen", "subject": "Feedback",
     "body": "Just wanted to say the new app looks great."},
    {"ticket_id": "T-1010", "customer": "John Backus", "subject": "Small refund",
     "body": "Please refund $20 for the late delivery fee."},
]
"""Ten tickets: eight succeed (one after a throttling retry), one unknown order is escalated as
cannot-complete, one $850 refund waits for a human; T-1010's $20 refund is approved automatically."""
