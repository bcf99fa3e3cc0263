"""Replay a recorded run offline, with zero model calls, and report where decisions differ (invariant I7).

For every step that reached an outcome, replay re-executes the final attempt with the *current* code:
agent steps get the journaled model responses instead of a model (a :class:`~agents.recording.RecordingModel`
with no live model behind it) and the journaled tool results instead of running tools; function, fan-out and
join steps re-run on the journaled state; child steps re-derive their child's input from the journaled state and
take the child's recorded result (``teamster replay CHILD_RUN`` replays the child itself). The report compares, per
step, the recorded outcome with the replayed one and each model request's digest with the recorded digest, so a
changed prompt, input, tool set or agent version shows up as a difference. Nothing is written to the store.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from strands.models.model import Model
from strands.types.streaming import StreamEvent

from teamster.agents.recording import ReplayExhausted
from teamster.agents.runner import StepContext, run_agent
from teamster.agents.spec import get_agent
from teamster.orchestrator.executor import run_deterministic
from teamster.orchestrator.models import JournalEvent
from teamster.orchestrator.planner import child_input, skip_reason
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.workflow import get_workflow

__all__ = ["ReplayReport", "StepReplay", "replay_run"]

T = TypeVar("T", bound=BaseModel)


class StepReplay(BaseModel):
    """One step's replay: recorded vs replayed outcome and what differs."""

    step_key: str
    kind: str
    attempt: int | None = None
    recorded: dict[str, Any] | None = None
    replayed: dict[str, Any] | None = None
    same: bool = False
    differences: list[str] = Field(default_factory=list)
    model_calls_replayed: int = 0
    live_model_calls: int = 0


class ReplayReport(BaseModel):
    """The replay of one run."""

    run_id: str
    workflow: str
    steps: list[StepReplay] = Field(default_factory=list)

    @property
    def identical(self) -> bool:
        """True when every step replayed to the recorded outcome with the same requests."""
        return all(s.same for s in self.steps)

    @property
    def live_model_calls(self) -> int:
        """Model calls that would have been needed beyond the recording (always 0 calls were made)."""
        return sum(s.live_model_calls for s in self.steps)


class _NoModel(Model):
    """The model behind a replay: any call beyond the recording fails (and nothing is called)."""

    def update_config(self, **model_config: Any) -> None:
        return None

    def get_config(self) -> dict[str, Any]:
        return {"model_id": "replay"}

    def structured_output(self, output_model: type[T], prompt: Any, system_prompt: str | None = None,
                          **kwargs: Any) -> AsyncGenerator[dict[str, T | Any], None]:
        raise ReplayExhausted("replay cannot call a model")

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[StreamEvent]:
        raise ReplayExhausted("the replayed step needed a model call that was not recorded")
        yield  # pragma: no cover - makes this an async generator


_Final = tuple[int | None, JournalEvent | None, dict[str, Any] | None]


def _final_attempts(events: list[JournalEvent]) -> dict[str, _Final]:
    """step -> (attempt, its step_start event, its recorded outcome) for each step's last finished attempt."""
    starts: dict[tuple[str, int | None], JournalEvent] = {}
    result: dict[str, _Final] = {}
    for event in events:
        if event.step is None or "/" in event.step:  # a delegated call: its caller replays it from its result
            continue
        if event.type == "step_start":
            starts[(event.step, event.attempt)] = event
        elif event.type == "outcome":
            result[event.step] = (event.attempt, starts.get((event.step, event.attempt)), event.data.get("outcome"))
        elif event.type == "step_skipped":
            start = starts.get((event.step, event.attempt))
            result[event.step] = (event.attempt, start, {"kind": "skipped", "reason": event.data.get("reason")})
    return result


def _compare(recorded: dict[str, Any] | None, replayed: dict[str, Any] | None) -> list[str]:
    if recorded == replayed:
        return []
    if recorded is None or replayed is None:
        return [f"outcome: recorded {recorded!r}, replayed {replayed!r}"]
    if recorded.get("kind") != replayed.get("kind"):
        return [f"outcome kind: recorded {recorded.get('kind')}, replayed {replayed.get('kind')}"
                + (f" ({replayed.get('message')})" if replayed.get("message") else "")]
    diffs = []
    for key in sorted(set(recorded) | set(replayed)):
        if recorded.get(key) != replayed.get(key):
            diffs.append(f"{key}: recorded {recorded.get(key)!r}, replayed {replayed.get(key)!r}")
    return diffs


