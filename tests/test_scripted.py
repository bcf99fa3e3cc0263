"""The offline ``ScriptedModel``: fault plans, sample outputs, plain strands agents, recording and replay."""

from __future__ import annotations

import asyncio
import datetime
import enum
import uuid
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, create_model
from strands import Agent
from strands.types.exceptions import EventLoopException

from teamster.agents.outcomes import Failed, Succeeded
from teamster.agents.recording import ModelExchange, RecordingModel, ReplayExhausted, request_digest
from teamster.agents.runner import AgentRun, StepContext, run_agent
from teamster.agents.scripted import (
    FAULT_KINDS,
    FaultPlan,
    ScriptContext,
    ScriptedModel,
    ScriptExhausted,
    call,
    cannot_complete,
    finish,
    get_script,
    needs_human,
    register_script,
    sample_output,
    say,
    throttle,
)
from teamster.agents.spec import AgentSpec, Budget
from teamster.agents.tools import tool
from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import ConfigurationError

# ----------------------------------------------------------------------------- models


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Line(BaseModel):
    sku: str = Field(min_length=8)
    quantity: int = Field(ge=1)
    unit_price: float = Field(ge=0.5)


class Address(BaseModel):
    city: str
    postcode: str | None = None


class Order(BaseModel):
    """A non-trivial output model: nested models, enums, literals, lists, optionals, dicts."""

    order_id: str
    colour: Colour
    channel: Literal["web", "phone"]
    lines: list[Line] = Field(min_length=2)
    ship_to: Address
    bill_to: Address | None = None
    tags: list[str] = Field(default_factory=list)
    counters: dict[str, int]
    gift: bool
    note: str | None = None


class Request(BaseModel):
    text: str


class Answer(BaseModel):
    answer: str
    score: int = Field(ge=0, le=10)


SIDE_EFFECTS: list[str] = []


@tool(name="ts_lookup")
def ts_lookup(order_id: str) -> str:
    """Look an order up."""
    SIDE_EFFECTS.append(order_id)
    return f"order {order_id}: shipped"


@pytest.fixture(autouse=True)
def _reset() -> None:
    SIDE_EFFECTS.clear()


@pytest.fixture(scope="module")
def settings() -> TeamsterSettings:
    return load_settings(model="scripted")


def ctx(call_index: int = 0, *, run_id: str = "run", step_id: str = "step", attempt: int = 1,
        agent: str = "agent") -> ScriptContext:
    return ScriptContext(agent=agent, call_index=call_index, attempt=attempt, run_id=run_id, step_id=step_id)


def spec(name: str | None = None, tools: tuple[str, ...] = (), budget: Budget | None = None) -> AgentSpec[Any, Any]:
    return AgentSpec(name=name or f"scripted_{uuid.uuid4().hex[:8]}", input_model=Request, output_model=Answer,
                     instructions="Answer.", tools=tools, budget=budget or Budget())


# ----------------------------------------------------------------------------- FaultPlan


def test_fault_plan_parse() -> None:
    plan = FaultPlan.parse("throttle=0.5,timeout=0.1", seed=7)
    assert plan.rates == {"throttle": 0.5, "timeout": 0.1} and plan.seed == 7
    assert FaultPlan.parse(" throttle = 0.25 , , invalid_json=0").rates == {"throttle": 0.25, "invalid_json": 0.0}
    assert FaultPlan.parse("refusal").rates == {"refusal": 1.0}
    assert FaultPlan.parse("").rates == {}
    assert set(FAULT_KINDS) == {"throttle", "timeout", "invalid_json", "schema_invalid", "refusal", "cannot_complete"}


