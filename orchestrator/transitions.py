"""Atomic state transitions of runs, steps and dead-letter entries: create, commit, retry, dead-letter, close,
cancel.

Each transition reads what it needs, lets the planner decide, and writes everything in one guarded
:class:`~teamster.orchestrator.store.Tx`. Guards: the step's fencing token (I4) and expected status (a step ends
once), the run's state version (optimistic concurrency: parallel branches of a run serialise their commits by
re-planning on a version conflict, in :meth:`RunStore.optimistic`) and the run not being final. There is one
way to write a dead-letter entry (:meth:`Transitions.write_entry`) and one way to close one
(:meth:`Transitions.close_entry`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from teamster.agents.limits import RunBudget
from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Succeeded, failed_from
from teamster.agents.payload import check_payload
from teamster.agents.runner import AgentRun, validate_input
from teamster.agents.spec import RetryPolicy
from teamster.config.settings import TeamsterSettings
from teamster.errors import (
    IdempotencyConflict,
    InvalidInput,
    InvalidOperation,
    InvalidOutput,
    PayloadRejected,
    RunDeadlineExceeded,
    StepCancelled,
    TeamsterError,
)
from teamster.orchestrator import metrics
from teamster.orchestrator.children import ParentWake, cancel_tree, wake_parent
from teamster.orchestrator.escalation import FailRun, HumanReview, Policy, RetryWith, send_alert
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import (
    RUN_TERMINAL,
    STEP_OPEN,
    DeadLetterEntry,
    DeadLetterStatus,
    Delivery,
    RunRecord,
    RunStatus,
    StepExecution,
    StepRecord,
    StepStatus,
    now,
)
from teamster.orchestrator.planner import NewStep, apply_output, branch_key, ready_steps, run_complete, step_input
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.store import Tx, TxRejected, VersionConflict, literal
from teamster.orchestrator.tracing import new_trace_id
from teamster.orchestrator.workflow import StepDef, Workflow

__all__ = ["Transitions", "NewRun", "Resolution", "combine_run_status", "agent_stats", "step_label",
           "run_deadline_seconds"]

log = logging.getLogger(__name__)


def combine_run_status(current: RunStatus, new: RunStatus) -> RunStatus:
    """A run's status after a step asks for ``new`` (failed > escalated > needs_human > running)."""
    order = {RunStatus.PENDING: 0, RunStatus.RUNNING: 0, RunStatus.NEEDS_HUMAN: 1, RunStatus.ESCALATED: 2,
             RunStatus.FAILED: 3}
    return new if order.get(new, 0) >= order.get(current, 0) else current


def run_deadline_seconds(wf: Workflow | None, settings: TeamsterSettings) -> float:
    """How long a run of ``wf`` may go without progress before the watchdog escalates it: the workflow's own
    ``deadline_seconds``, else ``run_deadline_seconds`` (also when the workflow cannot be loaded, ``wf`` None)."""
    return (wf.deadline_seconds if wf is not None else None) or settings.run_deadline_seconds


def step_label(wf: Workflow, step_id: str) -> str:
    """What Flower and the worker log call a step's task: ``workflow.step_id``, plus ``:agent`` for agent steps."""
    agent = wf.steps[step_id].agent
    return f"{wf.name}.{step_id}" + (f":{agent}" if agent else "")


def agent_stats(agent_run: AgentRun | None) -> dict[str, Any]:
    """The step-record fields that say what an agent attempt cost."""
    if agent_run is None:
        return {}
    return {"model_calls": agent_run.model_calls, "live_model_calls": agent_run.live_model_calls,
            "tool_calls": agent_run.tool_calls, "tokens": int(agent_run.usage.get("totalTokens", 0)),
            "duration_seconds": round(agent_run.duration_seconds, 4)}


@dataclass(frozen=True)
class NewRun:
    """A run ready to be written (:meth:`Transitions.prepare_run`): its workflow, record and first steps."""

    wf: Workflow
    record: RunRecord
    first: list[NewStep]


@dataclass(frozen=True)
class Resolution:
    """An operator supplies a waiting step's output by hand (``teamster dlq resolve``)."""

    entry_id: str
    by: str
    reason: str


