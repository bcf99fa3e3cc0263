"""Pure planning over a workflow: which steps become ready, when a run is complete, how outputs enter state.

No I/O here: the engine reads the store, asks the planner, and writes the answer in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from teamster.agents.runner import format_validation_error
from teamster.errors import InvalidOutput, WorkflowDefinitionError
from teamster.orchestrator.models import STEP_DONE, StepRecord, StepStatus
from teamster.orchestrator.workflow import StepDef, Workflow

__all__ = ["NewStep", "branch_key", "ready_steps", "run_complete", "skip_reason", "step_input", "child_input",
           "apply_output"]


@dataclass(frozen=True)
class NewStep:
    """A step record to create (queued)."""

    key: str
    step_id: str
    kind: str
    branch_index: int | None = None
    input: Any = None


def branch_key(fan_out_id: str, index: int) -> str:
    """Step key of branch ``index`` of a fan-out."""
    return f"{fan_out_id}[{index}]"


def _join_ready(wf: Workflow, join: StepDef, statuses: Mapping[str, StepStatus], branches: Mapping[str, int]) -> bool:
    fan_out = join.fan_out or ""
    status = statuses.get(fan_out)
    if status == StepStatus.SKIPPED:
        return True
    if status != StepStatus.SUCCEEDED:
        return False
    count = branches.get(fan_out, 0)
    return all(statuses.get(branch_key(fan_out, i)) == StepStatus.SUCCEEDED for i in range(count))


def ready_steps(wf: Workflow, statuses: Mapping[str, StepStatus], branches: Mapping[str, int]) -> list[NewStep]:
    """Steps without a record whose dependencies are all done (joins: every branch succeeded)."""
    ready = []
    for step in wf.steps.values():
        if step.id in statuses:
            continue
        if any(statuses.get(dep) not in STEP_DONE for dep in step.after):
            continue
        if step.kind == "join" and not _join_ready(wf, step, statuses, branches):
            continue
        ready.append(NewStep(key=step.id, step_id=step.id, kind=step.kind))
    return ready


def run_complete(wf: Workflow, statuses: Mapping[str, StepStatus]) -> bool:
    """True when every declared step has a record and every record (branches included) is done."""
    return all(s in statuses for s in wf.steps) and all(v in STEP_DONE for v in statuses.values())


def skip_reason(wf: Workflow, step: StepDef, statuses: Mapping[str, StepStatus], state: BaseModel) -> str | None:
    """Why a ready step is skipped instead of run (None: it runs). May raise from a user condition."""
    if step.after and all(statuses.get(dep) == StepStatus.SKIPPED for dep in step.after):
        return "all upstream steps were skipped"
    if step.when is not None and not step.when(state):
        return f"condition {step.when_label!r} is false"
    return None


def step_input(wf: Workflow, step: StepDef, state: BaseModel, record: StepRecord) -> Any:
    """The input an agent step receives: the branch item, ``inputs(state)``, or the fields named alike."""
    if record.branch_index is not None:
        return record.input
    if step.inputs is not None:
        return step.inputs(state)
    wanted = step.spec.input_model.model_fields
    dumped = state.model_dump(mode="json")
    return {name: dumped[name] for name in wanted if name in dumped}


def child_input(step: StepDef, state: BaseModel, child: Workflow) -> Any:
    """The input a child step gives its child run: ``inputs(state)``, or the child input model's fields taken from
    the state (a model is dumped to JSON)."""
    if step.inputs is not None:
        value = step.inputs(state)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    dumped = state.model_dump(mode="json")
    return {name: dumped[name] for name in child.input_model.model_fields if name in dumped}


def _validated_state(wf: Workflow, value: Any, step_id: str) -> BaseModel:
    try:
        if isinstance(value, wf.state_model):
            return value
        return wf.state_model.model_validate(value.model_dump() if isinstance(value, BaseModel) else value)
    except ValidationError as exc:
        raise InvalidOutput(f"step {step_id!r} produced a state that does not match "
                            f"{wf.state_model.__name__}: {format_validation_error(exc)}") from None


def apply_output(wf: Workflow, step: StepDef, state: BaseModel, output: Any) -> BaseModel:
    """The new run state after ``step`` produced ``output`` (a model, dict, or list of branch outputs).

    Agent and child steps write into the state field named like the step when there is one, else merge their
    output's fields into the state; function steps return state updates, merged into the state (or a whole new
    state); joins write the list of branch outputs; ``writes=`` overrides all of this.
    """
    if step.kind == "fan_out":
        return state
    if callable(step.writes):
        return _validated_state(wf, step.writes(state, output), step.id)
    data = state.model_dump()
    if isinstance(step.writes, str):
        data[step.writes] = output
    elif step.kind == "join":
        data[step.into or step.id] = output
    elif step.kind in ("agent", "child") and step.id in wf.state_model.model_fields:
        data[step.id] = output
    elif isinstance(output, BaseModel) and isinstance(output, wf.state_model):
        return output
    elif isinstance(output, (dict, BaseModel)):
        data.update(output.model_dump() if isinstance(output, BaseModel) else output)
    else:
        raise WorkflowDefinitionError(f"step {step.id!r} returned {type(output).__name__}; return a model or dict")
    return _validated_state(wf, data, step.id)
