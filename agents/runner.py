"""Run one agent step: validate input, build a fresh strands ``Agent``, run it within budgets, validate.

:func:`run_agent` never raises for anything the model, the provider or the input can do: every path ends in
one explicit :data:`~agents.outcomes.Outcome`. A fresh ``Agent`` is built per call (strands agents are not
picklable and refuse concurrent calls), with ``callback_handler=None``, strands' own retry strategy off (the
step's retry policy is the only retry layer), ``limits`` always passed (strands' structured-output re-ask
loop is unbounded otherwise), the :class:`~agents.guard.StepGuard` hook and a hard wall-clock deadline. Steps run
with ``invoke_async`` on the process's long-lived event loop (:class:`~teamster.agents.loop.AgentLoop`), where the
model provider clients and their connection pools are shared.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from strands import Agent
from strands.agent.conversation_manager import NullConversationManager
from strands.models.model import Model

from teamster.agents import _telemetry
from teamster.agents.classify import classify_exception, classify_stop_reason
from teamster.agents.delegation import DelegateTool, DelegationMemory
from teamster.agents.guard import EventSink, StepControl, StepGuard
from teamster.agents.limits import ModelGate
from teamster.agents.loop import AgentLoop
from teamster.agents.outcomes import (
    OUTCOME_TOOL_NAME,
    CannotComplete,
    EnvelopeBase,
    Failed,
    NeedsHuman,
    Succeeded,
    failed_from,
    outcome_envelope,
)
from teamster.agents.payload import check_payload
from teamster.agents.providers import build_model
from teamster.agents.recording import ModelExchange, RecordingModel
from teamster.agents.scripted import ScriptedModel
from teamster.agents.spec import AgentSpec
from teamster.agents.tools import TEAMSTER_STATE_KEY, get_tool
from teamster.config.settings import TeamsterSettings, get_settings
from teamster.errors import (
    BudgetExceeded,
    CriterionFailed,
    InvalidInput,
    InvalidOutput,
    LeaseLost,
    StepCancelled,
    StepTimeout,
    StructuredOutputError,
    TeamsterError,
)

__all__ = ["run_agent", "run_agent_async", "AgentRun", "StepContext", "validate_input", "format_validation_error"]

_telemetry.install()  # strands' span attributes, same output, without a per-leaf walk (see the module)

StepOutcome = Succeeded | CannotComplete | NeedsHuman | Failed



@dataclass(frozen=True)
class StepContext:
    """Where a step runs: ids for idempotency keys and the journal, the attempt number, the trace id."""

    run_id: str = "local"
    step_id: str = "step"
    attempt: int = 1
    trace_id: str | None = None
    depth: int = 0
    """0 for a step's agent, 1 for an agent it delegates to, and so on."""


@dataclass
class AgentRun:
    """The result of :func:`run_agent`: the outcome plus what it cost.

    Attributes:
        outcome: The explicit outcome.
        output: The validated output model instance (only when succeeded).
        model_calls: Model calls made (recorded responses replayed included).
        live_model_calls: Model calls that really reached the provider.
        tool_calls: Allowed tool calls executed.
        blocked_tools: Tools the model asked for but was not allowed.
        usage: Token usage summed over the calls.
        duration_seconds: Wall-clock time of the step.
        exchanges: Every model exchange (what the journal records, what replay feeds back).
    """

    outcome: StepOutcome
    output: BaseModel | None = None
    model_calls: int = 0
    live_model_calls: int = 0
    tool_calls: int = 0
    blocked_tools: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    duration_seconds: float = 0.0
    exchanges: list[ModelExchange] = field(default_factory=list)
    unrecorded_spend: dict[str, float] = field(default_factory=dict)
    """Spend of live calls that no Redis gate recorded (model_calls, tokens, cost): the step's end records it."""


def format_validation_error(error: ValidationError, limit: int = 8) -> str:
    """Pydantic errors as ``field.path: message`` pairs on one line."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in error.errors()[:limit]]
    extra = len(error.errors()) - limit
    return "; ".join(parts) + (f"; and {extra} more" if extra > 0 else "")


def validate_input(model: type[BaseModel], value: Any, *, what: str = "input") -> BaseModel:
    """Validate ``value`` (a dict, JSON text or model instance) against ``model``.

    Raises:
        InvalidInput: with every field error in the message and ``errors`` in details.
    """
    try:
        if isinstance(value, model):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, (str, bytes)):
            return model.model_validate_json(value)
        return model.model_validate(value)
    except ValidationError as exc:
        raise InvalidInput(f"{what} does not match {model.__name__}: {format_validation_error(exc)}",
                           errors=json.loads(exc.json(include_url=False, include_input=False))) from None


def _noop(_event: str, _payload: dict[str, Any]) -> None:
    return None


HARD_GRACE_SECONDS = 5.0
"""How long after its deadline a step's call may take to unwind before the caller stops waiting for it."""


