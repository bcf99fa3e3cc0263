"""Workflow definitions are validated when registered: clear errors at import time (unit tests, no Redis)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from teamster.agents.spec import AgentSpec
from teamster.errors import UnknownWorkflow, WorkflowDefinitionError
from teamster.orchestrator.escalation import retry_with
from teamster.orchestrator.models import StepStatus
from teamster.orchestrator.planner import ready_steps, run_complete
from teamster.orchestrator.workflow import Workflow, get_workflow


class In(BaseModel):
    text: str
    items: list[str] = []


class Out(BaseModel):
    label: str


class ItemIn(BaseModel):
    item: str


agent = AgentSpec(name="wf_unit_agent", input_model=In, output_model=Out, instructions="x")
item_agent = AgentSpec(name="wf_unit_item", input_model=ItemIn, output_model=Out, instructions="x")


def test_a_valid_workflow_generates_its_state_model() -> None:
    wf = Workflow("wf_ok", input_model=In)
    wf.step("a", agent)
    wf.step("b", agent, after="a")
    wf.fan_out("each", item_agent, over=lambda s: [{"item": i} for i in s.items], after="b")
    wf.join("all", fan_out="each")
    wf.register()
    assert get_workflow("wf_ok") is wf
    fields = wf.state_model.model_fields
    assert {"text", "items", "a", "b", "all"} <= set(fields)
    assert wf.roots() == ["a"] and wf.successors("a") == ["b"]


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda wf: wf.step("a", agent, after="ghost"), "unknown step 'ghost'"),
        (lambda wf: (wf.step("a", agent, after="b"), wf.step("b", agent, after="a"), wf.step("c", agent)), "cycle"),
        (lambda wf: wf.step("a", "no_such_agent"), "unknown agent 'no_such_agent'"),
        (lambda wf: wf.fan_out("f", item_agent, over=lambda s: []), "needs exactly one join"),
        (lambda wf: (wf.fan_out("f", item_agent, over=lambda s: []), wf.join("j", fan_out="f"),
                     wf.step("x", agent, after="f")), "must come after its join"),
        (lambda wf: (wf.step("a", agent), wf.join("j", fan_out="a")), "not a fan-out step"),
        (lambda wf: None, "has no steps"),
    ],
)
def test_invalid_workflows_fail_at_registration(build: object, fragment: str) -> None:
    wf = Workflow("wf_bad", input_model=In)
    build(wf)  # type: ignore[operator]
    with pytest.raises(WorkflowDefinitionError) as info:
        wf.register()
    assert fragment in str(info.value)


def test_declaration_errors_are_immediate() -> None:
    wf = Workflow("wf_decl", input_model=In)
    wf.step("a", agent)
    with pytest.raises(WorkflowDefinitionError, match="duplicate step id"):
        wf.step("a", agent)
    with pytest.raises(WorkflowDefinitionError, match="exactly one of agent= or fn="):
        wf.step("b")
    with pytest.raises(WorkflowDefinitionError, match="may not contain"):
        wf.step("b[0]", agent)
    with pytest.raises(WorkflowDefinitionError, match="alphanumeric"):
        Workflow("bad name!", input_model=In)


def test_output_without_a_destination_is_rejected() -> None:
    class State(BaseModel):
        text: str

    wf = Workflow("wf_nowhere", input_model=In, state_model=State)
    wf.step("a", agent)
    with pytest.raises(WorkflowDefinitionError, match="nowhere to go"):
        wf.register()


def test_unknown_workflow_lists_the_known_ones() -> None:
    with pytest.raises(UnknownWorkflow, match="registered:"):
        get_workflow("nope")


def test_planner_readiness_and_completion() -> None:
    wf = Workflow("wf_plan", input_model=In)
    wf.step("a", agent)
    wf.fan_out("each", item_agent, over=lambda s: [], after="a")
    wf.join("all", fan_out="each")
    wf.validate()
    assert [s.key for s in ready_steps(wf, {}, {})] == ["a"]
    done = {"a": StepStatus.SUCCEEDED, "each": StepStatus.SUCCEEDED, "each[0]": StepStatus.SUCCEEDED,
            "each[1]": StepStatus.RUNNING}
    assert ready_steps(wf, done, {"each": 2}) == []  # the join waits for every branch
    done["each[1]"] = StepStatus.SUCCEEDED
    assert [s.key for s in ready_steps(wf, done, {"each": 2})] == ["all"]
    assert not run_complete(wf, done)
    done["all"] = StepStatus.SUCCEEDED
    assert run_complete(wf, done)
    done["each[1]"] = StepStatus.FAILED
    assert not run_complete(wf, done)


# ----------------------------------------------------------------------------- child steps


def _child_workflow(name: str) -> Workflow:
    child = Workflow(name, input_model=In, output_model=Out)
    child.step("label", agent)
    return child


def test_a_child_step_types_its_state_field_with_the_childs_output_model() -> None:
    child = _child_workflow("wf_child_typed")  # not registered: the parent registers it
    wf = Workflow("wf_parent_typed", input_model=In)
    wf.child("sub", child, inputs=lambda s: {"text": s.text})
    wf.step("after", agent, after="sub")
    wf.register()
    assert get_workflow("wf_child_typed") is child
    assert wf.steps["sub"].kind == "child" and wf.steps["sub"].workflow == "wf_child_typed"
    assert wf.state_model.model_fields["sub"].annotation == Out | None
    assert wf.successors("sub") == ["after"]


def test_a_workflow_cannot_be_its_own_child() -> None:
    wf = Workflow("wf_self", input_model=In)
    with pytest.raises(WorkflowDefinitionError, match="cannot be its own child"):
        wf.child("again", wf)
    with pytest.raises(WorkflowDefinitionError, match="cannot be its own child"):
        wf.child("again", "wf_self")


def test_a_child_step_cannot_escalate_with_retry_with() -> None:
    wf = Workflow("wf_child_retry_with", input_model=In)
    with pytest.raises(WorkflowDefinitionError, match="retry_with"):
        wf.child("sub", "wf_child_typed", escalate=[retry_with(model="scripted")])


def test_a_child_named_before_it_is_registered_needs_a_place_for_its_output() -> None:
    wf = Workflow("wf_parent_late", input_model=In)
    wf.child("sub", "wf_child_late")
    with pytest.raises(WorkflowDefinitionError, match="not registered yet"):
        wf.register()
    late = Workflow("wf_parent_late_writes", input_model=In)
    late.child("sub", "wf_child_late", writes=lambda state, out: state)  # looked up when the step first runs
    late.register()
    _child_workflow("wf_child_late").register()
    assert late.steps["sub"].child_workflow.name == "wf_child_late"
