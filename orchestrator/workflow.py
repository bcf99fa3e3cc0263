"""Workflows declared in code: steps, dependencies, conditions, fan-out/fan-in, typed state.

Example:
    >>> wf = Workflow("triage", input_model=Ticket)
    >>> wf.step("classify", classify_agent)
    >>> wf.step("reply", reply_agent, after="classify", when=lambda s: s.classify.category != "spam")
    >>> wf.register()

A step runs when all the steps it comes ``after`` are done (succeeded, or skipped with a recorded reason)
and at least one of them succeeded; its ``when`` condition, evaluated on the run state at that moment,
decides between running and being skipped (with the condition's name as the reason). A ``fan_out`` step
runs its agent once per item of a list in state; its ``join`` waits for every branch and writes the list of
outputs into state. A ``child`` step starts a run of another registered workflow and continues with its output
(the step is parked meanwhile: no worker thread waits). A workflow is validated when registered: unknown agents,
unknown dependencies (unreachable steps), cycles, fan-outs without a join, and child steps whose workflow is the
workflow itself are errors at import time (for what is checked of a child workflow, and when, see
:meth:`Workflow.child`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, create_model

from teamster.agents.limits import RunBudget
from teamster.agents.spec import AgentSpec, RetryPolicy, get_agent, register_agent
from teamster.errors import UnknownAgent, UnknownWorkflow, WorkflowDefinitionError
from teamster.orchestrator.escalation import Policy, RetryWith

__all__ = ["Workflow", "StepDef", "register_workflow", "get_workflow", "registered_workflows"]

StepKind = Literal["agent", "function", "fan_out", "join", "child"]
StateFn = Callable[[Any], Any]


@dataclass(frozen=True)
class StepDef:
    """One declared step (see :meth:`Workflow.step`, :meth:`Workflow.fan_out`, :meth:`Workflow.join`)."""

    id: str
    kind: StepKind
    agent: str | None = None
    fn: StateFn | None = None
    after: tuple[str, ...] = ()
    when: Callable[[Any], bool] | None = None
    when_label: str = ""
    inputs: StateFn | None = None
    writes: str | Callable[[Any, Any], Any] | None = None
    over: StateFn | None = None
    fan_out: str | None = None
    into: str | None = None
    escalate: tuple[Policy, ...] = ()
    retry: RetryPolicy | None = None
    workflow: str | None = None
    """Child steps: the name of the workflow the child run runs."""
    workflow_module: str | None = None
    """Child steps: the module defining that workflow, when known (imported if it is not registered)."""

    @property
    def spec(self) -> AgentSpec[Any, Any]:
        """The step's agent spec (agent and fan-out steps)."""
        if self.agent is None:
            raise WorkflowDefinitionError(f"step {self.id!r} has no agent")
        return get_agent(self.agent)

    @property
    def child_workflow(self) -> Workflow:
        """The workflow a child step's child run runs.

        Raises:
            UnknownWorkflow: it is not registered (and its module, when known, does not register it).
        """
        if self.workflow is None:
            raise WorkflowDefinitionError(f"step {self.id!r} is not a child step")
        return get_workflow(self.workflow, self.workflow_module)


def _check_delegates(spec: AgentSpec[Any, Any], chain: list[str]) -> None:
    """Every agent ``spec`` may delegate to is registered, and no delegation chain comes back to an agent in it.

    Raises:
        UnknownAgent: a delegate is not registered.
        WorkflowDefinitionError: a delegation cycle.
    """
    chain = [*chain, spec.name]
    for name in spec.delegates:
        if name in chain:
            raise WorkflowDefinitionError(f"agent delegation cycle: {' -> '.join([*chain, name])}")
        _check_delegates(get_agent(name), chain)