def replay_run(runtime: Runtime, run_id: str) -> ReplayReport:
    """Replay ``run_id`` offline (see module docstring)."""
    run = runtime.store.get_run(run_id)
    wf = get_workflow(run.workflow, run.workflow_module)
    events = runtime.journal.read(run_id)
    report = ReplayReport(run_id=run_id, workflow=run.workflow)
    for step_key, (attempt, start, recorded) in _final_attempts(events).items():
        record = runtime.store.get_step(run_id, step_key)
        kind = record.kind if record else "agent"
        item = StepReplay(step_key=step_key, kind=kind, attempt=attempt, recorded=recorded)
        data = start.data if start else {}
        step = wf.steps.get(record.step_id if record else step_key)
        if start is None or step is None:
            item.differences.append("not replayable: the step's start is not in the journal (or the step was removed)")
            report.steps.append(item)
            continue
        if start.data.get("_truncated"):
            item.differences.append("not replayable: the step's journaled input was truncated")
            report.steps.append(item)
            continue
        if recorded and recorded.get("kind") == "skipped":
            state = wf.state_model.model_validate(data.get("state", {}))
            try:
                reason = skip_reason(wf, step, {}, state) if step.when is not None else recorded.get("reason")
            except Exception as exc:  # noqa: BLE001
                reason = f"condition raised {type(exc).__name__}: {exc}"
            item.replayed = {"kind": "skipped", "reason": reason} if reason else {"kind": "would_run"}
        elif kind == "child":
            # the outcome is the child run's (replay that run on its own); what this run decided is the child's input
            item.replayed = recorded
            state = wf.state_model.model_validate(data.get("state", {}))
            try:
                value = child_input(step, state, step.child_workflow)
            except Exception as exc:  # noqa: BLE001
                value = f"inputs() raised {type(exc).__name__}: {exc}"
            if "input" in data and value != data["input"]:
                item.differences.append(f"child input: recorded {data['input']!r}, replayed {value!r}")
        elif kind in ("agent", "branch"):
            spec = get_agent(str(data.get("agent") or step.spec.name))
            if data.get("model"):
                spec = spec.with_model(str(data["model"]))
            if str(data.get("agent_version", spec.version)) != spec.version:
                item.differences.append(f"agent {spec.name} version: recorded {data.get('agent_version')}, "
                                        f"current {spec.version}")
            exchanges = runtime.journal.exchanges(run_id, step_key, attempt or 1)
            tools = {str(e.data.get("idempotency_key")): e.data for e in events
                     if e.type == "tool_result" and e.step == step_key and e.attempt == attempt}
            agent_run = run_agent(spec, data.get("input"), model=_NoModel(), settings=runtime.settings,
                                  context=StepContext(run_id=run_id, step_id=step_key, attempt=attempt or 1),
                                  recorded=exchanges, recorded_tools=tools)
            item.replayed = agent_run.outcome.model_dump(mode="json")
            item.model_calls_replayed = sum(1 for e in agent_run.exchanges if e.replayed)
            item.live_model_calls = agent_run.live_model_calls
            for old, new in zip(exchanges, agent_run.exchanges, strict=False):
                if old.request_digest != new.request_digest:
                    item.differences.append(f"model call {old.call_index + 1}: the request differs from the recorded "
                                            "one (instructions, input, history or tools changed)")
            if agent_run.live_model_calls:
                item.differences.append(f"needed {agent_run.live_model_calls} model call(s) beyond the recording")
            if len(agent_run.exchanges) < len(exchanges):
                item.differences.append(f"used {len(agent_run.exchanges)} of {len(exchanges)} recorded responses")
        else:
            state = wf.state_model.model_validate(data.get("state", {}))
            outcome = run_deterministic(runtime.store, run, wf, step, state)
            item.replayed = outcome.model_dump(mode="json")
        item.differences += _compare(recorded, item.replayed)
        item.same = not item.differences
        report.steps.append(item)
    return report