@pytest.mark.parametrize("bad", ["explode=0.1", "throttle=1.5", "timeout=-0.1", "throttle=often"])
def test_fault_plan_rejects_bad_specs(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        FaultPlan.parse(bad)


def test_fault_plan_rejects_bad_rates_directly() -> None:
    with pytest.raises(ConfigurationError) as info:
        FaultPlan({"meteor": 0.1})
    assert "meteor" in info.value.message
    with pytest.raises(ConfigurationError):
        FaultPlan({"throttle": 2.0})


def test_fault_decisions_are_deterministic_and_depend_on_the_seed() -> None:
    contexts = [ctx(i % 5, run_id=f"run-{i}", attempt=1 + i % 3) for i in range(400)]
    plan = FaultPlan.parse("throttle=0.3", seed=1)
    first = [plan.pick(c) for c in contexts]
    again = [FaultPlan.parse("throttle=0.3", seed=1).pick(c) for c in contexts]
    assert first == again
    other_seed = [FaultPlan.parse("throttle=0.3", seed=2).pick(c) for c in contexts]
    assert [t is None for t in first] != [t is None for t in other_seed]
    assert all(t is None or t.fault == "throttle" for t in first)


@pytest.mark.parametrize("field", ["run_id", "step_id", "attempt", "call_index"])
def test_fault_decisions_vary_with_each_coordinate(field: str) -> None:
    plan = FaultPlan.parse("timeout=0.5", seed=3)
    values: list[Any] = list(range(1, 201)) if field in ("attempt", "call_index") else [f"x{i}" for i in range(200)]
    hits = {plan.pick(ctx(**{field: value})) is not None for value in values}  # type: ignore[arg-type]
    assert hits == {True, False}


def test_fault_hit_rate_matches_the_configured_rate() -> None:
    plan = FaultPlan.parse("throttle=0.2", seed=42)
    hits = sum(plan.pick(ctx(run_id=f"run-{i}")) is not None for i in range(1000))
    assert 150 <= hits <= 250


def test_fault_rates_zero_and_one() -> None:
    assert all(FaultPlan.parse("throttle=0").pick(ctx(run_id=str(i))) is None for i in range(100))
    assert all(FaultPlan.parse("timeout=1").pick(ctx(run_id=str(i))).fault == "timeout"  # type: ignore[union-attr]
               for i in range(100))


def test_injected_faults_reach_the_runner(settings: TeamsterSettings) -> None:
    model = ScriptedModel([finish({"answer": "a", "score": 1})], faults=FaultPlan.parse("throttle=1"))
    result = run_agent(spec(), {"text": "q"}, model=model, settings=settings)
    assert isinstance(result.outcome, Failed) and result.outcome.error_type == "model_throttled"
    assert result.outcome.retryable is True


def test_injected_cannot_complete_fault(settings: TeamsterSettings) -> None:
    model = ScriptedModel([finish({"answer": "a", "score": 1})], faults=FaultPlan.parse("cannot_complete=1"))
    result = run_agent(spec(), {"text": "q"}, model=model, settings=settings)
    assert result.outcome.kind == "cannot_complete"


def test_fault_decisions_replay_identically_in_real_runs(settings: TeamsterSettings) -> None:
    def outcomes(seed: int) -> list[str]:
        kinds = []
        for i in range(30):
            model = ScriptedModel([finish({"answer": "a", "score": 1})], faults=FaultPlan.parse("timeout=0.5", seed))
            run = run_agent(spec(name="fault_replay"), {"text": "q"}, model=model, settings=settings,
                            context=StepContext(run_id=f"r{i}", step_id="s"))
            kinds.append(run.outcome.kind)
        return kinds

    assert outcomes(5) == outcomes(5)
    assert {"succeeded", "failed"} == set(outcomes(5))


# ----------------------------------------------------------------------------- script contexts


def test_script_function_sees_the_step_context(settings: TeamsterSettings) -> None:
    seen: list[ScriptContext] = []

    def script(c: ScriptContext) -> Any:
        seen.append(c)
        return [call("ts_lookup", order_id="A1"), finish({"answer": "shipped", "score": 9})][c.call_index]

    name = f"ctx_{uuid.uuid4().hex[:6]}"
    model = ScriptedModel(script)
    result = run_agent(spec(name=name, tools=("ts_lookup",)), {"text": "where is A1?"}, model=model, settings=settings,
                       context=StepContext(run_id="run-9", step_id="answer", attempt=2))
    assert isinstance(result.outcome, Succeeded)
    first, second = seen
    assert (first.agent, first.run_id, first.step_id, first.attempt) == (name, "run-9", "answer", 2)
    assert [first.call_index, second.call_index] == [0, 1]
    assert first.input_json() == {"text": "where is A1?"}
    assert "ts_lookup" in first.tool_specs and "final_outcome" in first.tool_specs
    assert second.tool_results == ("order A1: shipped",)
    assert model.calls == seen


def test_on_call_hook_and_latency(settings: TeamsterSettings) -> None:
    observed: list[int] = []
    model = ScriptedModel([say("thinking"), finish({"answer": "a", "score": 1})], latency=0.01,
                          on_call=lambda c: observed.append(c.call_index))
    result = run_agent(spec(), {"text": "q"}, model=model, settings=settings)
    assert isinstance(result.outcome, Succeeded) and observed == [0, 1]
    assert result.duration_seconds >= 0.02


def test_registered_scripts() -> None:
    name = f"registered_{uuid.uuid4().hex[:6]}"
    turns = [finish({"answer": "x", "score": 0})]
    assert get_script(name) is None
    register_script(name, turns)
    assert get_script(name) is turns


def test_model_config_and_direct_structured_output() -> None:
    model = ScriptedModel()
    assert model.get_config() == {"model_id": "scripted"}
    model.update_config(model_id="other", temperature=0)
    assert model.get_config()["model_id"] == "other"

    async def direct() -> list[dict[str, Any]]:
        return [event async for event in model.structured_output(Answer, [])]

    (event,) = asyncio.run(direct())
    assert isinstance(event["output"], Answer)


# ----------------------------------------------------------------------------- sample_output


def test_sample_output_is_valid_for_a_non_trivial_model() -> None:
    data = sample_output(Order.model_json_schema())
    order = Order.model_validate(data)
    assert order.colour is Colour.RED and order.channel == "web"
    assert len(order.lines) >= 2 and all(len(line.sku) >= 8 and line.quantity >= 1 for line in order.lines)
    assert isinstance(order.ship_to, Address)


def test_sample_output_for_scalar_and_composite_schemas() -> None:
    assert sample_output({"type": "integer", "minimum": 3}) == 3
    assert sample_output({"type": "number"}) == 0.0
    assert sample_output({"type": "boolean"}) is False
    assert sample_output({"const": "fixed"}) == "fixed"
    assert sample_output({"type": "string", "default": "d"}) == "d"
    assert sample_output({"type": ["null", "string"]}) == "sample"
    assert sample_output({"anyOf": [{"type": "null"}, {"type": "integer"}]}) == 0
    assert sample_output({"type": "array", "items": {"type": "string"}, "minItems": 3}) == ["sample"] * 3


@pytest.mark.parametrize("annotation", [
    (int, Field(gt=0)),
    (float, Field(gt=0)),
    (str, Field(max_length=3)),
    (int, Field(le=-1)),
    (datetime.datetime, ...),
], ids=["int-gt-0", "float-gt-0", "max-length-3", "le-minus-1", "datetime"])
def test_sample_output_respects_common_constraints(annotation: tuple[Any, Any]) -> None:
    model = create_model("Constrained", value=annotation)
    model.model_validate(sample_output(model.model_json_schema()))


# ----------------------------------------------------------------------------- plain strands agents


def test_plain_strands_agent_with_its_own_structured_output_model() -> None:
    data = {"answer": "forty-two", "score": 7}
    model = ScriptedModel([finish(data)])
    agent = Agent(model=model, structured_output_model=Answer, callback_handler=None)
    result = agent("What is the answer?")
    assert isinstance(result.structured_output, Answer)
    assert result.structured_output == Answer(**data)
    assert len(model.calls) == 1 and model.calls[0].prompt == "What is the answer?"


def test_plain_strands_agent_with_a_flat_sample_output() -> None:
    agent = Agent(model=ScriptedModel([finish()]), structured_output_model=Answer, callback_handler=None)
    assert isinstance(agent("q").structured_output, Answer)


def test_plain_strands_agent_calls_tools_and_plays_text() -> None:
    model = ScriptedModel([call("ts_lookup", order_id="B2"), say("Order B2 has shipped.")])
    agent = Agent(model=model, tools=[ts_lookup], callback_handler=None)
    result = agent("Where is B2?")
    assert SIDE_EFFECTS == ["B2"]
    assert "Order B2 has shipped." in str(result)
    assert model.calls[1].tool_results == ("order B2: shipped",)


def test_script_exhausted_when_the_script_runs_out() -> None:
    agent = Agent(model=ScriptedModel([say("only one turn")]), callback_handler=None)
    agent("first")
    with pytest.raises((ScriptExhausted, EventLoopException)) as info:
        agent("second")
    error = info.value.original_exception if isinstance(info.value, EventLoopException) else info.value
    assert isinstance(error, ScriptExhausted) and "call 2" in str(error)


def test_outcome_turn_without_a_structured_output_tool_is_a_configuration_error() -> None:
    agent = Agent(model=ScriptedModel([finish({"answer": "a"})]), callback_handler=None)
    with pytest.raises((ConfigurationError, EventLoopException)) as info:
        agent("q")
    error = info.value.original_exception if isinstance(info.value, EventLoopException) else info.value
    assert isinstance(error, ConfigurationError)


class Maybe(BaseModel):
    answer: str
    order_id: str | None  # required, but may be null


def test_default_finish_is_valid_for_required_nullable_fields(settings: TeamsterSettings) -> None:
    maybe_spec = AgentSpec(name="maybe_agent", input_model=Request, output_model=Maybe, instructions="x",
                           budget=Budget(max_model_calls=2))
    result = run_agent(maybe_spec, {"text": "q"}, model=ScriptedModel(None), settings=settings)
    assert isinstance(result.outcome, Succeeded), result.outcome


class Outer(BaseModel):
    name: str
    address: Address


def test_plain_agent_default_finish_with_a_nested_model() -> None:
    agent = Agent(model=ScriptedModel([finish(), finish()]), structured_output_model=Outer, callback_handler=None)
    assert isinstance(agent("q").structured_output, Outer)


def test_default_finish_for_teamster_agents_with_nested_outputs(settings: TeamsterSettings) -> None:
    order_spec = AgentSpec(name="order_agent", input_model=Request, output_model=Order, instructions="x",
                           budget=Budget(max_model_calls=2))
    result = run_agent(order_spec, {"text": "q"}, model=ScriptedModel([finish()]), settings=settings)
    assert isinstance(result.outcome, Succeeded), result.outcome
    assert isinstance(result.output, Order)


# ----------------------------------------------------------------------------- recording and replay


def test_recording_model_records_every_exchange() -> None:
    exchanges: list[ModelExchange] = []
    inner = ScriptedModel([call("ts_lookup", order_id="C3"), finish({"answer": "shipped", "score": 5})])
    recording = RecordingModel(inner, exchanges.append)
    agent = Agent(model=recording, tools=[ts_lookup], structured_output_model=Answer, callback_handler=None)
    result = agent("Where is C3?")
    assert result.structured_output == Answer(answer="shipped", score=5)
    assert recording.calls == recording.live_calls == 2
    assert [e.call_index for e in exchanges] == [0, 1]
    first, second = exchanges
    assert first.stop_reason == "tool_use" and first.content[0]["toolUse"]["name"] == "ts_lookup"
    assert first.usage["totalTokens"] == first.usage["inputTokens"] + first.usage["outputTokens"] > 0
    assert second.content[0]["toolUse"]["name"] == "Answer" and not second.replayed
    assert len(first.request_digest) == 16 and first.request_digest != second.request_digest
    assert recording.get_config() == inner.get_config()

    # a pure replay (no model at all) reproduces the answer from the recording
    replayed: list[ModelExchange] = []
    replay = RecordingModel(None, replayed.append, exchanges)
    again = Agent(model=replay, tools=[ts_lookup], structured_output_model=Answer, callback_handler=None)
    assert again("Where is C3?").structured_output == result.structured_output
    assert replay.live_calls == 0 and all(e.replayed for e in replayed)
    assert [e.request_digest for e in replayed] == [e.request_digest for e in exchanges]
    with pytest.raises((ReplayExhausted, EventLoopException)):
        again("And C4?")


def test_request_digest_detects_changes() -> None:
    messages: Any = [{"role": "user", "content": [{"text": "hello"}]}]
    base = request_digest(messages, [], "system")
    assert base == request_digest(messages, [], "system")
    assert base != request_digest(messages, [], "other system")
    assert base != request_digest([{"role": "user", "content": [{"text": "bye"}]}], [], "system")


@pytest.mark.parametrize("script", [
    [call("ts_lookup", order_id="D4"), say("done"), finish({"answer": "shipped", "score": 3})],
    [cannot_complete("unknown order")],
    [needs_human("refund above the limit?")],
], ids=["succeeded", "cannot_complete", "needs_human"])
def test_run_agent_replay_makes_no_live_calls(settings: TeamsterSettings, script: list[Any]) -> None:
    agent_spec = spec(tools=("ts_lookup",))
    context = StepContext(run_id="run-r", step_id="step-r")
    first = run_agent(agent_spec, {"text": "where is D4?"}, model=ScriptedModel(script), settings=settings,
                      context=context)
    assert first.live_model_calls == first.model_calls == len(script)
    # the live model of the replay has no script at all: any live call would fail with ScriptExhausted
    empty = ScriptedModel([])
    replay: AgentRun = run_agent(agent_spec, {"text": "where is D4?"}, model=empty, settings=settings,
                                 context=context, recorded=first.exchanges)
    assert replay.live_model_calls == 0 and empty.calls == []
    assert replay.model_calls == first.model_calls
    assert replay.outcome == first.outcome
    assert replay.output == first.output
    assert all(e.replayed for e in replay.exchanges)
    assert [e.request_digest for e in replay.exchanges] == [e.request_digest for e in first.exchanges]


def test_replay_falls_back_to_the_live_model_after_the_recording(settings: TeamsterSettings) -> None:
    agent_spec = spec(tools=("ts_lookup",))
    script = [call("ts_lookup", order_id="E5"), finish({"answer": "shipped", "score": 3})]
    first = run_agent(agent_spec, {"text": "q"}, model=ScriptedModel(script), settings=settings)
    resumed = run_agent(agent_spec, {"text": "q"}, model=ScriptedModel(script), settings=settings,
                        recorded=first.exchanges[:1])
    assert resumed.outcome == first.outcome
    assert resumed.model_calls == 2 and resumed.live_model_calls == 1
    assert [e.replayed for e in resumed.exchanges] == [True, False]


def test_replay_of_a_failed_model_call_reproduces_the_failure(settings: TeamsterSettings) -> None:
    agent_spec = spec()
    first = run_agent(agent_spec, {"text": "q"}, model=ScriptedModel([throttle()]), settings=settings)
    assert isinstance(first.outcome, Failed) and first.outcome.error_type == "model_throttled"
    assert first.exchanges[0].error
    replay = run_agent(agent_spec, {"text": "q"}, model=ScriptedModel([]), settings=settings,
                       recorded=first.exchanges)
    assert replay.live_model_calls == 0
    assert replay.outcome == first.outcome