def _label(fn: Callable[..., Any] | None) -> str:
    if fn is None:
        return ""
    name = getattr(fn, "__name__", "")
    return name if name and name != "<lambda>" else "condition"


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class Workflow:
    """A named workflow over a typed state.

    Args:
        name: Unique name (what ``submit`` and messages use).
        input_model: Pydantic model of the run input (validated before anything is enqueued).
        state_model: Pydantic model of the run state. Default: the input model's fields plus one optional
            field per step, named after the step, holding that step's output.
        output_model: Pydantic model of the final output. Default: the state itself.
        init_state: ``input -> state``. Default: the input's fields copied into the state model.
        output: ``state -> output``. Default: the output model validated from the state's fields.
        version: Bump when the workflow changes (recorded on runs).
        deadline_seconds: A run with no progress for this long is escalated by the watchdog
            (default ``TEAMSTER_RUN_DEADLINE_SECONDS``).
        module: The importable module that defines the workflow (default: the module creating it). Runs record
            it, so a process that does not list it in ``TEAMSTER_WORKFLOW_MODULES`` (a CLI in another shell, a
            temporary worker) can still load the workflow of a run it acts on.
        budget: What one run may spend across all its steps, branches, retries and escalations (model calls,
            tokens, cost); ``submit(..., budget=...)`` replaces it for one run. Default: unbounded.
        tenant_key: A field of the input whose value keys the provider limits per tenant (each tenant gets the
            limits on its own); default: one set of limits shared by every run.
    """

    def __init__(self, name: str, *, input_model: type[BaseModel], state_model: type[BaseModel] | None = None,
                 output_model: type[BaseModel] | None = None, init_state: StateFn | None = None,
                 output: StateFn | None = None, version: str = "1", deadline_seconds: float | None = None,
                 module: str | None = None, budget: RunBudget | None = None,
                 tenant_key: str | None = None) -> None:
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise WorkflowDefinitionError(f"workflow name {name!r} must be alphanumeric (with _ - .)")
        self.name = name
        self.input_model = input_model
        self._state_model = state_model
        self._state_schema: tuple[type[BaseModel], str] | None = None  # (the model it was computed for, the value)
        self.output_model = output_model
        self._init_state = init_state
        self._output = output
        self.version = version
        self.deadline_seconds = deadline_seconds
        if budget is not None and not isinstance(budget, RunBudget):
            raise WorkflowDefinitionError(f"workflow {name!r}: budget must be a teamster.RunBudget")
        self.budget = budget
        if tenant_key is not None and tenant_key not in input_model.model_fields:
            raise WorkflowDefinitionError(
                f"workflow {name!r}: tenant_key {tenant_key!r} is not a field of {input_model.__name__} "
                f"(fields: {', '.join(input_model.model_fields) or 'none'})")
        self.tenant_key = tenant_key
        caller = module or str(sys._getframe(1).f_globals.get("__name__", ""))
        self.module: str | None = caller if caller and caller != "__main__" else None
        self.steps: dict[str, StepDef] = {}
        self._children: dict[str, Workflow] = {}
        self._validated = False

    # ------------------------------------------------------------------ declaration
    def _add(self, step: StepDef) -> Workflow:
        if self._validated:
            raise WorkflowDefinitionError(f"workflow {self.name!r} is registered; declare steps before register()")
        if step.id in self.steps:
            raise WorkflowDefinitionError(f"workflow {self.name!r}: duplicate step id {step.id!r}")
        if not step.id or any(c in step.id for c in "[]|: "):
            raise WorkflowDefinitionError(
                f"workflow {self.name!r}: step id {step.id!r} may not contain [ ] | : or spaces")
        self.steps[step.id] = step
        return self

    @staticmethod
    def _agent_name(agent: AgentSpec[Any, Any] | str) -> str:
        if isinstance(agent, AgentSpec):
            register_agent(agent)
            return agent.name
        return agent

    def step(self, id: str, agent: AgentSpec[Any, Any] | str | None = None, *,  # noqa: A002
             fn: StateFn | None = None, after: str | Sequence[str] | None = None,
             when: Callable[[Any], bool] | None = None, inputs: StateFn | None = None,
             writes: str | Callable[[Any, Any], Any] | None = None, escalate: Sequence[Policy] = (),
             retry: RetryPolicy | None = None) -> Workflow:
        """Declare an agent step (``agent``) or a deterministic function step (``fn``).

        Args:
            id: Step id, unique in the workflow.
            agent: The agent spec (or its registered name).
            fn: For a function step: ``state -> updates`` (a dict or model merged into the state, or a whole
                new state); no model is called.
            after: Step ids this step waits for.
            when: Condition on the state; false -> the step is skipped with the condition's name as reason.
            inputs: ``state -> agent input``. Default: the agent input model's fields taken from the state.
            writes: Where the output goes: a state field name, or ``(state, output) -> new state``. Default:
                the state field named like the step, else the output's fields merged into the state.
            escalate: Escalation policies tried in order after a failure (see :mod:`orchestrator.escalation`).
            retry: Retry policy overriding the agent's.
        """
        if (agent is None) == (fn is None):
            raise WorkflowDefinitionError(f"step {id!r}: give exactly one of agent= or fn=")
        return self._add(StepDef(
            id=id, kind="agent" if agent is not None else "function",
            agent=self._agent_name(agent) if agent is not None else None, fn=fn, after=_as_tuple(after),
            when=when, when_label=_label(when), inputs=inputs, writes=writes, escalate=tuple(escalate), retry=retry,
        ))

    def fan_out(self, id: str, agent: AgentSpec[Any, Any] | str, *, over: StateFn,  # noqa: A002
                after: str | Sequence[str] | None = None, when: Callable[[Any], bool] | None = None,
                escalate: Sequence[Policy] = (), retry: RetryPolicy | None = None) -> Workflow:
        """Run ``agent`` once per item of ``over(state)`` (each item is that branch's input), in parallel.

        Every fan-out needs a :meth:`join`; nothing else may come directly after it.
        """
        return self._add(StepDef(id=id, kind="fan_out", agent=self._agent_name(agent), over=over,
                                 after=_as_tuple(after), when=when, when_label=_label(when),
                                 escalate=tuple(escalate), retry=retry))

    def join(self, id: str, *, fan_out: str, into: str | None = None,  # noqa: A002
             reduce: Callable[[Any, list[Any]], Any] | None = None) -> Workflow:
        """Wait for every branch of ``fan_out`` to succeed, then write the list of outputs into state.

        Args:
            id: Step id.
            fan_out: The fan-out step joined.
            into: State field receiving the list of branch outputs (default: the field named like ``id``).
            reduce: Instead of ``into``: ``(state, outputs) -> new state``.
        """
        return self._add(StepDef(id=id, kind="join", fan_out=fan_out, after=(fan_out,), into=into,
                                 writes=reduce))

    def child(self, id: str, workflow: Workflow | str, *, inputs: StateFn | None = None,  # noqa: A002
              after: str | Sequence[str] | None = None, when: Callable[[Any], bool] | None = None,
              writes: str | Callable[[Any, Any], Any] | None = None, escalate: Sequence[Policy] = (),
              retry: RetryPolicy | None = None) -> Workflow:
        """Declare a child step: start a run of another registered ``workflow`` and continue with its output.

        The step's first delivery starts the child run (at most once: its id is derived from this run and the step)
        and parks the step -- no worker thread or lease waits for the child. When the child run ends or starts
        waiting for an operator, the step is queued again: a child that succeeded gives the step its output (an
        instance of the child's output model, written like an agent's output); any other end (escalated,
        needs_human, failed, cancelled) fails the step with ``child_run_failed``, linking the child run and its
        dead-letter entry, and ``escalate`` runs. Cancelling this run cancels its child runs.

        What is checked when: at declaration, that ``workflow`` (a :class:`Workflow` or a name) is not this workflow
        itself and that ``escalate`` holds no ``retry_with`` (a child step has no agent to swap). At :meth:`register`,
        a child workflow given as a :class:`Workflow` is registered if it is not yet, and a child registered by then
        types this step's state field with its output model. A name registered later (two modules
        naming each other's workflows) is looked up when the step first runs -- unknown then, the step fails with
        ``unknown_workflow`` -- and needs ``writes=`` or a state field for its output (a ``state_model``).

        Args:
            id: Step id, unique in the workflow.
            workflow: The child workflow, or its registered name.
            inputs: ``state -> child run input``. Default: the child input model's fields taken from the state.
            after: Step ids this step waits for.
            when: Condition on the state; false -> the step is skipped with the condition's name as reason.
            writes: Where the child's output goes: a state field name, or ``(state, output) -> new state``.
                Default: the state field named like the step, else the output's fields merged into the state.
            escalate: Escalation policies after the step failed (``human_review()``, ``fail_run()``).
            retry: Retry policy for retryable failures of the step itself (not of the child run).
        """
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        if workflow is self or name == self.name:
            raise WorkflowDefinitionError(f"workflow {self.name!r}: child step {id!r} starts {self.name!r} itself; a "
                                          "workflow cannot be its own child")
        if any(isinstance(policy, RetryWith) for policy in escalate):
            raise WorkflowDefinitionError(f"workflow {self.name!r}: child step {id!r} cannot escalate with "
                                          "retry_with() (it has no agent); use human_review() or fail_run()")
        if isinstance(workflow, Workflow):
            self._children[name] = workflow
        return self._add(StepDef(
            id=id, kind="child", fn=None, after=_as_tuple(after), when=when, when_label=_label(when), inputs=inputs,
            writes=writes, escalate=tuple(escalate), retry=retry, workflow=name,
            workflow_module=workflow.module if isinstance(workflow, Workflow) else None,
        ))

    def _child_output_model(self, step: StepDef) -> type[BaseModel] | None:
        """A child step's output model, or None while its workflow is not registered."""
        try:
            return step.child_workflow.result_model
        except UnknownWorkflow:
            return None

    # ------------------------------------------------------------------ models
    @property
    def result_model(self) -> type[BaseModel]:
        """The model of a run's output: ``output_model``, else the state model."""
        return self.output_model or self.state_model

    @property
    def state_model(self) -> type[BaseModel]:
        """The run state model (generated when not given)."""
        if self._state_model is None:
            fields: dict[str, Any] = {}
            for step in self.steps.values():
                if step.kind == "agent" and step.id not in self.input_model.model_fields:
                    fields[step.id] = (step.spec.output_model | None, None)
                elif step.kind == "child" and step.id not in self.input_model.model_fields:
                    model = self._child_output_model(step)
                    if model is not None:
                        fields[step.id] = (model | None, None)
                elif step.kind == "join":
                    branch = self.steps[step.fan_out or ""]
                    fields[step.into or step.id] = (list[branch.spec.output_model] | None, None)  # type: ignore[name-defined]
            self._state_model = create_model(f"{self.name.title().replace('_', '')}State",  # type: ignore[call-overload]
                                             __base__=self.input_model, **fields)
        return self._state_model

    @property
    def state_schema(self) -> str:
        """The state model's name and a digest of its JSON schema, stored on every run (its schema version).

        Computed once per state model (generating its JSON schema took about 1 ms on every submit)."""
        model = self.state_model
        if self._state_schema is None or self._state_schema[0] is not model:
            schema = json.dumps(model.model_json_schema(), sort_keys=True)
            self._state_schema = (model, f"{model.__name__}@{hashlib.sha256(schema.encode()).hexdigest()[:12]}")
        return self._state_schema[1]

    def initial_state(self, value: BaseModel) -> BaseModel:
        """The state a run starts from."""
        if self._init_state is not None:
            state = self._init_state(value)
            return state if isinstance(state, self.state_model) else self.state_model.model_validate(state)
        return self.state_model.model_validate(value.model_dump())

    def final_output(self, state: BaseModel) -> BaseModel:
        """The run's output, computed from its final state."""
        if self._output is not None:
            out = self._output(state)
            if self.output_model is not None and not isinstance(out, self.output_model):
                return self.output_model.model_validate(out if isinstance(out, dict) else out.model_dump())
            return out if isinstance(out, BaseModel) else self.state_model.model_validate(out)
        if self.output_model is None:
            return state
        return self.output_model.model_validate(state.model_dump())

    # ------------------------------------------------------------------ graph
    def successors(self, step_id: str) -> list[str]:
        """Steps that come directly after ``step_id``."""
        return [s.id for s in self.steps.values() if step_id in s.after]

    def roots(self) -> list[str]:
        """Steps with no dependencies (queued when a run starts)."""
        return [s.id for s in self.steps.values() if not s.after]

    def validate(self) -> Workflow:
        """Check the definition; raise :class:`WorkflowDefinitionError` naming the problem."""
        if not self.steps:
            raise WorkflowDefinitionError(f"workflow {self.name!r} has no steps")
        problems: list[str] = []
        for step in self.steps.values():
            for dep in step.after:
                if dep not in self.steps:
                    problems.append(f"step {step.id!r} comes after unknown step {dep!r}: it can never run "
                                    "(unreachable)")
            if step.agent is not None:
                try:
                    _check_delegates(get_agent(step.agent), [])
                except UnknownAgent as exc:
                    problems.append(f"step {step.id!r}: {exc.message}")
                except WorkflowDefinitionError as exc:
                    problems.append(f"step {step.id!r}: {exc.message}")
            if step.kind == "join":
                target = self.steps.get(step.fan_out or "")
                if target is None or target.kind != "fan_out":
                    problems.append(f"join {step.id!r} joins {step.fan_out!r}, which is not a fan-out step")
            if step.kind == "child" and step.workflow == self.name:
                problems.append(f"child step {step.id!r} starts {self.name!r} itself (a workflow cannot be its own "
                                "child)")
        for step in self.steps.values():
            if step.kind == "fan_out":
                joins = [s.id for s in self.steps.values() if s.kind == "join" and s.fan_out == step.id]
                if len(joins) != 1:
                    problems.append(f"fan-out {step.id!r} needs exactly one join (found {len(joins) or 'none'}): "
                                    f"add wf.join('...', fan_out={step.id!r})")
                direct = [s.id for s in self.steps.values() if step.id in s.after and s.kind != "join"]
                if direct:
                    problems.append(f"steps {direct} come directly after fan-out {step.id!r}; they must come "
                                    "after its join")
        if not self.roots():
            problems.append("no step without dependencies: the workflow cannot start")
        cycle = self._find_cycle()
        if cycle:
            problems.append("cycle: " + " -> ".join(cycle))
        if problems:
            raise WorkflowDefinitionError(f"workflow {self.name!r} is invalid: " + "; ".join(problems))
        for child in self._children.values():
            if _WORKFLOWS.get(child.name) is None:
                register_workflow(child)
        self._check_writes()
        self._validated = True
        return self

    def _find_cycle(self) -> list[str]:
        color: dict[str, int] = {}
        path: list[str] = []

        def visit(node: str) -> list[str]:
            color[node] = 1
            path.append(node)
            for nxt in self.successors(node):
                if color.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                if color.get(nxt, 0) == 0:
                    found = visit(nxt)
                    if found:
                        return found
            path.pop()
            color[node] = 2
            return []

        for node in self.steps:
            if color.get(node, 0) == 0:
                found = visit(node)
                if found:
                    return found
        return []

    def _check_writes(self) -> None:
        fields = set(self.state_model.model_fields)
        for step in self.steps.values():
            if step.writes is not None:
                continue
            if step.kind == "join" and (step.into or step.id) not in fields:
                raise WorkflowDefinitionError(f"workflow {self.name!r}: join {step.id!r} writes into state field "
                                              f"{step.into or step.id!r}, which {self.state_model.__name__} lacks")
            if step.kind == "child":
                model = self._child_output_model(step)
                if model is None and step.id not in fields:
                    raise WorkflowDefinitionError(
                        f"workflow {self.name!r}: child step {step.id!r} starts workflow {step.workflow!r}, which is "
                        "not registered yet, so its output has no typed place in the state: register it first, or "
                        f"pass writes=, or give a state_model with a field {step.id!r}")
                out_fields = set(model.model_fields) if model is not None else set()
            elif step.kind == "agent":
                out_fields = set(step.spec.output_model.model_fields)
            else:
                continue
            if step.id not in fields and not out_fields <= fields:
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r}: the output of step {step.id!r} has nowhere to go in "
                    f"{self.state_model.__name__}: add a state field {step.id!r}, or pass writes=")

    # ------------------------------------------------------------------ registry
    def register(self) -> Workflow:
        """Validate and register under :attr:`name`; returns self."""
        self.validate()
        register_workflow(self)
        return self


_WORKFLOWS: dict[str, Workflow] = {}
_LOCK = threading.Lock()


def register_workflow(workflow: Workflow) -> Workflow:
    """Register a validated workflow (a later registration of the same name replaces it)."""
    if not workflow._validated:
        workflow.validate()
    with _LOCK:
        _WORKFLOWS[workflow.name] = workflow
    return workflow


def get_workflow(name: str, module: str | None = None) -> Workflow:
    """The registered workflow called ``name``; when it is not registered and ``module`` (the module a run recorded
    as defining it) is given, that module is imported first.

    Raises:
        UnknownWorkflow: with the registered names.
    """
    if name not in _WORKFLOWS and module:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # reported below as an unknown workflow, naming the module
    try:
        return _WORKFLOWS[name]
    except KeyError:
        known = ", ".join(sorted(_WORKFLOWS)) or "none"
        where = f"; its module {module!r} cannot be imported here" if module else ""
        raise UnknownWorkflow(f"unknown workflow {name!r} (registered: {known}){where}") from None


def registered_workflows() -> dict[str, Workflow]:
    """A copy of the registry."""
    return dict(_WORKFLOWS)