def run_agent(
    spec: AgentSpec[Any, Any],
    input: Any,  # noqa: A002 - the natural name in this API
    *,
    model: Model | str | None = None,
    settings: TeamsterSettings | None = None,
    context: StepContext | None = None,
    on_event: EventSink | None = None,
    recorded: Sequence[ModelExchange] = (),
    control: StepControl | None = None,
    recorded_tools: Mapping[str, dict[str, Any]] | None = None,
    gate: ModelGate | None = None,
    memory: DelegationMemory | None = None,
) -> AgentRun:
    """Run ``spec`` once on ``input`` and return its explicit outcome (blocking; see :func:`run_agent_async`).

    The step runs on this process's :class:`~teamster.agents.loop.AgentLoop`; the calling thread only waits. Call
    :func:`run_agent_async` instead from async code.
    """
    settings = settings or get_settings()
    control = control or StepControl()
    loop = AgentLoop.shared()
    timeout = spec.budget.timeout_seconds or settings.step_timeout_seconds
    started = time.monotonic()
    future = loop.submit(run_agent_async(spec, input, model=model, settings=settings, context=context,
                                         on_event=on_event, recorded=recorded, control=control,
                                         recorded_tools=recorded_tools, gate=gate, memory=memory))
    while True:  # the deadline moves by the time spent waiting for provider capacity
        waited = gate.waited_seconds if gate is not None else 0.0
        left = started + timeout + waited + 2 * HARD_GRACE_SECONDS - time.monotonic()
        try:
            return future.result(max(0.0, left))
        except concurrent.futures.TimeoutError:
            if gate is not None and gate.waited_seconds > waited:
                continue
        break
    future.cancel()  # the coroutine did not even unwind: it is cancelled and abandoned
    control.abort("timeout")
    outcome = failed_from(StepTimeout(f"step ran past its deadline of {timeout:g}s and did not stop; abandoned",
                                      limit=timeout, abandoned=True))
    (on_event or _noop)("outcome", {"outcome": outcome.model_dump(mode="json"), "abandoned": True})
    return AgentRun(outcome=outcome, duration_seconds=time.monotonic() - started)


async def run_agent_async(
    spec: AgentSpec[Any, Any],
    input: Any,  # noqa: A002 - the natural name in this API
    *,
    model: Model | str | None = None,
    settings: TeamsterSettings | None = None,
    context: StepContext | None = None,
    on_event: EventSink | None = None,
    recorded: Sequence[ModelExchange] = (),
    control: StepControl | None = None,
    recorded_tools: Mapping[str, dict[str, Any]] | None = None,
    gate: ModelGate | None = None,
    memory: DelegationMemory | None = None,
) -> AgentRun:
    """Run ``spec`` once on ``input`` and return its explicit outcome.

    The step's wall-clock budget bounds the whole call -- model requests and tools included, for every provider:
    when it passes (or the step is stopped through ``control``), the agent's task is cancelled at once; a
    synchronous tool that cannot be cancelled is abandoned (its thread finishes on its own, its result is
    discarded, its effects stay guarded by its idempotency key) and journaled as ``tool_abandoned``.

    Args:
        spec: The agent.
        input: Its input (dict, JSON text or input-model instance); validated first.
        model: A strands model instance (e.g. :class:`~teamster.agents.scripted.ScriptedModel`) or a provider
            string; default: ``spec.model`` or ``TEAMSTER_MODEL``.
        settings: Settings (default: from the environment).
        context: Run/step ids and attempt (default: a local run).
        on_event: Receives every decision (model exchanges, tool calls, validation, outcome).
        recorded: Model responses to play back before calling the model (replay, recovery).
        control: Lets the caller stop the step (lease lost, run cancelled).
        recorded_tools: Replay: tool results by idempotency key, served instead of running the tools.
        gate: Passed before and after every live model call (shared provider limits, the run's budget); time spent
            waiting in it for capacity extends the deadline.
        memory: Delegations the journal already holds for this step (results to reuse, answers to resume from).
    """
    settings = settings or get_settings()
    ctx = context or StepContext()
    emit = on_event or _noop
    control = control or StepControl()
    started = time.monotonic()
    exchanges: list[ModelExchange] = []
    timeout = spec.budget.timeout_seconds or settings.step_timeout_seconds

    delegated: dict[str, int] = {}  # what this step's delegations used (their tokens are this step's too)

    def finish(outcome: StepOutcome, **extra: Any) -> AgentRun:
        usage: dict[str, int] = dict(delegated)
        for exchange in exchanges:
            for key, value in exchange.usage.items():
                usage[key] = usage.get(key, 0) + value
        run = AgentRun(outcome=outcome, usage=usage, duration_seconds=time.monotonic() - started,
                       exchanges=list(exchanges), **extra)
        emit("outcome", {"outcome": outcome.model_dump(mode="json"), "usage": usage,
                         "duration_seconds": round(run.duration_seconds, 4)})
        return run

    try:
        validated = validate_input(spec.input_model, input)
        check_payload(validated, max_depth=settings.max_input_depth)
    except InvalidInput as exc:
        emit("validation", {"ok": False, "stage": "input", "errors": exc.message})
        return finish(failed_from(exc))

    try:
        return await _invoke(spec, validated, model, settings, ctx, emit, control, recorded, recorded_tools,
                             timeout, exchanges, finish, gate, memory, delegated)
    except Exception as exc:  # building the model, the agent or the prompt, a provider library's own bug
        return finish(failed_from(classify_exception(exc)))


