"""Child steps: start the child run and park, or end with the settled child's result.

A delivery of a claimed child step (:meth:`~teamster.orchestrator.workflow.Workflow.child`) does one of three things,
decided by the child run it reads (its id is derived from the parent run and the step key,
:func:`~teamster.orchestrator.children.child_run_id`):

* **no child yet** -- build the child's input from the parent's state, then, in one transaction guarded by the
  step's fencing token and status, the parent's state version and the child's absence: create the child run (state
  v0, its first steps queued) and park the step (``parked``, lease and in-flight entry dropped, a ``parked`` entry
  for the watchdog). A worker killed before the transaction leaves a running step whose lease lapses and is taken
  over; after it, a parked step. Either way one child, at most (I1, I4).
* **child still running** (the parent's dead-letter entry was retried while its child runs again) -- park again,
  guarded by the child not having settled meanwhile.
* **child settled** -- succeeded: the step succeeds with the child's output, validated as the child workflow's output
  model, and commits like any step (``writes`` as usual); escalated, needs_human, failed, cancelled (or gone): the step
  fails with :class:`~teamster.errors.ChildRunFailed`, linking the child run, its status and its dead-letter entry,
  and is dead-lettered with the step's escalation policy.

The parked step is queued again by whatever settles the child (:mod:`~teamster.orchestrator.children`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Succeeded, failed_from
from teamster.agents.runner import validate_input
from teamster.errors import ChildRunFailed, InvalidInput, InvalidOutput, RunNotFound, TeamsterError
from teamster.orchestrator import metrics
from teamster.orchestrator.children import SETTLED_RUN, ParentWake, child_run_id, requeue_parked_ops
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import Delivery, RunRecord, RunStatus, StepExecution, StepRecord, StepStatus, now
from teamster.orchestrator.planner import child_input
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.store import Tx, TxRejected
from teamster.orchestrator.transitions import NewRun, Transitions, run_deadline_seconds, step_label
from teamster.orchestrator.workflow import StepDef, Workflow

__all__ = ["ChildSteps"]

StepResult = Succeeded | CannotComplete | NeedsHuman | Failed
Events = list[tuple[str, dict[str, Any]]]


class ChildSteps:
    """Runs the claimed deliveries of child steps (see module docstring).

    Args:
        runtime: The deployment.
        transitions: The write side the parking transaction shares its guards and journal writes with.
    """

    def __init__(self, runtime: Runtime, transitions: Transitions) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.store = runtime.store
        self.keys = runtime.keys
        self.transitions = transitions

    def run(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int, state: BaseModel,
            start: dict[str, Any]) -> StepExecution | tuple[StepResult, Events]:
        """One claimed delivery: a :class:`StepExecution` when the step parked (or its parking was rejected), else
        the step's result and its journal events, for the caller to commit or dead-letter."""
        child_id = child_run_id(run.run_id, record.step_key)
        start.update(child_run=child_id, workflow=step.workflow, state=state.model_dump(mode="json"))
        for _ in range(3):  # the child appears or settles between the read and the write: read it again
            child = self._child(child_id)
            if child is not None and child.status in SETTLED_RUN:
                return self._result(run, step, child, start, state)
            if child is None and record.child_run:
                error = ChildRunFailed(f"child run {child_id} no longer exists (expired, or lost by Redis)",
                                       child_run=child_id, child_workflow=step.workflow, child_status="missing")
                return self._failed(error, start)
            if child is None:
                try:
                    new = self._new_child(run, wf, step, record, state, start)
                except TeamsterError as exc:
                    return self._failed(exc, start)
                parked = self._park(run, wf, record, token, start, child_id, new)
            else:
                parked = self._park(run, wf, record, token, start, child_id, None)
            if parked is not None:
                return parked
        raise ChildRunFailed(f"child run {child_id} kept changing while step {record.step_key!r} tried to park")

    def wake_parked(self, run_id: str, key: str, child_id: str, child_status: RunStatus | None) -> bool:
        """The watchdog's safety net: queue a parked child step again whose child run settled (or is gone) without
        waking it, and send it. Returns whether it was still parked on that child."""
        tx = Tx()
        tx.require("step_status", self.keys.step(run_id, key), "status", "eq", StepStatus.PARKED)
        tx.require("child_run", self.keys.step(run_id, key), "child_run", "eq", child_id)
        requeue_parked_ops(tx, self.keys, self.rt.journal, self.settings, run_id, key, now(),
                           reason=f"child run {child_id} is {child_status or 'gone'}",
                           settled={"child_run": child_id, "status": child_status or "missing", "by": "watchdog",
                                    "reason": "the child settled without waking the step"})
        try:
            self.store.apply(tx)
        except TxRejected:
            return False
        self.transitions.wake_sent(ParentWake(run_id, key, 1), [True])
        return True

    # ------------------------------------------------------------------ internals
    def _child(self, child_id: str) -> RunRecord | None:
        try:
            return self.store.get_run(child_id)
        except RunNotFound:
            return None

    def _new_child(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, state: BaseModel,
                   start: dict[str, Any]) -> NewRun:
        """The child run to create (validated like a submitted run; nothing is written)."""
        child_wf = step.child_workflow
        try:
            value = child_input(step, state, child_wf)
        except Exception as exc:  # noqa: BLE001 - a broken inputs() mapping is the step's failure
            raise InvalidInput(f"could not build the input of child step {step.id!r}: {type(exc).__name__}: {exc}",
                               ) from None
        start["input"] = value
        try:
            return self.transitions.prepare_run(child_wf, value, f"{run.run_id}:{record.step_key}",
                                                run_id=child_run_id(run.run_id, record.step_key),
                                                parent=(run, record.step_key))
        except InvalidInput as exc:
            raise InvalidInput(f"child step {step.id!r}: {exc.message}", **exc.details) from None

    def _park(self, run: RunRecord, wf: Workflow, record: StepRecord, token: int, start: dict[str, Any],
              child_id: str, new: NewRun | None) -> StepExecution | None:
        """Create the child (``new``) or expect it running, and park the step, in one transaction. None: the child
        appeared or settled meanwhile (read it again)."""
        run_id, key = run.run_id, record.step_key
        current = run
        first = True

        def attempt() -> StepExecution | None:
            nonlocal current, first
            if not first:
                current = self.store.get_run(run_id)
            first = False
            t = now()
            tx = self.transitions._ending_step_tx(run_id, key, token, frozenset({StepStatus.RUNNING}),
                                                  current.state_version)
            if new is not None:
                self.transitions.new_run_ops(tx, new)
                event = ("child_started", {"child_run": child_id, "workflow": new.wf.name, "input": new.record.input})
            else:
                tx.require("child_status", self.keys.run(child_id), "status", "in",
                           [RunStatus.PENDING, RunStatus.RUNNING])
                event = ("step_parked", {"child_run": child_id, "reason": "the child run is running again"})
            member = Keys.member(run_id, key)
            tx.hset(self.keys.step(run_id, key), {"status": StepStatus.PARKED, "child_run": child_id, "parked_at": t,
                                                  "next_retry_at": None, "finished_at": None,
                                                  "reason": f"waiting for child run {child_id}"})
            tx.hset(self.keys.steps(run_id), {key: StepStatus.PARKED})
            tx.hset(self.keys.run(run_id), {"state_version": current.state_version + 1, "updated_at": t,
                                            "progress_at": t})
            tx.call("ZREM", self.keys.inflight, member)
            tx.call("ZADD", self.keys.parked, t + self.settings.stuck_queued_seconds, member)
            tx.call("ZADD", self.keys.active_runs, t + run_deadline_seconds(wf, self.settings), run_id)
            events: Events = [("step_start", start), event]
            self.transitions._journal_ops(tx, run_id, key, record.attempts, events)
            try:
                self.store.apply(tx)
            except TxRejected as rejected:
                if rejected.guard in ("run_absent", "child_status"):
                    return None
                # the attempt's start is kept; the child was not started (nor the step parked)
                return self.transitions._rejected(run_id, key, record, token, rejected, events[:1])
            if new is not None:
                metrics.CHILD_RUNS.labels(run.workflow, new.wf.name, "started").inc()
                self.transitions.enqueue(child_id, [s.key for s in new.first],
                                         {s.key: step_label(new.wf, s.step_id) for s in new.first})
            return StepExecution(Delivery.PARKED, run_id, key, step_status=StepStatus.PARKED, attempt=record.attempts,
                                 detail={"child_run": child_id, "created": new is not None})

        return self.store.optimistic(f"park {run_id}:{key}", attempt)

    def _result(self, run: RunRecord, step: StepDef, child: RunRecord, start: dict[str, Any],
                state: BaseModel) -> tuple[StepResult, Events]:
        """The step's result from its settled child run."""
        try:
            start["input"] = child_input(step, state, step.child_workflow)
        except Exception:  # noqa: BLE001 - only journaled (for replay); the child already ran with its input
            start["input"] = child.input
        metrics.CHILD_RUNS.labels(run.workflow, child.workflow, child.status.value).inc()
        if child.status != RunStatus.SUCCEEDED:
            error = child.error or {}
            entry = error.get("dlq_entry")
            failure = ChildRunFailed(
                f"child run {child.run_id} ({child.workflow}) is {child.status.value}: "
                f"{error.get('error_type', '?')}: {error.get('message', '')}"
                + (f" (its dead-letter entry: {entry})" if entry else ""),
                child_run=child.run_id, child_workflow=child.workflow, child_status=child.status.value,
                child_entry=entry, child_error_type=error.get("error_type"), child_step=error.get("step"))
            return self._failed(failure, start)
        try:
            model = step.child_workflow.result_model
            output = validate_input(model, child.output or {}, what=f"the output of child run {child.run_id}")
        except InvalidInput as exc:
            return self._failed(InvalidOutput(exc.message, child_run=child.run_id), start)
        except TeamsterError as exc:
            return self._failed(exc, start)
        result = Succeeded(output=output.model_dump(mode="json"))
        return result, [("step_start", start), ("outcome", {"outcome": result.model_dump(mode="json"),
                                                            "child_run": child.run_id, "child_status": "succeeded"})]

    @staticmethod
    def _failed(error: TeamsterError, start: dict[str, Any]) -> tuple[Failed, Events]:
        result = failed_from(error)
        return result, [("step_start", start), ("outcome", {"outcome": result.model_dump(mode="json")})]
