"""Unit tests of the agent layer (no broker, no Redis): the runner, its guard, budgets, outcomes and keys.

Every run below is a real strands ``Agent`` driven by the shipped :class:`~agents.scripted.ScriptedModel`;
nothing of strands or of the model is mocked.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError
from strands.types.tools import ToolContext

from teamster.agents.guard import StepControl
from teamster.agents.loop import AgentLoop
from teamster.agents.outcomes import (
    OUTCOME_ADAPTER,
    CannotComplete,
    Failed,
    NeedsHuman,
    Succeeded,
    outcome_envelope,
)
from teamster.agents.runner import (
    AgentRun,
    StepContext,
    format_validation_error,
    run_agent,
    run_agent_async,
    validate_input,
)
from teamster.agents.scripted import (
    ScriptContext,
    ScriptedModel,
    Turn,
    call,
    cannot_complete,
    finish,
    guardrail,
    invalid_json,
    needs_human,
    refuse,
    say,
    schema_invalid,
    throttle,
    timeout,
)
from teamster.agents.spec import AgentSpec, Budget, Criterion, RetryPolicy, get_agent, register_agent, registered_agents
from teamster.agents.tools import get_tool, idempotency_key, registered_tools, tool, tool_call_key
from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import ConfigurationError, InvalidInput, UnknownAgent, UnknownTool
from tests.harness import wait_until

# ----------------------------------------------------------------------------- models, tools, helpers


class Ticket(BaseModel):
    text: str = Field(min_length=1)
    priority: int = Field(default=1, ge=1, le=5)


class Label(BaseModel):
    category: Literal["order", "billing", "other"]
    confidence: float = Field(ge=0, le=1)


Events = list[tuple[str, dict[str, Any]]]

SIDE_EFFECTS: dict[str, int] = {"forbidden": 0, "allowed": 0}
KEYS_SEEN: list[str] = []


@tool(name="ta_forbidden_side_effect")
def ta_forbidden_side_effect(amount: int) -> str:
    """Issue a refund (a side effect no test agent is allowed to trigger)."""
    SIDE_EFFECTS["forbidden"] += 1
    return f"refunded {amount}"


@tool(name="ta_lookup")
def ta_lookup(order_id: str) -> str:
    """Look an order up."""
    SIDE_EFFECTS["allowed"] += 1
    return f"order {order_id}: shipped"


@tool(name="ta_broken_lookup")
def ta_broken_lookup(order_id: str) -> str:
    """A tool that reports failure as an 'Error: ...' string instead of raising."""
    return f"Error: the order system does not answer for {order_id}"


@tool(name="ta_keyed_action")
def ta_keyed_action(ticket: str, tool_context: ToolContext) -> str:
    """Tag a ticket in the helpdesk (deduplicated by its idempotency key)."""
    key = idempotency_key(tool_context)
    KEYS_SEEN.append(key)
    return f"tagged {ticket} with key {key}"


CANCEL_SEEN: list[float] = []  # seconds the ta_waits_for_cancel tool waited before it saw the step's cancellation


@tool(name="ta_waits_for_cancel")
def ta_waits_for_cancel(order_id: str, tool_context: ToolContext) -> str:
    """Wait for the warehouse (until the step is cancelled, at most 10 s)."""
    started = time.monotonic()
    seen = tool_context.cancel_signal.wait(10)
    CANCEL_SEEN.append(time.monotonic() - started if seen else -1.0)
    return f"order {order_id}: no answer"


@pytest.fixture(autouse=True)
def _reset_side_effects() -> None:
    SIDE_EFFECTS.update(forbidden=0, allowed=0)
    KEYS_SEEN.clear()


@pytest.fixture(scope="module")
def settings() -> TeamsterSettings:
    return load_settings(model="scripted")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def make_spec(*, tools: tuple[str, ...] = (), budget: Budget | None = None,
              criteria: tuple[Criterion[Any, Any], ...] = (), name: str | None = None) -> AgentSpec[Ticket, Label]:
    return AgentSpec(name=name or unique("agent"), input_model=Ticket, output_model=Label,
                     instructions="Label the ticket.", tools=tools, budget=budget or Budget(), criteria=criteria)


GOOD = {"category": "order", "confidence": 0.9}
TICKET = {"text": "Where is my parcel?"}


def run(spec: AgentSpec[Any, Any], script: Any, settings: TeamsterSettings, *, input: Any = None,  # noqa: A002
        context: StepContext | None = None, **model_kwargs: Any) -> tuple[AgentRun, ScriptedModel, Events]:
    events: Events = []
    model = ScriptedModel(script, **model_kwargs)
    result = run_agent(spec, TICKET if input is None else input, model=model, settings=settings, context=context,
                       on_event=lambda kind, payload: events.append((kind, payload)))
    return result, model, events


def kinds(events: Events) -> list[str]:
    return [kind for kind, _ in events]


def payloads(events: Events, kind: str) -> list[dict[str, Any]]:
    return [payload for k, payload in events if k == kind]


# ----------------------------------------------------------------------------- 1. every outcome kind


def test_succeeded_output_is_validated_instance_of_the_output_model(settings: TeamsterSettings) -> None:
    result, model, events = run(make_spec(), [finish(GOOD)], settings)
    assert isinstance(result.outcome, Succeeded)
    assert result.outcome.output == GOOD
    assert isinstance(result.output, Label)
    assert result.output.category == "order" and result.output.confidence == 0.9
    assert result.outcome.parse(Label) == result.output
    assert len(model.calls) == 1 and result.model_calls == 1 and result.live_model_calls == 1
    assert kinds(events)[0] == "agent_start" and kinds(events)[-1] == "outcome"
    assert {"ok": True, "stage": "schema"} in payloads(events, "validation")
    assert payloads(events, "outcome")[0]["outcome"] == {"kind": "succeeded", "output": GOOD}


def test_finish_accepts_a_model_instance(settings: TeamsterSettings) -> None:
    result, _, _ = run(make_spec(), [finish(Label(category="billing", confidence=0.5))], settings)
    assert isinstance(result.output, Label) and result.output.category == "billing"


def test_cannot_complete_carries_the_reason(settings: TeamsterSettings) -> None:
    result, model, _ = run(make_spec(), [cannot_complete("the ticket names no order")], settings)
    assert result.outcome == CannotComplete(reason="the ticket names no order")
    assert result.output is None
    assert len(model.calls) == 1


def test_needs_human_carries_the_question(settings: TeamsterSettings) -> None:
    result, _, _ = run(make_spec(), [needs_human("Refund 900 EUR above the limit?")], settings)
    assert result.outcome == NeedsHuman(question="Refund 900 EUR above the limit?")
    assert result.output is None


def test_guardrail_is_a_typed_terminal_failure(settings: TeamsterSettings) -> None:
    result, _, _ = run(make_spec(), [guardrail()], settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "guardrail_intervened" and result.outcome.retryable is False
    assert result.output is None


def test_an_empty_exit_reason_is_rejected_and_re_asked(settings: TeamsterSettings) -> None:
    # "cannot_complete" without a reason is not an explicit exit: the envelope rejects it, the model is re-asked.
    script = [schema_invalid({"status": "cannot_complete", "reason": "  "}), cannot_complete("no order id")]
    result, model, events = run(make_spec(), script, settings)
    assert result.outcome == CannotComplete(reason="no order id")
    assert len(model.calls) == 2
    rejected = [p for p in payloads(events, "validation") if p.get("ok") is False]
    assert len(rejected) == 1 and "reason" in rejected[0]["errors"]


def test_text_answer_is_forced_into_the_structured_outcome(settings: TeamsterSettings) -> None:
    result, model, _ = run(make_spec(), [say("It is about an order."), finish(GOOD)], settings)
    assert isinstance(result.outcome, Succeeded)
    assert len(model.calls) == 2


def test_script_running_out_is_an_explicit_failure_not_an_exception(settings: TeamsterSettings) -> None:
    result, _, _ = run(make_spec(), [], settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "unexpected_error" and "ScriptExhausted" in result.outcome.message


# ----------------------------------------------------------------------------- 2. structured output re-asks


def test_schema_invalid_output_is_re_asked_then_fails_terminally(settings: TeamsterSettings) -> None:
    spec = make_spec(budget=Budget(max_model_calls=3))
    result, model, events = run(spec, [schema_invalid()] * 5, settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "structured_output_error"
    assert result.outcome.retryable is False
    assert result.outcome.details.get("rejections") == 3
    assert len(model.calls) == 3 and result.model_calls == 3
    assert len([p for p in payloads(events, "validation") if p.get("ok") is False]) == 3
    assert result.output is None


def test_invalid_json_then_valid_finish_recovers_after_two_calls(settings: TeamsterSettings) -> None:
    spec = make_spec(budget=Budget(max_model_calls=3))
    result, model, _ = run(spec, [invalid_json(), finish(GOOD)], settings)
    assert isinstance(result.outcome, Succeeded) and isinstance(result.output, Label)
    assert len(model.calls) == 2 and result.model_calls == 2


def test_refusing_twice_is_a_structured_output_error(settings: TeamsterSettings) -> None:
    spec = make_spec(budget=Budget(max_model_calls=3))
    result, model, _ = run(spec, [refuse(), refuse(), refuse()], settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "structured_output_error" and result.outcome.retryable is False
    # the refusal, then strands' single forced structured-output call
    assert len(model.calls) == 2


# ----------------------------------------------------------------------------- 3. the tool allow-list


@pytest.mark.parametrize("allowed", [(), ("ta_lookup",)], ids=["no-tools", "other-tool-allowed"])
def test_disallowed_tool_is_blocked_in_code(settings: TeamsterSettings, allowed: tuple[str, ...]) -> None:
    seen: list[tuple[str, ...]] = []

    def script(ctx: ScriptContext) -> Turn:
        seen.append(ctx.tool_results)
        return [call("ta_forbidden_side_effect", amount=900), finish(GOOD)][ctx.call_index]

    result, model, events = run(make_spec(tools=allowed), script, settings)
    assert SIDE_EFFECTS["forbidden"] == 0, "the disallowed tool function ran"
    assert result.blocked_tools == ["ta_forbidden_side_effect"]
    assert result.tool_calls == 0
    blocked = payloads(events, "tool_blocked")
    assert blocked == [{"tool": "ta_forbidden_side_effect", "input": {"amount": 900},
                        "reason": "not in the agent's allow-list"}]
    assert "tool_call" not in kinds(events)
    # the model was told, and the run could still finish
    assert "is not allowed" in seen[1][0]
    assert isinstance(result.outcome, Succeeded)
    assert len(model.calls) == 2


def test_a_model_that_keeps_calling_a_blocked_tool_hits_the_model_call_budget(settings: TeamsterSettings) -> None:
    spec = make_spec(budget=Budget(max_model_calls=3))
    result, model, _ = run(spec, lambda ctx: call("ta_forbidden_side_effect", amount=ctx.call_index), settings)
    assert SIDE_EFFECTS["forbidden"] == 0
    assert result.blocked_tools == ["ta_forbidden_side_effect"] * 3
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "budget_exceeded" and result.outcome.details["budget"] == "model_calls"
    assert len(model.calls) == 3


def test_allowed_tool_runs_and_its_result_reaches_the_model(settings: TeamsterSettings) -> None:
    seen: list[tuple[str, ...]] = []

    def script(ctx: ScriptContext) -> Turn:
        seen.append(ctx.tool_results)
        return [call("ta_lookup", order_id="A1"), finish(GOOD)][ctx.call_index]

    result, _, events = run(make_spec(tools=("ta_lookup",)), script, settings)
    assert isinstance(result.outcome, Succeeded)
    assert SIDE_EFFECTS["allowed"] == 1 and result.tool_calls == 1 and result.blocked_tools == []
    assert seen[1] == ("order A1: shipped",)
    (tool_call,) = payloads(events, "tool_call")
    assert tool_call["tool"] == "ta_lookup" and tool_call["input"] == {"order_id": "A1"}
    (tool_result,) = payloads(events, "tool_result")
    assert tool_result["status"] == "success" and tool_result["idempotency_key"] == tool_call["idempotency_key"]


# ----------------------------------------------------------------------------- 4. budgets


def test_tool_call_budget_breach_is_terminal(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",), budget=Budget(max_tool_calls=1))
    script = [call("ta_lookup", order_id="A1"), call("ta_lookup", order_id="A2"), finish(GOOD)]
    result, model, events = run(spec, script, settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "budget_exceeded" and result.outcome.retryable is False
    assert result.outcome.details["budget"] == "tool_calls" and result.outcome.details["limit"] == 1
    assert SIDE_EFFECTS["allowed"] == 1, "the call over budget must not run"
    assert result.tool_calls == 1
    assert {"budget": "tool_calls", "limit": 1} in payloads(events, "budget_exceeded")
    assert len(model.calls) == 2, "the step stops at the breach: the finish turn is never played"


def test_zero_tool_budget_blocks_the_first_call(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",), budget=Budget(max_tool_calls=0))
    result, _, _ = run(spec, [call("ta_lookup", order_id="A1"), finish(GOOD)], settings)
    assert isinstance(result.outcome, Failed) and result.outcome.details["budget"] == "tool_calls"
    assert SIDE_EFFECTS["allowed"] == 0


def test_model_call_budget_breach_by_a_tool_loop(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",), budget=Budget(max_model_calls=3))
    result, model, _ = run(spec, lambda ctx: call("ta_lookup", order_id=f"A{ctx.call_index}"), settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "budget_exceeded" and result.outcome.retryable is False
    assert result.outcome.details == {"budget": "model_calls", "limit": 3}
    assert len(model.calls) == 3 and result.model_calls == 3


def test_finishing_exactly_at_the_model_call_budget_succeeds(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",), budget=Budget(max_model_calls=2))
    result, model, _ = run(spec, [call("ta_lookup", order_id="A1"), finish(GOOD)], settings)
    assert isinstance(result.outcome, Succeeded)
    assert len(model.calls) == 2


def test_one_call_over_the_model_call_budget_fails(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",), budget=Budget(max_model_calls=2))
    script = [call("ta_lookup", order_id="A1"), call("ta_lookup", order_id="A2"), finish(GOOD)]
    result, model, _ = run(spec, script, settings)
    assert isinstance(result.outcome, Failed) and result.outcome.details["budget"] == "model_calls"
    assert len(model.calls) == 2


def test_token_budget_breach_is_terminal(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",), budget=Budget(max_total_tokens=50))
    result, model, _ = run(spec, [call("ta_lookup", order_id="A1"), finish(GOOD)], settings, tokens_per_char=10)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "budget_exceeded" and result.outcome.retryable is False
    assert result.outcome.details == {"budget": "tokens", "limit": 50}
    assert result.usage["totalTokens"] > 50
    assert len(model.calls) == 1


def test_usage_is_summed_over_the_calls(settings: TeamsterSettings) -> None:
    result, _, events = run(make_spec(tools=("ta_lookup",)), [call("ta_lookup", order_id="A1"), finish(GOOD)],
                            settings)
    calls = payloads(events, "model_call")
    assert len(calls) == 2 == len(result.exchanges)
    assert result.usage["totalTokens"] == sum(c["usage"]["totalTokens"] for c in calls) > 0
    assert payloads(events, "outcome")[0]["usage"] == result.usage


def test_a_single_call_over_the_token_budget_is_a_breach(settings: TeamsterSettings) -> None:
    spec = make_spec(budget=Budget(max_total_tokens=50))
    result, _, _ = run(spec, [finish(GOOD)], settings, tokens_per_char=10)
    assert result.usage["totalTokens"] > 50  # the step did spend more than its budget ...
    assert isinstance(result.outcome, Failed)  # ... so, per Budget's contract, it is a breach
    assert result.outcome.details.get("budget") == "tokens"


# ----------------------------------------------------------------------------- 5. wall-clock timeout


def test_wall_clock_deadline_cancels_a_slow_model_call_as_a_retryable_timeout(settings: TeamsterSettings) -> None:
    spec = make_spec(budget=Budget(timeout_seconds=0.3))
    started = time.monotonic()
    result, model, _ = run(spec, [finish(GOOD).after(120)], settings)
    elapsed = time.monotonic() - started
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "step_timeout" and result.outcome.retryable is True
    assert result.outcome.details == {"limit": 0.3}
    assert elapsed < 60, f"the step was not cancelled ({elapsed:.1f}s of a 120 s model call)"
    assert len(model.calls) == 1 and result.output is None


def test_wall_clock_deadline_defaults_to_the_step_timeout_setting() -> None:
    settings = load_settings(model="scripted", step_timeout_seconds=0.2)
    started = time.monotonic()
    result, _, _ = run(make_spec(), [finish(GOOD).after(120)], settings)
    assert time.monotonic() - started < 60
    assert isinstance(result.outcome, Failed) and result.outcome.error_type == "step_timeout"
    assert result.outcome.details["limit"] == 0.2


@pytest.mark.parametrize(("reason", "error_type"), [("lease_lost", "lease_lost"),
                                                     ("cancelled: by operator", "cancelled")])
def test_step_control_stops_a_running_step(settings: TeamsterSettings, reason: str, error_type: str) -> None:
    control = StepControl()
    timer = threading.Timer(0.2, control.abort, args=(reason,))
    timer.start()
    started = time.monotonic()
    try:
        result = run_agent(make_spec(), TICKET, model=ScriptedModel([finish(GOOD).after(5)]), settings=settings,
                           control=control)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 4
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == error_type and result.outcome.retryable is False


def test_a_stopped_step_cancels_its_running_tool_through_strands(settings: TeamsterSettings) -> None:
    CANCEL_SEEN.clear()
    control = StepControl()
    timer = threading.Timer(0.3, control.abort, args=("cancelled: by operator",))
    timer.start()
    try:
        result = run_agent(make_spec(tools=("ta_waits_for_cancel",)), TICKET, settings=settings, control=control,
                           model=ScriptedModel([call("ta_waits_for_cancel", order_id="A1"), finish(GOOD)]))
    finally:
        timer.cancel()
    assert isinstance(result.outcome, Failed) and result.outcome.error_type == "cancelled"
    wait_until(lambda: CANCEL_SEEN, timeout=10)  # the tool's thread is abandoned: it reports on its own
    assert 0 <= CANCEL_SEEN[0] < 5  # the tool context's cancel signal was set by the abort, not by its own timeout


def test_a_step_in_flight_polls_nothing_while_it_waits(settings: TeamsterSettings) -> None:
    # strands polls a cancel_signal passed to invoke_async every 50 ms with a task per invocation; teamster cancels
    # through Agent.cancel instead, so a step waiting for a slow model call schedules no periodic wake-ups
    loop = AgentLoop.shared()
    control = StepControl()
    future = loop.submit(run_agent_async(make_spec(), TICKET, model=ScriptedModel([finish(GOOD).after(30)]),
                                         settings=settings, control=control))

    async def tasks() -> list[str]:
        return [getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()]

    try:
        wait_until(lambda: any("invoke_async" in name or "stream_async" in name
                               for name in loop.submit(tasks()).result(5)), timeout=10)
        names = loop.submit(tasks()).result(5)
        assert not [name for name in names if "cancel" in name], names
    finally:
        control.abort("cancelled: test over")
    assert future.result(10).outcome.error_type == "cancelled"


def test_step_control_first_reason_wins() -> None:
    control = StepControl()
    control.abort("timeout")
    control.abort("lease_lost")
    assert control.reason == "timeout" and control.event.is_set()


# ----------------------------------------------------------------------------- 6. provider faults


@pytest.mark.parametrize(("turn", "error_type"), [(throttle(), "model_throttled"), (timeout(), "model_timeout")])
def test_provider_faults_are_classified_retryable(settings: TeamsterSettings, turn: Turn, error_type: str) -> None:
    result, model, events = run(make_spec(), [turn, finish(GOOD)], settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == error_type and result.outcome.retryable is True
    # strands' own retry layer is off: the step's retry policy is the only one
    assert len(model.calls) == 1
    (exchange,) = payloads(events, "model_call")
    assert exchange["error"]


# ----------------------------------------------------------------------------- 7. success criteria


def test_failing_criterion_names_itself(settings: TeamsterSettings) -> None:
    confident = Criterion("confident", lambda out, _inp: out.confidence >= 0.8, "confidence below 0.8")
    spec = make_spec(criteria=(confident,))
    result, _, events = run(spec, [finish({"category": "order", "confidence": 0.3})], settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "criterion_failed" and result.outcome.retryable is False
    assert result.outcome.details["criterion"] == "confident"
    assert result.outcome.message == "confidence below 0.8"
    assert result.output is None
    assert {"name": "confident", "ok": False, "message": "confidence below 0.8"} in payloads(events, "criterion")


def test_criteria_see_the_input_and_passing_criteria_succeed(settings: TeamsterSettings) -> None:
    seen: list[Ticket] = []

    def mentions_parcel(out: Label, inp: Ticket) -> bool:
        seen.append(inp)
        return out.category == "order" and "parcel" in inp.text

    spec = make_spec(criteria=(Criterion("order_for_parcels", mentions_parcel),))
    result, _, events = run(spec, [finish(GOOD)], settings)
    assert isinstance(result.outcome, Succeeded)
    assert seen == [Ticket(**TICKET)]
    assert payloads(events, "criterion") == [{"name": "order_for_parcels", "ok": True}]


def test_criterion_that_raises_fails_with_its_name(settings: TeamsterSettings) -> None:
    def explode(_out: Label, _inp: Ticket) -> bool:
        raise KeyError("no such field")

    spec = make_spec(criteria=(Criterion("never_passes", lambda *_: True), Criterion("explodes", explode)))
    result, _, _ = run(spec, [finish(GOOD)], settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "criterion_failed"
    assert result.outcome.details["criterion"] == "explodes"
    assert "explodes" in result.outcome.message and "KeyError" in result.outcome.message


def test_default_criterion_message_names_the_criterion(settings: TeamsterSettings) -> None:
    spec = make_spec(criteria=(Criterion("is_billing", lambda out, _inp: out.category == "billing"),))
    result, _, _ = run(spec, [finish(GOOD)], settings)
    assert isinstance(result.outcome, Failed) and "is_billing" in result.outcome.message


# ----------------------------------------------------------------------------- 8. invalid input


@pytest.mark.parametrize(("bad", "field"), [({"priority": 2}, "text"), ({"text": "x", "priority": 9}, "priority"),
                                            ('{"text": ""}', "text")])
def test_invalid_input_fails_before_any_model_call(settings: TeamsterSettings, bad: Any, field: str) -> None:
    result, model, events = run(make_spec(), [finish(GOOD)], settings, input=bad)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "invalid_input" and result.outcome.retryable is False
    assert field in result.outcome.message
    assert any(field in err["loc"] for err in result.outcome.details["errors"])
    assert model.calls == []
    assert result.model_calls == 0 and result.exchanges == []
    assert "agent_start" not in kinds(events) and "model_call" not in kinds(events)


def test_validate_input_accepts_dicts_json_and_model_instances() -> None:
    expected = Ticket(text="hello", priority=2)
    assert validate_input(Ticket, {"text": "hello", "priority": 2}) == expected
    assert validate_input(Ticket, '{"text": "hello", "priority": 2}') == expected
    assert validate_input(Ticket, expected) is expected

    class OtherTicket(BaseModel):
        text: str
        priority: int

    assert validate_input(Ticket, OtherTicket(text="hello", priority=2)) == expected
    with pytest.raises(InvalidInput) as info:
        validate_input(Ticket, "not json", what="payload")
    assert info.value.message.startswith("payload does not match Ticket")


def test_format_validation_error_lists_fields_and_truncates() -> None:
    class Many(BaseModel):
        a: int
        b: int
        c: int

    with pytest.raises(InvalidInput) as info:
        validate_input(Many, {})
    assert all(f"{name}: Field required" in info.value.message for name in "abc")
    with pytest.raises(ValidationError) as raw:
        Many.model_validate({})
    assert format_validation_error(raw.value, limit=1) == "a: Field required; and 2 more"


# ----------------------------------------------------------------------------- 9. "Error: ..." tool results


def test_tool_returning_an_error_string_is_marked_as_error(settings: TeamsterSettings) -> None:
    seen: list[tuple[str, ...]] = []

    def script(ctx: ScriptContext) -> Turn:
        seen.append(ctx.tool_results)
        return [call("ta_broken_lookup", order_id="A1"), cannot_complete("order system down")][ctx.call_index]

    result, _, events = run(make_spec(tools=("ta_broken_lookup",)), script, settings)
    (tool_result,) = payloads(events, "tool_result")
    assert tool_result["tool"] == "ta_broken_lookup"
    assert tool_result["status"] == "error"
    assert tool_result["content"][0]["text"].startswith("Error: the order system")
    assert seen[1] == ("Error: the order system does not answer for A1",)
    assert result.outcome == CannotComplete(reason="order system down")


# ----------------------------------------------------------------------------- 10. idempotency keys


def _keyed_run(settings: TeamsterSettings, ticket: str, *, run_id: str = "run-1", step_id: str = "classify",
               attempt: int = 1) -> tuple[AgentRun, Events]:
    spec = make_spec(tools=("ta_keyed_action",), name="keyed_agent")
    result, _, events = run(spec, [call("ta_keyed_action", ticket=ticket), finish(GOOD)], settings,
                            context=StepContext(run_id=run_id, step_id=step_id, attempt=attempt))
    assert isinstance(result.outcome, Succeeded), result.outcome
    return result, events


def test_tools_receive_a_stable_idempotency_key(settings: TeamsterSettings) -> None:
    _, events = _keyed_run(settings, "T-1")
    _keyed_run(settings, "T-1")  # the same step executed again (redelivery)
    _keyed_run(settings, "T-1", attempt=2)  # a retry of the same step
    _keyed_run(settings, "T-2")  # different tool input
    _keyed_run(settings, "T-1", run_id="run-2")  # another run
    first, redelivered, retried, other_input, other_run = KEYS_SEEN
    assert first and first.startswith("run-1:classify:ta_keyed_action:0:")
    assert first == redelivered == retried
    assert other_input != first and other_run != first
    assert first == tool_call_key("run-1", "classify", "ta_keyed_action", 0, {"ticket": "T-1"})
    (tool_call,) = payloads(events, "tool_call")
    (tool_result,) = payloads(events, "tool_result")
    assert tool_call["idempotency_key"] == tool_result["idempotency_key"] == first


def test_repeated_calls_in_one_step_get_distinct_keys(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_keyed_action",))
    script = [call("ta_keyed_action", ticket="T-1"), call("ta_keyed_action", ticket="T-1"), finish(GOOD)]
    result, _, _ = run(spec, script, settings, context=StepContext(run_id="r", step_id="s"))
    assert isinstance(result.outcome, Succeeded)
    assert len(KEYS_SEEN) == 2 and KEYS_SEEN[0] != KEYS_SEEN[1]
    assert KEYS_SEEN[0].split(":")[3] == "0" and KEYS_SEEN[1].split(":")[3] == "1"


def test_replay_serves_recorded_tool_results_without_running_the_tool(settings: TeamsterSettings) -> None:
    spec = make_spec(tools=("ta_lookup",))
    script = [call("ta_lookup", order_id="A1"), finish(GOOD)]
    ctx = StepContext(run_id="r", step_id="s")
    key = tool_call_key("r", "s", "ta_lookup", 0, {"order_id": "A1"})
    seen: list[tuple[str, ...]] = []

    def recording_script(c: ScriptContext) -> Turn:
        seen.append(c.tool_results)
        return script[c.call_index]

    recorded = {key: {"status": "success", "content": [{"text": "order A1: delivered (recorded)"}]}}
    result = run_agent(spec, TICKET, model=ScriptedModel(recording_script), settings=settings, context=ctx,
                       recorded_tools=recorded)
    assert isinstance(result.outcome, Succeeded)
    assert SIDE_EFFECTS["allowed"] == 0, "replay repeated a tool side effect"
    assert seen[1] == ("order A1: delivered (recorded)",)

    seen.clear()
    diverged = run_agent(spec, TICKET, model=ScriptedModel(recording_script), settings=settings, context=ctx,
                         recorded_tools={})
    assert SIDE_EFFECTS["allowed"] == 0
    assert isinstance(diverged.outcome, Succeeded)
    assert "replay diverged" in seen[1][0]


# ----------------------------------------------------------------------------- 11. a fresh Agent per call


def test_parallel_runs_of_the_same_spec_both_succeed(settings: TeamsterSettings) -> None:
    """Two threads run the same spec at once: both steps are in flight together on the process's agent loop (a
    fresh strands Agent each, never shared), and both succeed."""
    spec = make_spec(tools=("ta_lookup",))
    started: list[asyncio.Event] = []

    class Overlapping(ScriptedModel):
        async def stream(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            messages = args[0] if args else kwargs["messages"]
            if not any(m.get("role") == "assistant" for m in messages):  # first call of a step
                if not started:
                    started.append(asyncio.Event())
                else:
                    started[0].set()
                await asyncio.wait_for(started[0].wait(), 20)  # proves the two steps really overlap
            async for event in super().stream(*args, **kwargs):
                yield event

    def script(ctx: ScriptContext) -> Turn:
        return call("ta_lookup", order_id="A1") if ctx.call_index == 0 else finish(GOOD)

    results: list[AgentRun] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(run_agent(spec, TICKET, model=Overlapping(script), settings=settings))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(results) == 2
    assert all(isinstance(r.outcome, Succeeded) for r in results), [r.outcome for r in results]
    assert SIDE_EFFECTS["allowed"] == 2


# ----------------------------------------------------------------------------- spec, registry, retry policy


def test_agent_spec_validates_its_declaration() -> None:
    with pytest.raises(ConfigurationError):
        AgentSpec(name="bad name!", input_model=Ticket, output_model=Label, instructions="x")
    with pytest.raises(ConfigurationError):
        AgentSpec(name="ok", input_model=dict, output_model=Label, instructions="x")  # type: ignore[arg-type]
    spec = AgentSpec(name="ok-name.v2", input_model=Ticket, output_model=Label, instructions="x",
                     tools=["ta_lookup"], criteria=[Criterion("c", lambda *_: True)])  # type: ignore[arg-type]
    assert spec.tools == ("ta_lookup",) and isinstance(spec.criteria, tuple)
    hash(spec)
    other = spec.with_model("openai:gpt-4o")
    assert other.model == "openai:gpt-4o" and other.name == spec.name and other.tools == spec.tools


def test_registry() -> None:
    name = unique("registered")
    spec = make_spec(name=name, tools=("ta_lookup",))
    assert register_agent(spec) is spec
    assert register_agent(spec) is spec  # re-registering the same spec is a no-op
    assert get_agent(name) is spec and name in registered_agents()
    changed = make_spec(name=name, budget=Budget(max_model_calls=2))
    with pytest.raises(ConfigurationError):
        register_agent(changed)
    assert register_agent(changed, replace=True) is changed and get_agent(name) is changed
    with pytest.raises(UnknownAgent) as unknown:
        get_agent(unique("missing"))
    assert name in unknown.value.message and unknown.value.hint
    with pytest.raises(UnknownTool):
        register_agent(make_spec(tools=("no_such_tool_anywhere",)))


def test_unknown_tool_at_run_time_is_a_failed_outcome(settings: TeamsterSettings) -> None:
    result, model, _ = run(make_spec(tools=("no_such_tool_anywhere",)), [finish(GOOD)], settings)
    assert isinstance(result.outcome, Failed) and result.outcome.error_type == "unknown_tool"
    assert model.calls == []


def test_tool_registry() -> None:
    assert get_tool("ta_lookup").tool_name == "ta_lookup"
    assert "ta_keyed_action" in registered_tools()
    with pytest.raises(UnknownTool):
        get_tool("no_such_tool_anywhere")
    with pytest.raises(ConfigurationError):
        @tool(name="ta_lookup")
        def other_signature(order_id: str, extra: int) -> str:
            """Same name, another signature."""
            return order_id


def test_retry_policy_resolution_and_backoff() -> None:
    settings = load_settings(retry_max_attempts=4, retry_backoff_base=1.5, retry_backoff_max=10, retry_jitter=False)
    policy = RetryPolicy(max_attempts=2).resolved(settings)
    assert policy == RetryPolicy(max_attempts=2, backoff_base=1.5, backoff_max=10, jitter=False)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1.5, 3.0, 6.0, 10.0, 10.0]
    jittered = RetryPolicy(backoff_base=2, backoff_max=5, jitter=True)
    rng = random.Random(7)
    delays = [jittered.delay(3, rng) for _ in range(200)]
    assert all(0 <= d <= 5 for d in delays) and len(set(delays)) > 100


# ----------------------------------------------------------------------------- outcomes


def test_outcomes_round_trip_as_json() -> None:
    for outcome in (Succeeded(output=GOOD), CannotComplete(reason="r"), NeedsHuman(question="q"),
                    Failed(error_type="model_throttled", message="m", retryable=True, details={"a": 1})):
        assert OUTCOME_ADAPTER.validate_json(outcome.model_dump_json()) == outcome


def test_outcome_envelope_requires_explicit_exits() -> None:
    envelope = outcome_envelope(Label)
    assert envelope.__name__ == "final_outcome" and outcome_envelope(Label) is envelope
    assert envelope.model_validate({"status": "succeeded", "output": GOOD}).to_outcome() == Succeeded(output=GOOD)
    assert envelope.model_validate({"status": "needs_human", "question": "?"}).to_outcome() == NeedsHuman(question="?")
    for bad in ({"status": "succeeded"}, {"status": "cannot_complete"}, {"status": "needs_human", "question": " "},
                {"status": "succeeded", "output": {"category": "nope", "confidence": 1}}):
        with pytest.raises(ValueError):
            envelope.model_validate(bad)