async def _invoke(spec: AgentSpec[Any, Any], validated: BaseModel, model: Model | str | None,
                  settings: TeamsterSettings, ctx: StepContext, emit: EventSink, control: StepControl,
                  recorded: Sequence[ModelExchange], recorded_tools: Mapping[str, dict[str, Any]] | None,
                  timeout: float, exchanges: list[ModelExchange],
                  finish: Callable[..., AgentRun], gate: ModelGate | None, memory: DelegationMemory | None,
                  delegated: dict[str, int]) -> AgentRun:
    """Build the model and a fresh strands Agent, run it within the deadline, turn what happened into an outcome."""
    started = time.monotonic()
    model_ref = model if isinstance(model, str) else spec.model or settings.model
    inner = model if isinstance(model, Model) else build_model(model_ref, settings, agent=spec.name, timeout=timeout)
    if isinstance(inner, ScriptedModel):  # offline (the demo, tests, an override): the run's budget still applies
        model_ref = "scripted"
    elif isinstance(model, Model):
        model_ref = _model_name(model)
    tools: list[Any] = [get_tool(name) for name in spec.tools]
    guard = StepGuard(spec, run_id=ctx.run_id, step_id=ctx.step_id, on_event=emit, control=control,
                      recorded_tools=recorded_tools)

    def tokens_used() -> int:
        return sum(e.usage.get("totalTokens", 0) for e in exchanges) + delegated.get("totalTokens", 0)

    def on_exchange(exchange: ModelExchange) -> None:
        exchanges.append(exchange)
        emit("model_call", exchange.model_dump(mode="json"))
        # strands' token limit is only checked between turns; the budget is hard: one call over it breaches
        if tokens_used() > spec.budget.max_total_tokens:
            guard.breach_budget("tokens", spec.budget.max_total_tokens)

    def on_delegated_usage(usage: dict[str, int]) -> None:
        for key, value in usage.items():
            delegated[key] = delegated.get(key, 0) + value
        if tokens_used() > spec.budget.max_total_tokens:
            guard.breach_budget("tokens", spec.budget.max_total_tokens)

    def on_delegation_error(error: TeamsterError) -> None:
        guard.delegation_error = guard.delegation_error or error
        control.abort(f"delegation:{error.code}")

    delegates = DelegateTool.for_step(spec, settings=settings, context=ctx, emit=emit, control=control, gate=gate,
                                      memory=memory, on_usage=on_delegated_usage, on_error=on_delegation_error)
    tools += delegates
    guard.allow(tool.tool_name for tool in delegates)

    recording = RecordingModel(inner, on_exchange, recorded, gate=gate, model_ref=model_ref,
                               reserve_tokens=settings.model_max_tokens)
    envelope = outcome_envelope(spec.output_model)  # type: ignore[arg-type]  # a class is hashable
    agent = Agent(
        model=recording,
        tools=list(tools),
        system_prompt=spec.instructions + (_output_schema_hint(spec) if _flattens_tool_schemas(inner) else ""),
        structured_output_model=envelope,
        callback_handler=None,
        conversation_manager=NullConversationManager(),
        hooks=[guard],
        retry_strategy=None,
        name=spec.name,
        trace_attributes={"teamster.run_id": ctx.run_id, "teamster.step_id": ctx.step_id,
                          "teamster.attempt": ctx.attempt, "teamster.agent": spec.name,
                          **({"teamster.trace_id": ctx.trace_id} if ctx.trace_id else {})},
    )
    invocation_state: dict[str, Any] = {TEAMSTER_STATE_KEY: {
        "run_id": ctx.run_id, "step_id": ctx.step_id, "attempt": ctx.attempt, "agent": spec.name, "tool_keys": {},
    }}
    prompt = f"Input ({spec.input_model.__name__}, JSON):\n{validated.model_dump_json()}"
    emit("agent_start", {"agent": spec.name, "version": spec.version, "model": _model_name(inner),
                         "budget": spec.budget.model_dump(mode="json"), "recorded_responses": len(recorded)})
    error: BaseException | None = None
    result = None
    task = asyncio.ensure_future(agent.invoke_async(
        prompt,
        invocation_state=invocation_state,
        limits={"turns": spec.budget.max_model_calls, "total_tokens": spec.budget.max_total_tokens},
    ))
    running = asyncio.get_running_loop()
    # strands' own cancellation, set at once (its checkpoints, the model stream and tool contexts read it). Passed as
    # invoke_async's cancel_signal instead, the same event would be polled every 50 ms by a task per step: 20 timer
    # wake-ups a second per step in flight, most of a worker's loop time with hundreds of slow calls in flight.
    control.on_abort(agent.cancel)
    control.on_abort(lambda: _cancel_soon(running, task))
    done: set[asyncio.Future[Any]] = set()
    while True:  # the deadline moves by the time spent waiting for provider capacity
        waited = gate.waited_seconds if gate is not None else 0.0
        remaining = timeout + waited - (time.monotonic() - started)
        done, _ = await asyncio.wait({task}, timeout=max(0.0, remaining))
        if done or gate is None or gate.waited_seconds == waited:
            break
    if not done:
        control.abort("timeout")  # cancels the task (the listener above)
        done, _ = await asyncio.wait({task}, timeout=HARD_GRACE_SECONDS)
    if done and not task.cancelled():
        try:
            result = task.result()
        except Exception as exc:  # classified below: every failure becomes a typed outcome
            error = exc
    elif not done:  # it ignored its cancellation: leave it behind (its result is discarded)
        task.add_done_callback(_discard)
    if control.reason is not None:
        for tool_use_id, tool_name in list(guard.running_tools.items()):
            emit("tool_abandoned", {"tool": tool_name, "tool_use_id": tool_use_id, "reason": control.reason})

    stats = {"model_calls": recording.calls, "live_model_calls": recording.live_calls,
             "tool_calls": guard.tool_calls, "blocked_tools": list(guard.blocked)}
    failure = _failure(spec, guard, control, error, result, timeout)
    if failure is not None:
        return finish(failure, **stats)
    if result is None:  # cancelled without a recorded reason: treat as the deadline
        return finish(failed_from(StepTimeout(f"step stopped before its deadline of {timeout:g}s",
                                              limit=timeout)), **stats)
    structured = result.structured_output
    if not isinstance(structured, EnvelopeBase):
        return finish(failed_from(StructuredOutputError("the model finished without a structured outcome",
                                                        stop_reason=str(result.stop_reason))), **stats)
    outcome = structured.to_outcome()
    if not isinstance(outcome, Succeeded):
        return finish(outcome, **stats)
    try:  # valid for the schema, but can the store, the journal and the next prompt carry it?
        check_payload(outcome.output, max_depth=settings.max_input_depth, what="output")
    except InvalidInput as exc:
        emit("validation", {"ok": False, "stage": "payload", "errors": exc.message})
        return finish(failed_from(InvalidOutput(f"the model's {exc.message}", **exc.details)), **stats)
    output = spec.output_model.model_validate(outcome.output)
    emit("validation", {"ok": True, "stage": "schema"})
    for criterion in spec.criteria:
        try:
            ok = bool(criterion.check(output, validated))
            problem = criterion.message or f"success criterion {criterion.name!r} is not met"
        except Exception as exc:  # a criterion that crashes did not pass
            ok = False
            problem = f"success criterion {criterion.name!r} raised {type(exc).__name__}: {exc}"
        emit("criterion", {"name": criterion.name, "ok": ok, **({} if ok else {"message": problem})})
        if not ok:
            return finish(failed_from(CriterionFailed(problem, criterion=criterion.name)), **stats)
    return finish(outcome, output=output, **stats)