class Transitions:
    """The write side of the orchestrator (see module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.store = runtime.store
        self.journal = runtime.journal
        self.keys: Keys = runtime.keys

    # ------------------------------------------------------------------ helpers
    def enqueue(self, run_id: str, step_keys: list[str], labels: Mapping[str, str | None] | None = None) -> None:
        """Send step messages (``labels``: step key -> the name Flower shows); a failure here is recovered by the
        watchdog (the steps are recorded queued)."""
        for key in step_keys:
            try:
                self.rt.enqueuer.enqueue(run_id, key, label=(labels or {}).get(key))
            except Exception as exc:  # noqa: BLE001
                log.warning("could not enqueue %s:%s (%s); the watchdog will re-send it", run_id, key, exc)

    def _new_step_ops(self, tx: Tx, run_id: str, wf: Workflow, new: list[NewStep], t: float, *,
                      journal: bool = True) -> None:
        for item in new:
            agent = wf.steps[item.step_id].agent
            record = StepRecord(run_id=run_id, step_key=item.key, step_id=item.step_id, kind=item.kind,
                                label=step_label(wf, item.step_id), agent=agent,
                                branch_index=item.branch_index, input=item.input, queued_at=t)
            tx.hset(self.keys.step(run_id, item.key), record.model_dump(mode="json"))
            tx.call("ZADD", self.keys.inflight, t + self.settings.stuck_queued_seconds, Keys.member(run_id, item.key))
            if journal:
                tx.xadd(self.keys.journal(run_id), self.journal.fields("step_queued", step=item.key,
                                                                        data={"kind": item.kind}))

    def _ending_step_tx(self, run_id: str, key: str, token: int | None, expected: frozenset[StepStatus],
                        state_version: int) -> Tx:
        """A transaction guarded the way every step-ending write is: the fencing token (when a worker holds
        one), the step's expected status (a step ends once), the run's state version and a non-final run. It is
        stamped on the step record, so a retry after a lost reply recognises it was applied."""
        tx = Tx(marker=(self.keys.step(run_id, key), "last_write"))
        if token is not None:
            tx.require("fence", self.keys.step(run_id, key), "fence", "eq", token)
        tx.require("step_status", self.keys.step(run_id, key), "status", "in", sorted(expected))
        tx.require("state_version", self.keys.run(run_id), "state_version", "eq", state_version)
        tx.require("run_status", self.keys.run(run_id), "status", "nin", sorted(RUN_TERMINAL))
        return tx

    def _settle_retention(self, run_id: str) -> None:
        """A finished run without open dead-letter entries expires after the TTL; one with open entries never."""
        if self.store.open_entries(run_id):
            self.store.persist_run(run_id)
        else:
            self.store.expire_run(run_id, self.settings.finished_run_ttl_seconds)

    def wake_sent(self, wake: ParentWake | None, held: list[bool]) -> None:
        """Send the parent step's message when the transaction that settled a child run queued it again."""
        if wake is not None and wake.applied(held):
            label = self.store.client.hget(self.keys.step(wake.run_id, wake.step_key), "label")
            self.enqueue(wake.run_id, [wake.step_key], {wake.step_key: json.loads(label) if label else None})

    def entry_input(self, run: RunRecord, wf: Workflow | None, step: StepDef | None,
                    record: StepRecord | None) -> dict[str, Any] | None:
        """The input a dead-letter entry records: what the step last started with (from the journal), else what
        it would start with now (an attempt that died before journaling its input, a step that never started)."""
        if record is None:
            return None
        for start in reversed(self.journal.read(run.run_id, types=("step_start",), step=record.step_key)):
            value = start.data.get("input", start.data.get("state"))
            if value is not None:
                return value if isinstance(value, dict) else {"value": value}
        if wf is None or step is None:
            return None
        try:
            state = wf.state_model.model_validate(run.state)
            if record.kind in ("agent", "branch"):
                value = step_input(wf, step, state, record)
                value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            else:
                value = state.model_dump(mode="json")
        except Exception as exc:  # noqa: BLE001 - the entry must exist even if the input cannot be derived
            return {"_unavailable": f"{type(exc).__name__}: {exc}"}
        return value if isinstance(value, dict) else {"value": value}

    def _journal_ops(self, tx: Tx, run_id: str, key: str, attempt: int,
                     events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        for event_type, data in events:
            tx.xadd(self.keys.journal(run_id), self.journal.fields(event_type, step=key, attempt=attempt, data=data))

    def _rejected(self, run_id: str, key: str, record: StepRecord, token: int | None, rejected: TxRejected,
                  events: Sequence[tuple[str, dict[str, Any]]] = ()) -> StepExecution:
        if events:  # the attempt's last events are kept even though its result is not
            self.journal.append_many(run_id, events, step=key, attempt=record.attempts)
        metrics.COMMITS_REJECTED.inc()
        self.journal.append(run_id, "commit_rejected", step=key, attempt=record.attempts,
                            data={"guard": rejected.guard, "found": rejected.actual, "token": token})
        if rejected.guard == "run_status":
            self.cancel_step_if_open(run_id, key, "run ended while the step ran", token=token)
            return StepExecution(Delivery.RUN_FINAL, run_id, key, attempt=record.attempts,
                                 detail={"guard": rejected.guard, "found": rejected.actual})
        return StepExecution(Delivery.STALE, run_id, key, attempt=record.attempts,
                             detail={"guard": rejected.guard, "found": rejected.actual})

    # ------------------------------------------------------------------ create
    def prepare_run(self, wf: Workflow, value: Any, idempotency_key: str | None, budget: RunBudget | None = None, *,
                    run_id: str | None = None, parent: tuple[RunRecord, str] | None = None) -> NewRun:
        """Validate a run's input and build its record and first steps (nothing is written).

        ``parent`` (the parent run and the step key) makes it a child run: it records them, shares the parent's
        trace id, and ``run_id`` is the id derived from both.

        Raises:
            InvalidInput: the input is not JSON the store and the model can carry (a lone surrogate, nesting beyond
                ``max_input_depth``, a value JSON cannot represent) or does not match the workflow's input model.
            PayloadRejected: the input is larger than ``max_payload_bytes``.
        """
        data = check_payload(value, max_depth=self.settings.max_input_depth)
        size = len(json.dumps(data, separators=(",", ":")).encode())
        if size > self.settings.max_payload_bytes:
            raise PayloadRejected(f"input is {size} bytes of JSON, over the {self.settings.max_payload_bytes}-byte "
                                  "limit (TEAMSTER_MAX_PAYLOAD_BYTES)", size=size)
        validated = validate_input(wf.input_model, value)
        try:
            state = wf.initial_state(validated)
            input_data = validated.model_dump(mode="json")
            state_data = state.model_dump(mode="json")
        except TeamsterError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model's own serializer or the workflow's init_state raised
            raise InvalidInput(f"input of workflow {wf.name!r} cannot be stored: {type(exc).__name__}: {exc}",
                               hint="Check the workflow's input model and init_state; nothing was written.") from None
        if run_id is None and idempotency_key:
            run_id = "run_" + uuid.uuid5(uuid.NAMESPACE_URL, f"teamster:{wf.name}:{idempotency_key}").hex[:24]
        elif run_id is None:
            run_id = "run_" + uuid.uuid4().hex[:24]
        t = now()
        run_budget = budget if budget is not None else wf.budget
        tenant = getattr(validated, wf.tenant_key, None) if wf.tenant_key else None
        record = RunRecord(run_id=run_id, workflow=wf.name, workflow_version=wf.version, workflow_module=wf.module,
                           status=RunStatus.RUNNING, budget=run_budget.model_dump(exclude_none=True) if run_budget
                           else None, tenant=None if tenant is None else str(tenant),
                           input=input_data, state=state_data,
                           state_schema=wf.state_schema, trace_id=parent[0].trace_id if parent else new_trace_id(),
                           idempotency_key=idempotency_key, created_at=t, updated_at=t, progress_at=t,
                           parent_run=parent[0].run_id if parent else None, parent_step=parent[1] if parent else None)
        return NewRun(wf, record, ready_steps(wf, {}, {}))

    def new_run_ops(self, tx: Tx, new: NewRun) -> None:
        """Add the writes that create ``new`` to ``tx``, guarded by the run not existing yet (guard ``run_absent``)."""
        wf, record, run_id, t = new.wf, new.record, new.record.run_id, new.record.created_at
        tx.require("run_absent", self.keys.run(run_id), "run_id", "absent")
        tx.hset(self.keys.run(run_id), record.model_dump(mode="json"))
        tx.hset(self.keys.steps(run_id), {s.key: StepStatus.QUEUED for s in new.first})
        tx.call("ZADD", self.keys.runs, t, run_id)
        tx.call("ZADD", self.keys.active_runs, t + run_deadline_seconds(wf, self.settings), run_id)
        # marks the store as holding teamster's data (once): its absence later means Redis lost the data
        tx.call("SET", self.keys.epoch, literal({"created_at": t}), "NX")
        created: dict[str, Any] = {"workflow": wf.name, "version": wf.version, "input": record.input,
                                   "idempotency_key": record.idempotency_key, "trace_id": record.trace_id}
        if record.parent_run:
            created.update(parent_run=record.parent_run, parent_step=record.parent_step)
        tx.xadd(self.keys.journal(run_id), self.journal.fields("run_created", data=created))
        self._new_step_ops(tx, run_id, wf, new.first, t)

    def create_run(self, wf: Workflow, value: Any, idempotency_key: str | None,
                   budget: RunBudget | None = None) -> tuple[str, bool]:
        """Validate the input, then write the run and its first steps atomically; returns (run_id, created).

        Raises:
            InvalidInput: see :meth:`prepare_run`.
            PayloadRejected: see :meth:`prepare_run`.
            IdempotencyConflict: the key was used before with another input.
        """
        new = self.prepare_run(wf, value, idempotency_key, budget)
        run_id = new.record.run_id
        tx = Tx(marker=(self.keys.run(run_id), "last_write"))  # joins the run's HSET: no stamp key of its own
        self.new_run_ops(tx, new)
        try:
            self.store.apply(tx)
        except TxRejected:
            existing = self.store.get_run(run_id)
            if existing.input != new.record.input:
                raise IdempotencyConflict(
                    f"idempotency key {idempotency_key!r} was used for run {run_id} with a different input",
                    run_id=run_id) from None
            return run_id, False
        self.enqueue(run_id, [s.key for s in new.first], {s.key: step_label(wf, s.step_id) for s in new.first})
        return run_id, True

    # ------------------------------------------------------------------ commit
    def commit(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int | None,
               result: Succeeded | None, *, skipped: str | None = None, agent_run: AgentRun | None = None,
               resolution: Resolution | None = None, statuses: dict[str, StepStatus] | None = None,
               events: Sequence[tuple[str, dict[str, Any]]] = ()) -> StepExecution:
        """Commit a succeeded (or skipped, or operator-resolved) step with the new state and the newly ready
        steps, then send those. ``run`` (and ``statuses``, the run's step index) are what the caller last read; on
        a version conflict they are read again and the commit planned again. ``events`` are the step's last
        journal events, written in the same transaction."""
        run_id, key = run.run_id, record.step_key
        status = StepStatus.SKIPPED if skipped is not None else StepStatus.SUCCEEDED
        expected = frozenset({StepStatus.FAILED, StepStatus.CANNOT_COMPLETE, StepStatus.NEEDS_HUMAN}) \
            if resolution is not None else frozenset({StepStatus.RUNNING})
        current = run
        first = True

        def attempt() -> StepExecution:
            nonlocal current, first
            if first and statuses is not None:
                index = statuses  # what the claim read: a conflict below means it changed, then read again
            else:
                if not first:
                    current = self.store.get_run(run_id)
                index = self.store.step_statuses(run_id)
            first = False
            state = wf.state_model.model_validate(current.state)
            branches = dict(current.branches)
            new: list[NewStep] = []
            output = result.output if result is not None else None
            try:
                if result is not None and record.kind == "fan_out":
                    items = output["items"] if output else []
                    branches[step.id] = len(items)
                    new += [NewStep(branch_key(step.id, i), step.id, "branch", i, item) for i, item in enumerate(items)]
                    new_state = state
                elif result is not None and record.kind == "join":
                    new_state = apply_output(wf, step, state, (output or {}).get("items", []))
                elif result is not None and record.kind != "branch":
                    new_state = apply_output(wf, step, state, output)
                else:
                    new_state = state
            except TeamsterError as exc:
                if resolution is not None:  # the operator's output does not fit: say so, change nothing
                    raise InvalidInput(f"the output cannot be applied to the run's state: {exc.message}") from None
                return self.fail(current, wf, step, record, token, failed_from(exc), agent_run)
            after = {**index, key: status, **{n.key: StepStatus.QUEUED for n in new}}
            ready = [n for n in ready_steps(wf, after, branches) if n.key not in after]
            new += ready
            after.update({n.key: StepStatus.QUEUED for n in ready})
            complete = run_complete(wf, after)
            t = now()
            run_fields: dict[str, Any] = {"state": new_state.model_dump(mode="json"),
                                          "state_version": current.state_version + 1, "updated_at": t,
                                          "progress_at": t, "branches": branches}
            final_output = None
            if complete:
                try:
                    final_output = wf.final_output(new_state).model_dump(mode="json")
                except Exception as exc:  # noqa: BLE001 - the workflow's output mapping is broken
                    error = InvalidOutput(f"the run's final output does not match the workflow's output model: {exc}")
                    if resolution is not None:
                        raise InvalidInput(f"with this output, {error.message}") from None
                    return self.fail(current, wf, step, record, token, failed_from(error), agent_run)
                run_fields.update(status=RunStatus.SUCCEEDED, output=final_output, finished_at=t, error=None)
            elif current.status in (RunStatus.PENDING, RunStatus.RUNNING):
                run_fields["status"] = RunStatus.RUNNING
            elif resolution is not None and not self.store.open_entries(run_id, exclude=resolution.entry_id):
                run_fields.update(status=RunStatus.RUNNING, error=None, finished_at=None)
            step_fields: dict[str, Any] = {"status": status, "finished_at": t, "next_retry_at": None,
                                           **agent_stats(agent_run)}
            if result is not None:
                step_fields.update(outcome=result.model_dump(mode="json"), output=output)
            if skipped is not None:
                step_fields["reason"] = skipped
            if resolution is not None:
                step_fields.update(resolved_by=resolution.by,
                                   reason=f"resolved by {resolution.by}: {resolution.reason}")
            tx = self._ending_step_tx(run_id, key, token, expected, current.state_version)
            tx.hset(self.keys.step(run_id, key), step_fields)
            self._spend_ops(tx, run_id, key, agent_run)
            if token is None:
                tx.call("HINCRBY", self.keys.step(run_id, key), "fence", 1)  # zombies holding old tokens lose
            tx.hset(self.keys.steps(run_id), {key: status, **{n.key: StepStatus.QUEUED for n in new}})
            tx.hset(self.keys.run(run_id), run_fields)
            tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
            if resolution is not None:
                self.close_entry(tx, resolution.entry_id, DeadLetterStatus.RESOLVED, resolution.by, resolution.reason)
            self._journal_ops(tx, run_id, key, record.attempts, events)
            tx.xadd(self.keys.journal(run_id), self.journal.fields(
                "commit" if skipped is None else "step_skipped", step=key, attempt=record.attempts,
                data={"state_version": current.state_version + 1, "token": token, "reason": skipped,
                      "by": resolution.by if resolution else None, "queued": [n.key for n in new]}))
            self._new_step_ops(tx, run_id, wf, new, t, journal=False)  # the commit event lists them
            wake = None
            if complete:
                tx.call("ZREM", self.keys.active_runs, run_id)
                tx.xadd(self.keys.journal(run_id), self.journal.fields("run_succeeded", data={"output": final_output}))
                wake = wake_parent(tx, self.keys, self.journal, self.settings, current, RunStatus.SUCCEEDED, t)
                # a finished run expires after the TTL (a run that had dead-letter entries is settled below)
                absent = None if current.dead_letters else self.keys.run_dlq(run_id)  # that set exists only then
                for run_key in self.keys.run_keys(run_id, after):
                    if run_key != absent:
                        tx.call("EXPIRE", run_key, self.settings.finished_run_ttl_seconds)
            # else: the run's deadline in the active set is not moved; the watchdog reads progress_at when it is due
            try:
                held = self.store.apply(tx)
            except TxRejected as rejected:
                return self._rejected(run_id, key, record, token, rejected, events)
            metrics.STEPS.labels(current.workflow, step.id, status.value).inc()
            self.enqueue(run_id, [n.key for n in new], {n.key: step_label(wf, n.step_id) for n in new})
            self.wake_sent(wake, held)
            if complete:
                metrics.RUNS_FINISHED.labels(current.workflow, RunStatus.SUCCEEDED.value).inc()
                if current.dead_letters:
                    self._settle_retention(run_id)
            return StepExecution(Delivery.COMMITTED if skipped is None else Delivery.SKIPPED, run_id, key,
                                 step_status=status, attempt=record.attempts, outcome=step_fields.get("outcome"),
                                 detail={"queued": [n.key for n in new], "run_complete": complete})

        return self.store.optimistic(f"commit {run_id}:{key}", attempt)

    def _spend_ops(self, tx: Tx, run_id: str, key: str, agent_run: AgentRun | None) -> None:
        """Record the spend of calls no Redis gate recorded (offline, unbudgeted) with the step's end."""
        spend = agent_run.unrecorded_spend if agent_run is not None else {}
        if not spend.get("model_calls"):
            return
        # the same fields on the step and on the run; where the transaction guards and sets a hash anyway (the step
        # always; the run in a commit or a dead-letter), the store folds these increments into that write
        for target in (self.keys.step(run_id, key), self.keys.run(run_id)):
            tx.call("HINCRBY", target, "spend_calls", int(spend["model_calls"]))
            if spend.get("tokens"):
                tx.call("HINCRBY", target, "spend_tokens", int(spend["tokens"]))
            if spend.get("cost"):
                tx.call("HINCRBYFLOAT", target, "spend_cost", repr(float(spend["cost"])))

    # ------------------------------------------------------------------ retry
    def schedule_retry(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int,
                       result: Failed, policy: RetryPolicy, agent_run: AgentRun | None,
                       events: Sequence[tuple[str, dict[str, Any]]] = ()) -> StepExecution:
        """Record a retryable failure and the time of the next attempt (the step task schedules the message)."""
        delay = min(policy.delay(record.attempts - record.attempt_base), self.settings.retry_backoff_max)
        t = now()
        key = record.step_key
        tx = Tx(marker=(self.keys.step(run.run_id, key), "last_write"))
        tx.require("fence", self.keys.step(run.run_id, key), "fence", "eq", token)
        tx.require("step_status", self.keys.step(run.run_id, key), "status", "eq", StepStatus.RUNNING)
        tx.hset(self.keys.step(run.run_id, key), {
            "status": StepStatus.RETRYING, "next_retry_at": t + delay, "outcome": result.model_dump(mode="json"),
            **agent_stats(agent_run)})
        self._spend_ops(tx, run.run_id, key, agent_run)
        tx.call("ZADD", self.keys.inflight, t + delay + self.settings.stuck_queued_seconds,
                Keys.member(run.run_id, key))
        self._journal_ops(tx, run.run_id, key, record.attempts, events)
        tx.xadd(self.keys.journal(run.run_id), self.journal.fields(
            "retry", step=key, attempt=record.attempts,
            data={"error_type": result.error_type, "message": result.message, "delay_seconds": round(delay, 3),
                  "next_attempt": record.attempts + 1, "max_attempts": policy.max_attempts}))
        try:
            self.store.apply(tx)
        except TxRejected as rejected:
            return self._rejected(run.run_id, key, record, token, rejected, events)
        metrics.RETRIES.labels(run.workflow, step.id, result.error_type).inc()
        return StepExecution(Delivery.RETRY, run.run_id, key, step_status=StepStatus.RETRYING, retry_in=delay,
                             attempt=record.attempts, outcome=result.model_dump(mode="json"))

    # ------------------------------------------------------------------ dead-letter
    def write_entry(self, tx: Tx, entry: DeadLetterEntry) -> None:
        """The one way a dead-letter entry is written: the entry (its step data redacted, as the journal is), its
        indexes and its journal event."""
        redact = self.journal.redact
        entry = entry.model_copy(update={
            "input": redact(entry.input), "message": redact(entry.message), "details": redact(entry.details),
            "question": redact(entry.question)})
        tx.hset(self.keys.dlq_entry(entry.entry_id), entry.model_dump(mode="json"))
        tx.call("HINCRBY", self.keys.run(entry.run_id), "dead_letters", 1)
        tx.call("ZADD", self.keys.dlq_all, entry.created_at, entry.entry_id)
        if entry.status == DeadLetterStatus.OPEN:
            tx.call("ZADD", self.keys.dlq_open, entry.created_at, entry.entry_id)
        tx.call("SADD", self.keys.run_dlq(entry.run_id), entry.entry_id)
        tx.xadd(self.keys.journal(entry.run_id), self.journal.fields(
            "dead_lettered", step=entry.step_key, attempt=entry.attempts or None,
            data={"entry_id": entry.entry_id, "error_type": entry.error_type, "message": entry.message,
                  "escalation": entry.escalation, "kind": entry.kind}))

    def close_entry(self, tx: Tx, entry_id: str, status: DeadLetterStatus, by: str, reason: str) -> None:
        """The one way a dead-letter entry is closed (guarded: it must still be open)."""
        tx.require("entry_open", self.keys.dlq_entry(entry_id), "status", "eq", DeadLetterStatus.OPEN)
        tx.hset(self.keys.dlq_entry(entry_id), {"status": status, "closed_at": now(), "closed_by": by,
                                                "close_reason": reason})
        tx.call("ZREM", self.keys.dlq_open, entry_id)

    def fail(self, run: RunRecord, wf: Workflow | None, step: StepDef | None, record: StepRecord, token: int | None,
             result: Failed | CannotComplete | NeedsHuman, agent_run: AgentRun | None,
             events: Sequence[tuple[str, dict[str, Any]]] = ()) -> StepExecution:
        """Dead-letter a step's failure and run its escalation policy (``wf``/``step`` None: this process cannot
        load the workflow; the entry is written all the same, with no escalation policy)."""
        run_id, key = run.run_id, record.step_key
        if isinstance(result, Failed):
            error_type, message, retryable, details = result.error_type, result.message, result.retryable, \
                result.details
            step_status, kind = StepStatus.FAILED, "failure"
        elif isinstance(result, CannotComplete):
            error_type, message, retryable, details = "cannot_complete", result.reason, False, {}
            step_status, kind = StepStatus.CANNOT_COMPLETE, "cannot_complete"
        else:
            error_type, message, retryable, details = "needs_human", result.question, False, {}
            step_status, kind = StepStatus.NEEDS_HUMAN, "needs_human"
        policy: Policy | None
        if isinstance(result, NeedsHuman):
            policy = HumanReview()
        elif step is not None and record.escalations_used < len(step.escalate):
            policy = step.escalate[record.escalations_used]
        else:
            policy = None
        entry_id = f"{run_id}:{key}:{record.fence or token or 0}"
        if events:  # the excerpt below reads the journal: write the step's last events first
            self.journal.append_many(run_id, events, step=key, attempt=record.attempts)
        entry_input = self.entry_input(run, wf, step, record)
        excerpt = self.journal.excerpt(run_id, key)
        current = run
        first = True

        def attempt() -> StepExecution:
            nonlocal current, first
            if not first:
                current = self.store.get_run(run_id)
            first = False
            t = now()
            status = step_status
            entry = DeadLetterEntry(
                entry_id=entry_id, run_id=run_id, workflow=current.workflow, workflow_module=current.workflow_module,
                step_key=key, step_id=record.step_id,
                agent=step.agent if step is not None else record.agent, kind=kind, error_type=error_type,
                message=message, retryable=retryable,
                details=details, attempts=record.attempts, input=entry_input, state_version=current.state_version,
                trace_id=current.trace_id, escalation=policy.describe() if policy else "escalate (no policy left)",
                created_at=t, journal_excerpt=excerpt, question=result.question if isinstance(result, NeedsHuman)
                else None)
            step_fields: dict[str, Any] = {"status": status, "outcome": result.model_dump(mode="json"),
                                           "finished_at": t, "reason": message, "next_retry_at": None,
                                           **agent_stats(agent_run)}
            run_fields: dict[str, Any] = {"state_version": current.state_version + 1, "updated_at": t,
                                          "progress_at": t}
            requeue = False
            if isinstance(policy, RetryWith):
                entry.status, entry.closed_at, entry.closed_by = DeadLetterStatus.AUTO_RETRIED, t, "escalation"
                entry.close_reason = f"escalation {policy.describe()}"
                step_fields.update(status=StepStatus.QUEUED, attempt_base=record.attempts, queued_at=t,
                                   finished_at=None, fallback={"agent": policy.agent, "model": policy.model},
                                   lease_expiries=0,
                                   escalations_used=record.escalations_used + 1)
                status, requeue = StepStatus.QUEUED, True
            elif isinstance(policy, HumanReview):
                status = StepStatus.NEEDS_HUMAN
                step_fields["status"] = status
                run_fields["status"] = combine_run_status(current.status, RunStatus.NEEDS_HUMAN)
            elif isinstance(policy, FailRun):
                run_fields.update(status=RunStatus.FAILED, finished_at=t)
            else:
                run_fields["status"] = combine_run_status(current.status, RunStatus.ESCALATED)
            if not requeue:
                step_fields["escalations_used"] = record.escalations_used + (1 if policy else 0)
            run_fields["error"] = {"error_type": error_type, "message": message, "step": key, "dlq_entry": entry_id,
                                   "escalation": entry.escalation}
            tx = self._ending_step_tx(run_id, key, token, frozenset({StepStatus.RUNNING}), current.state_version)
            tx.hset(self.keys.step(run_id, key), step_fields)
            self._spend_ops(tx, run_id, key, agent_run)
            tx.hset(self.keys.steps(run_id), {key: status})
            tx.hset(self.keys.run(run_id), run_fields)
            if requeue:
                tx.call("ZADD", self.keys.inflight, t + self.settings.stuck_queued_seconds, Keys.member(run_id, key))
            else:
                tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
            if run_fields.get("status") == RunStatus.FAILED:
                tx.call("ZREM", self.keys.active_runs, run_id)
            self.write_entry(tx, entry)
            wake = None if requeue else wake_parent(tx, self.keys, self.journal, self.settings, current,
                                                    RunStatus(run_fields["status"]), t, entry=entry_id)
            try:
                held = self.store.apply(tx)
            except TxRejected as rejected:
                return self._rejected(run_id, key, record, token, rejected)
            self.wake_sent(wake, held)
            metrics.STEPS.labels(current.workflow, record.step_id, error_type).inc()
            metrics.DEAD_LETTERS.labels(current.workflow, error_type).inc()
            if requeue:
                self.enqueue(run_id, [key], {key: record.label})
            else:
                self.store.persist_run(run_id)
                metrics.RUNS_FINISHED.labels(current.workflow, str(run_fields["status"])).inc()
            if isinstance(policy, FailRun):
                send_alert(policy, entry.model_dump(mode="json"))
            return StepExecution(Delivery.REQUEUED if requeue else Delivery.DEAD_LETTERED, run_id, key,
                                 step_status=status, attempt=record.attempts, outcome=result.model_dump(mode="json"),
                                 detail={"entry_id": entry_id, "escalation": entry.escalation,
                                         "run_status": run_fields.get("status")})

        return self.store.optimistic(f"dead-letter {run_id}:{key}", attempt)

    def escalate_stalled(self, run: RunRecord, wf: Workflow | None, idle_seconds: float) -> str | None:
        """The watchdog's escalation of a run without progress past its deadline: a ``deadline`` dead-letter entry
        for its first unfinished step, the run ``escalated``. Returns the entry id (None: the run moved on)."""
        steps = [s for s in self.store.steps(run.run_id) if s.status in STEP_OPEN]
        first_open = steps[0] if steps else None
        key = first_open.step_key if first_open else "-"
        step_def = wf.steps.get(first_open.step_id) if wf is not None and first_open is not None else None
        t = now()
        entry = DeadLetterEntry(
            entry_id=f"{run.run_id}:deadline:{run.state_version}", run_id=run.run_id, workflow=run.workflow,
            workflow_module=run.workflow_module,
            step_key=key, step_id=first_open.step_id if first_open else "-", kind="deadline",
            error_type=RunDeadlineExceeded.code,
            message=f"no progress for {idle_seconds:.0f}s (deadline); waiting steps: {[s.step_key for s in steps]}",
            attempts=first_open.attempts if first_open else 0, input=self.entry_input(run, wf, step_def, first_open),
            state_version=run.state_version, trace_id=run.trace_id, escalation="escalate", created_at=t,
            journal_excerpt=self.journal.excerpt(run.run_id, key) if first_open else [])
        tx = Tx()
        tx.require("state_version", self.keys.run(run.run_id), "state_version", "eq", run.state_version)
        tx.require("run_status", self.keys.run(run.run_id), "status", "in", [RunStatus.RUNNING, RunStatus.PENDING])
        tx.hset(self.keys.run(run.run_id), {"status": RunStatus.ESCALATED, "updated_at": t,
                                            "state_version": run.state_version + 1,
                                            "error": {"error_type": entry.error_type, "message": entry.message,
                                                      "step": key, "dlq_entry": entry.entry_id}})
        tx.call("ZREM", self.keys.active_runs, run.run_id)
        self.write_entry(tx, entry)
        wake = wake_parent(tx, self.keys, self.journal, self.settings, run, RunStatus.ESCALATED, t,
                           entry=entry.entry_id)
        try:
            held = self.store.apply(tx)
        except (TxRejected, VersionConflict):  # the run moved on (or ended) since it was read
            return None
        self.wake_sent(wake, held)
        self.store.persist_run(run.run_id)
        metrics.DEAD_LETTERS.labels(run.workflow, entry.error_type).inc()
        return entry.entry_id

    # ------------------------------------------------------------------ cancel
    def cancel_step_if_open(self, run_id: str, key: str, reason: str, token: int | None = None) -> None:
        """Mark a non-terminal step of a final run cancelled (so nothing is left without an outcome)."""
        tx = Tx()
        tx.require("step_status", self.keys.step(run_id, key), "status", "in", sorted(STEP_OPEN))
        if token is not None:
            tx.require("fence", self.keys.step(run_id, key), "fence", "eq", token)
        tx.hset(self.keys.step(run_id, key), {"status": StepStatus.CANCELLED, "reason": reason, "finished_at": now()})
        tx.hset(self.keys.steps(run_id), {key: StepStatus.CANCELLED})
        tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
        tx.call("ZREM", self.keys.parked, Keys.member(run_id, key))
        tx.xadd(self.keys.journal(run_id), self.journal.fields("step_cancelled", step=key, data={"reason": reason}))
        try:
            self.store.apply(tx)
        except TxRejected:
            pass

    def set_budget(self, run_id: str, budget: RunBudget | None, *, by: str, reason: str) -> RunRecord:
        """Replace a run's budget (None: unbounded); journaled as ``budget_changed`` with who, why and the spend.

        Steps that start after the change use the new budget (a dead-letter entry that was refused by the old one
        can be retried).

        Raises:
            InvalidOperation: the run is already final.
        """
        new = budget.model_dump(exclude_none=True) if budget is not None else None

        def attempt() -> RunRecord:
            run = self.store.get_run(run_id)
            if run.status in RUN_TERMINAL:
                raise InvalidOperation(f"run {run_id} is already {run.status.value}; its budget no longer matters")
            spend = self.store.run_spend(run_id)
            tx = Tx()
            tx.require("state_version", self.keys.run(run_id), "state_version", "eq", run.state_version)
            tx.require("run_status", self.keys.run(run_id), "status", "nin", sorted(RUN_TERMINAL))
            tx.hset(self.keys.run(run_id), {"budget": new, "updated_at": now(),
                                            "state_version": run.state_version + 1})
            tx.xadd(self.keys.journal(run_id), self.journal.fields("budget_changed", data={
                "by": by, "reason": reason, "old": run.budget, "new": new, "spend": spend}))
            try:
                self.store.apply(tx)
            except TxRejected:
                raise InvalidOperation(f"run {run_id} ended while its budget was being changed") from None
            return self.store.get_run(run_id)

        return self.store.optimistic(f"budget {run_id}", attempt)

    def cancel_run(self, run_id: str, *, by: str, reason: str) -> RunRecord:
        """Cancel a run: final status ``cancelled``, every unfinished step ``cancelled`` with the reason.

        Its child runs that are not final (running, or waiting for an operator) are cancelled with it, recursively,
        in the same transaction: it is guarded by every one of those runs' state versions, so a child started or
        settled meanwhile makes it plan again, and no child is left running. A child run cancelled on its own wakes
        its parked parent step (which then fails with ``child_run_failed``)."""

        def attempt() -> RunRecord:
            run = self.store.get_run(run_id)
            if run.status in RUN_TERMINAL:
                raise InvalidOperation(f"run {run_id} is already {run.status.value}; nothing to cancel")
            tree = cancel_tree(self.store, run)
            t = now()
            text = f"cancelled by {by}: {reason}"
            tx = Tx()
            for node in tree.walk():
                cancelled = node.run
                rid = cancelled.run_id
                why = text if cancelled is run else f"parent run {cancelled.parent_run} was cancelled by {by}: {reason}"
                tx.require("state_version", self.keys.run(rid), "state_version", "eq", cancelled.state_version)
                tx.require("run_status", self.keys.run(rid), "status", "nin", sorted(RUN_TERMINAL))
                tx.hset(self.keys.run(rid), {"status": RunStatus.CANCELLED, "finished_at": t, "updated_at": t,
                                             "state_version": cancelled.state_version + 1,
                                             "error": {"error_type": StepCancelled.code, "message": why}})
                for key in node.open_steps:
                    tx.hset(self.keys.step(rid, key), {"status": StepStatus.CANCELLED, "reason": why, "finished_at": t})
                    tx.call("ZREM", self.keys.inflight, Keys.member(rid, key))
                    tx.call("ZREM", self.keys.parked, Keys.member(rid, key))
                if node.open_steps:
                    tx.hset(self.keys.steps(rid), {k: StepStatus.CANCELLED for k in node.open_steps})
                tx.call("ZREM", self.keys.active_runs, rid)
                data: dict[str, Any] = {"by": by, "reason": reason, "steps_cancelled": node.open_steps}
                if cancelled is not run:
                    data["parent_run"] = cancelled.parent_run
                if node.children:
                    data["children_cancelled"] = [child.run.run_id for child in node.children]
                tx.xadd(self.keys.journal(rid), self.journal.fields("run_cancelled", data=data))
            wake = wake_parent(tx, self.keys, self.journal, self.settings, run, RunStatus.CANCELLED, t)
            try:
                held = self.store.apply(tx)
            except TxRejected:
                raise InvalidOperation(f"run {run_id} ended while it was being cancelled") from None
            for node in tree.walk():
                metrics.RUNS_FINISHED.labels(node.run.workflow, RunStatus.CANCELLED.value).inc()
                self._settle_retention(node.run.run_id)
            self.wake_sent(wake, held)
            return self.store.get_run(run_id)

        return self.store.optimistic(f"cancel {run_id}", attempt)