def _cancel_soon(loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any]) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(task.cancel)


def _discard(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning for an abandoned step


def _failure(spec: AgentSpec[Any, Any], guard: StepGuard, control: StepControl, error: BaseException | None,
             result: Any, timeout: float) -> Failed | None:
    """The failed outcome of an invocation, if it failed (budget, timeout, lease, exception, stop reason)."""
    budget = spec.budget
    if guard.delegation_error is not None:  # a delegate's failure the caller cannot handle: the step's own
        return failed_from(guard.delegation_error)
    if control.reason == "timeout":
        return failed_from(StepTimeout(f"step ran past its deadline of {timeout:g}s and was stopped",
                                       limit=timeout))
    if control.reason == "lease_lost":
        return failed_from(LeaseLost("the step's lease was lost while it ran; another worker owns it"))
    if control.reason and control.reason.startswith("cancelled"):
        return failed_from(StepCancelled(control.reason))
    if guard.breach == "tool_calls":
        return failed_from(BudgetExceeded(f"step exceeded its budget of {budget.max_tool_calls} tool calls",
                                          budget="tool_calls", limit=budget.max_tool_calls))
    if guard.breach == "tokens":
        return failed_from(BudgetExceeded(f"step exceeded its budget of {budget.max_total_tokens} tokens",
                                          budget="tokens", limit=budget.max_total_tokens))
    if guard.breach == "model_calls":
        return _model_call_budget(spec, guard)
    if error is not None:
        return failed_from(classify_exception(error))
    stop_reason = str(getattr(result, "stop_reason", ""))
    if stop_reason == "limit_turns":
        return _model_call_budget(spec, guard)
    if stop_reason in ("limit_total_tokens", "limit_output_tokens"):
        return failed_from(BudgetExceeded(f"step exceeded its budget of {budget.max_total_tokens} tokens",
                                          budget="tokens", limit=budget.max_total_tokens))
    typed = classify_stop_reason(stop_reason)
    return failed_from(typed) if typed is not None else None


def _model_call_budget(spec: AgentSpec[Any, Any], guard: StepGuard) -> Failed:
    limit = spec.budget.max_model_calls
    if guard.outcome_rejections:
        return failed_from(StructuredOutputError(
            f"no valid structured output after {limit} model calls ({len(guard.outcome_rejections)} rejected); "
            f"last error: {guard.outcome_rejections[-1][:300]}",
            rejections=len(guard.outcome_rejections), limit=limit))
    return failed_from(BudgetExceeded(f"step exceeded its budget of {limit} model calls",
                                      budget="model_calls", limit=limit))



def _flattens_tool_schemas(model: Model) -> bool:
    """Whether the model's provider keeps only one level of a tool's parameters: Ollama's client and server drop the
    fields of nested objects (ollama/ollama-python#724, ollama/ollama#13472), so the outcome tool's ``output`` would
    reach the model as a bare object."""
    ollama = sys.modules.get("strands.models.ollama")  # loaded only if an Ollama model was built
    return ollama is not None and isinstance(model, ollama.OllamaModel)


def _output_schema_hint(spec: AgentSpec[Any, Any]) -> str:
    """The output's JSON schema, for the system prompt of a model that does not see it in the outcome tool."""
    schema = json.dumps(spec.output_model.model_json_schema(), separators=(",", ":"))
    return (f"\n\nWhen you call {OUTCOME_TOOL_NAME} with status \"succeeded\", its `output` must be a JSON object "
            f"valid for this JSON schema: {schema}")


def _model_name(model: Model) -> str:
    config = model.get_config()
    model_id = config.get("model_id") if isinstance(config, dict) else getattr(config, "model_id", None)
    return f"{type(model).__name__}:{model_id}" if model_id else type(model).__name__
