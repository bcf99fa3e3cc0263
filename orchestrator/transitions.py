"""Atomic state transitions of runs and steps: create, commit, retry, dead-letter, cancel.

Each transition reads what it needs, lets the planner decide, and writes everything in one guarded
:class:`~orchestrator.store.Tx`. Guards: the step's fencing token (I4) and expected status (a step ends
once), the run's state version (optimistic concurrency: parallel branches of a run serialise their commits
by retrying on a version conflict) and the run not being final.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Succeeded, failed_from
from teamster.agents.runner import AgentRun, validate_input
from teamster.agents.spec import RetryPolicy
from teamster.errors import (
    IdempotencyConflict,
    PayloadRejected,
    StoreUnavailable,
    TeamsterError,
)
from teamster.orchestrator import metrics
from teamster.orchestrator.escalation import FailRun, HumanReview, Policy, RetryWith, send_alert
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import (
    RUN_TERMINAL,
    DeadLetterEntry,
    DeadLetterStatus,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    now,
)
from teamster.orchestrator.planner import NewStep, apply_output, branch_key, ready_steps, run_complete, step_input
from teamster.orchestrator.store import Tx, TxRejected
from teamster.orchestrator.tracing import new_trace_id
from teamster.orchestrator.workflow import StepDef, Workflow

if TYPE_CHECKING:
    from teamster.orchestrator.engine import Engine, StepExecution

__all__ = ["Transitions", "combine_run_status"]

log = logging.getLogger(__name__)

_FINAL = [s.value for s in RUN_TERMINAL]
_MAX_CAS = 100


def combine_run_status(current: RunStatus, new: RunStatus) -> RunStatus:
    """A run's status after a step asks for ``new`` (failed > escalated > needs_human > running)."""
    order = {RunStatus.PENDING: 0, RunStatus.RUNNING: 0, RunStatus.NEEDS_HUMAN: 1, RunStatus.ESCALATED: 2,
             RunStatus.FAILED: 3}
    return new if order.get(new, 0) >= order.get(current, 0) else current


def _execution(*args: Any, **kwargs: Any) -> StepExecution:
    from teamster.orchestrator.engine import StepExecution  # noqa: PLC0415 - engine imports this module

    return StepExecution(*args, **kwargs)


class Transitions:
    """The write side of the engine (see module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.journal = engine.journal
        self.keys: Keys = engine.keys
        self.settings = engine.settings

    # ------------------------------------------------------------------ helpers
    def _new_step_ops(self, tx: Tx, run_id: str, new: list[NewStep], t: float) -> None:
        for item in new:
            record = StepRecord(run_id=run_id, step_key=item.key, step_id=item.step_id, kind=item.kind,
                                branch_index=item.branch_index, input=item.input, queued_at=t)
            tx.hset(self.keys.step(run_id, item.key), record.model_dump(mode="json"))
            tx.call("ZADD", self.keys.inflight, t + self.settings.stuck_queued_seconds, Keys.member(run_id, item.key))
            tx.xadd(self.keys.journal(run_id), self.journal.fields("step_queued", step=item.key,
                                                                    data={"kind": item.kind}))

    def _ending_step_tx(self, run_id: str, key: str, token: int | None, expected: tuple[StepStatus, ...],
                        state_version: int) -> Tx:
        """A transaction guarded the way every step-ending write is: the fencing token (when a worker holds
        one), the step's expected status (a step ends once), the run's state version and a non-final run."""
        tx = Tx()
        if token is not None:
            tx.require("fence", self.keys.step(run_id, key), "fence", "eq", token)
        tx.require("step_status", self.keys.step(run_id, key), "status", "in", [s.value for s in expected])
        tx.require("state_version", self.keys.run(run_id), "state_version", "eq", state_version)
        tx.require("run_status", self.keys.run(run_id), "status", "nin", _FINAL)
        return tx

    def entry_input(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord) -> dict[str, Any]:
        """The input a dead-letter entry records: what the step last started with (from the journal), else what
        it would start with now (an attempt that died before journaling its input, a step that never started)."""
        for start in reversed(self.journal.read(run.run_id, types=("step_start",), step=record.step_key)):
            value = start.data.get("input", start.data.get("state"))
            if value is not None:
                return value if isinstance(value, dict) else {"value": value}
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

    def _deadline(self, wf: Workflow) -> float:
        return wf.deadline_seconds or self.settings.run_deadline_seconds

    def open_entries(self, run_id: str, exclude: str | None = None) -> list[str]:
        """Open dead-letter entry ids of a run."""
        ids = [i for i in self.engine.client.smembers(self.keys.run_dlq(run_id)) if i != exclude]  # type: ignore[union-attr]
        pipe = self.engine.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hget(self.keys.dlq_entry(entry_id), "status")
        return [i for i, status in zip(ids, pipe.execute(), strict=True) if status == '"open"']

    # ------------------------------------------------------------------ create
    def create_run(self, wf: Workflow, value: Any, idempotency_key: str | None) -> tuple[str, bool]:
        """Validate the input, then write the run and its first steps atomically; returns (run_id, created)."""
        try:
            size = len(json.dumps(value.model_dump(mode="json") if hasattr(value, "model_dump") else value,
                                  default=str))
        except (TypeError, ValueError) as exc:
            raise PayloadRejected(f"input is not JSON-serialisable: {exc}") from None
        if size > self.settings.max_payload_bytes:
            raise PayloadRejected(f"input is {size} bytes of JSON, over the {self.settings.max_payload_bytes}-byte "
                                  "limit (TEAMSTER_MAX_PAYLOAD_BYTES)", size=size)
        validated = validate_input(wf.input_model, value)
        state = wf.initial_state(validated)
        if idempotency_key:
            run_id = "run_" + uuid.uuid5(uuid.NAMESPACE_URL, f"teamster:{wf.name}:{idempotency_key}").hex[:24]
        else:
            run_id = "run_" + uuid.uuid4().hex[:24]
        t = now()
        record = RunRecord(run_id=run_id, workflow=wf.name, workflow_version=wf.version, status=RunStatus.RUNNING,
                           input=validated.model_dump(mode="json"), state=state.model_dump(mode="json"),
                           state_schema=wf.state_schema, trace_id=new_trace_id(),
                           idempotency_key=idempotency_key, created_at=t, updated_at=t, progress_at=t)
        first = ready_steps(wf, {}, {})
        tx = Tx()
        tx.require("run_absent", self.keys.run(run_id), "run_id", "absent")
        tx.hset(self.keys.run(run_id), record.model_dump(mode="json"))
        tx.hset(self.keys.steps(run_id), {s.key: StepStatus.QUEUED.value for s in first})
        tx.call("ZADD", self.keys.runs, t, run_id)
        tx.call("ZADD", self.keys.active_runs, t + self._deadline(wf), run_id)
        tx.xadd(self.keys.journal(run_id), self.journal.fields(
            "run_created", data={"workflow": wf.name, "version": wf.version, "input": record.input,
                                 "idempotency_key": idempotency_key, "trace_id": record.trace_id}))
        self._new_step_ops(tx, run_id, first, t)
        try:
            self.store.apply(tx)
        except TxRejected:
            existing = self.store.get_run(run_id)
            if existing.input != record.input:
                raise IdempotencyConflict(
                    f"idempotency key {idempotency_key!r} was used for run {run_id} with a different input",
                    run_id=run_id) from None
            return run_id, False
        self.engine.enqueue_many(run_id, [s.key for s in first])
        return run_id, True

    # ------------------------------------------------------------------ commit
    def commit(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int | None,
               result: Succeeded | None, *, skipped: str | None = None, agent_run: AgentRun | None = None,
               expected: tuple[StepStatus, ...] = (StepStatus.RUNNING,), actor: str | None = None,
               resume: bool = False, close_entry: tuple[str, str] | None = None) -> StepExecution:
        """Commit a succeeded (or skipped) step with the new state and the newly ready steps."""
        run_id, key = run.run_id, record.step_key
        status = StepStatus.SKIPPED if skipped is not None else StepStatus.SUCCEEDED
        for _ in range(_MAX_CAS):
            run = self.store.get_run(run_id)
            statuses = self.store.step_statuses(run_id)
            state = wf.state_model.model_validate(run.state)
            branches = dict(run.branches)
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
                return self.fail(run, wf, step, record, token, failed_from(exc), agent_run, expected=expected)
            after = {**statuses, key: status, **{n.key: StepStatus.QUEUED for n in new}}
            ready = [n for n in ready_steps(wf, after, branches) if n.key not in after]
            new += ready
            after.update({n.key: StepStatus.QUEUED for n in ready})
            complete = run_complete(wf, after)
            t = now()
            run_fields: dict[str, Any] = {"state": new_state.model_dump(mode="json"),
                                          "state_version": run.state_version + 1, "updated_at": t,
                                          "progress_at": t, "branches": branches}
            final_output = None
            if complete:
                try:
                    final_output = wf.final_output(new_state).model_dump(mode="json")
                except Exception as exc:  # noqa: BLE001 - the workflow's output mapping is broken
                    from teamster.errors import InvalidOutput  # noqa: PLC0415

                    error = InvalidOutput(f"the run's final output does not match the workflow's output model: {exc}")
                    return self.fail(run, wf, step, record, token, failed_from(error), agent_run, expected=expected)
                run_fields.update(status=RunStatus.SUCCEEDED.value, output=final_output, finished_at=t, error=None)
            elif run.status in (RunStatus.PENDING, RunStatus.RUNNING):
                run_fields["status"] = RunStatus.RUNNING.value
            elif resume and not self.open_entries(run_id, exclude=close_entry[0] if close_entry else None):
                run_fields.update(status=RunStatus.RUNNING.value, error=None)
            step_fields: dict[str, Any] = {"status": status.value, "finished_at": t, "next_retry_at": None}
            if result is not None:
                step_fields.update(outcome=result.model_dump(mode="json"), output=output)
            if skipped is not None:
                step_fields["reason"] = skipped
            if actor is not None:
                step_fields["resolved_by"] = actor
                step_fields["reason"] = f"resolved by {actor}" + (f": {close_entry[1]}" if close_entry else "")
            if agent_run is not None:
                step_fields.update(_agent_stats(agent_run))
            tx = self._ending_step_tx(run_id, key, token, expected, run.state_version)
            tx.hset(self.keys.step(run_id, key), step_fields)
            if actor is not None or token is None:
                tx.call("HINCRBY", self.keys.step(run_id, key), "fence", 1)  # zombies holding old tokens lose
            tx.hset(self.keys.steps(run_id), {key: status.value, **{n.key: StepStatus.QUEUED.value for n in new}})
            tx.hset(self.keys.run(run_id), run_fields)
            tx.call("DEL", self.keys.lease(run_id, key))
            tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
            if close_entry:
                entry_id, close_reason = close_entry
                self._close_entry_ops(tx, entry_id, DeadLetterStatus.RESOLVED, actor or "operator", close_reason)
            tx.xadd(self.keys.journal(run_id), self.journal.fields(
                "commit" if skipped is None else "step_skipped", step=key, attempt=record.attempts,
                data={"state_version": run.state_version + 1, "token": token, "reason": skipped, "by": actor,
                      "queued": [n.key for n in new]}))
            self._new_step_ops(tx, run_id, new, t)
            if complete:
                tx.call("ZREM", self.keys.active_runs, run_id)
                tx.xadd(self.keys.journal(run_id), self.journal.fields("run_succeeded", data={"output": final_output}))
            else:
                tx.call("ZADD", self.keys.active_runs, t + self._deadline(wf), run_id)
            try:
                self.store.apply(tx)
            except TxRejected as rejected:
                if rejected.guard == "state_version":
                    continue
                return self._rejected(run_id, key, record, token, rejected)
            metrics.STEPS.labels(run.workflow, step.id, status.value).inc()
            self.engine.enqueue_many(run_id, [n.key for n in new])
            if complete:
                metrics.RUNS_FINISHED.labels(run.workflow, RunStatus.SUCCEEDED.value).inc()
                if not self.open_entries(run_id):
                    self.store.expire_run(run_id, self.settings.finished_run_ttl_seconds)
            return _execution("committed" if skipped is None else "skipped", run_id, key, step_status=status.value,
                              attempt=record.attempts, outcome=step_fields.get("outcome"),
                              detail={"queued": [n.key for n in new], "run_complete": complete})
        raise StoreUnavailable(f"could not commit {run_id}:{key}: state kept changing ({_MAX_CAS} tries)")

    def _rejected(self, run_id: str, key: str, record: StepRecord, token: int | None,
                  rejected: TxRejected) -> StepExecution:
        metrics.COMMITS_REJECTED.inc()
        self.journal.append(run_id, "commit_rejected", step=key, attempt=record.attempts,
                            data={"guard": rejected.guard, "found": rejected.actual, "token": token})
        status = "run_final" if rejected.guard == "run_status" else "stale"
        if status == "run_final":
            self.cancel_step_if_open(run_id, key, "run ended while the step ran", token=token)
        return _execution(status, run_id, key, attempt=record.attempts,
                          detail={"guard": rejected.guard, "found": rejected.actual})

    # ------------------------------------------------------------------ retry
    def schedule_retry(self, run: RunRecord, step: StepDef, record: StepRecord, token: int, result: Failed,
                       policy: RetryPolicy, agent_run: AgentRun | None) -> StepExecution:
        """Record a retryable failure and the time of the next attempt (the task schedules it)."""
        delay = min(policy.delay(record.attempts - record.attempt_base), self.settings.retry_backoff_max)
        t = now()
        key = record.step_key
        tx = Tx()
        tx.require("fence", self.keys.step(run.run_id, key), "fence", "eq", token)
        tx.require("step_status", self.keys.step(run.run_id, key), "status", "eq", StepStatus.RUNNING.value)
        fields = {"status": StepStatus.RETRYING.value, "next_retry_at": t + delay,
                  "outcome": result.model_dump(mode="json"), **(_agent_stats(agent_run) if agent_run else {})}
        tx.hset(self.keys.step(run.run_id, key), fields)
        tx.hset(self.keys.steps(run.run_id), {key: StepStatus.RETRYING.value})
        tx.call("DEL", self.keys.lease(run.run_id, key))
        due = t + delay + self.settings.stuck_queued_seconds
        tx.call("ZADD", self.keys.inflight, due, Keys.member(run.run_id, key))
        tx.xadd(self.keys.journal(run.run_id), self.journal.fields(
            "retry", step=key, attempt=record.attempts,
            data={"error_type": result.error_type, "message": result.message, "delay_seconds": round(delay, 3),
                  "next_attempt": record.attempts + 1, "max_attempts": policy.max_attempts}))
        try:
            self.store.apply(tx)
        except TxRejected as rejected:
            return self._rejected(run.run_id, key, record, token, rejected)
        metrics.RETRIES.labels(run.workflow, step.id, result.error_type).inc()
        return _execution("retry", run.run_id, key, step_status=StepStatus.RETRYING.value, retry_in=delay,
                          attempt=record.attempts, outcome=result.model_dump(mode="json"))

    # ------------------------------------------------------------------ dead-letter
    def fail(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int | None,
             result: Failed | CannotComplete | NeedsHuman, agent_run: AgentRun | None, *,
             expected: tuple[StepStatus, ...] = (StepStatus.RUNNING,), kind: str | None = None) -> StepExecution:
        """Dead-letter a step's failure and run its escalation policy."""
        run_id, key = run.run_id, record.step_key
        if isinstance(result, Failed):
            error_type, message, retryable = result.error_type, result.message, result.retryable
            details = result.details
            step_status = StepStatus.FAILED
        elif isinstance(result, CannotComplete):
            error_type, message, retryable, details = "cannot_complete", result.reason, False, {}
            step_status = StepStatus.CANNOT_COMPLETE
        else:
            error_type, message, retryable, details = "needs_human", result.question, False, {}
            step_status = StepStatus.NEEDS_HUMAN
        policy: Policy | None
        if isinstance(result, NeedsHuman):
            policy = HumanReview()
        else:
            policy = step.escalate[record.escalations_used] if record.escalations_used < len(step.escalate) else None
        entry_id = f"{run_id}:{key}:{record.fence or token or 0}"
        entry_input = self.entry_input(run, wf, step, record)
        excerpt = self.journal.excerpt(run_id, key)
        for _ in range(_MAX_CAS):
            run = self.store.get_run(run_id)
            t = now()
            entry = DeadLetterEntry(
                entry_id=entry_id, run_id=run_id, workflow=run.workflow, step_key=key, step_id=step.id,
                agent=step.agent, kind=kind or ("needs_human" if isinstance(result, NeedsHuman) else
                                                "cannot_complete" if isinstance(result, CannotComplete) else "failure"),
                error_type=error_type, message=message, retryable=retryable, details=details,
                attempts=record.attempts, input=entry_input, state_version=run.state_version, trace_id=run.trace_id,
                escalation=policy.describe() if policy else "escalate (no policy left)", created_at=t,
                journal_excerpt=excerpt,
                question=result.question if isinstance(result, NeedsHuman) else None)
            step_fields: dict[str, Any] = {"status": step_status.value, "outcome": result.model_dump(mode="json"),
                                           "finished_at": t, "reason": message, "next_retry_at": None,
                                           **(_agent_stats(agent_run) if agent_run else {})}
            run_fields: dict[str, Any] = {"state_version": run.state_version + 1, "updated_at": t, "progress_at": t}
            requeue = False
            if isinstance(policy, RetryWith):
                entry.status, entry.closed_at, entry.closed_by = DeadLetterStatus.AUTO_RETRIED, t, "escalation"
                entry.close_reason = f"escalation {policy.describe()}"
                step_fields.update(status=StepStatus.QUEUED.value, attempt_base=record.attempts, queued_at=t,
                                   finished_at=None,
                                   fallback={"agent": policy.agent, "model": policy.model},
                                   escalations_used=record.escalations_used + 1)
                step_status, requeue = StepStatus.QUEUED, True
            elif isinstance(policy, HumanReview):
                step_status = StepStatus.NEEDS_HUMAN
                step_fields["status"] = step_status.value
                run_fields["status"] = combine_run_status(run.status, RunStatus.NEEDS_HUMAN).value
            elif isinstance(policy, FailRun):
                run_fields.update(status=RunStatus.FAILED.value, finished_at=t)
            else:
                run_fields["status"] = combine_run_status(run.status, RunStatus.ESCALATED).value
            if not requeue:
                step_fields["escalations_used"] = record.escalations_used + (1 if policy else 0)
            run_fields["error"] = {"error_type": error_type, "message": message, "step": key, "dlq_entry": entry_id,
                                   "escalation": entry.escalation}
            tx = self._ending_step_tx(run_id, key, token, expected, run.state_version)
            tx.hset(self.keys.step(run_id, key), step_fields)
            tx.hset(self.keys.steps(run_id), {key: step_status.value})
            tx.hset(self.keys.run(run_id), run_fields)
            tx.call("DEL", self.keys.lease(run_id, key))
            if requeue:
                tx.call("ZADD", self.keys.inflight, t + self.settings.stuck_queued_seconds, Keys.member(run_id, key))
            else:
                tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
            tx.hset(self.keys.dlq_entry(entry_id), entry.model_dump(mode="json"))
            tx.call("ZADD", self.keys.dlq_all, t, entry_id)
            if entry.status == DeadLetterStatus.OPEN:
                tx.call("ZADD", self.keys.dlq_open, t, entry_id)
            tx.call("SADD", self.keys.run_dlq(run_id), entry_id)
            if run_fields.get("status") == RunStatus.FAILED.value:
                tx.call("ZREM", self.keys.active_runs, run_id)
            tx.xadd(self.keys.journal(run_id), self.journal.fields(
                "dead_lettered", step=key, attempt=record.attempts,
                data={"entry_id": entry_id, "error_type": error_type, "message": message,
                      "escalation": entry.escalation, "run_status": run_fields.get("status", run.status.value)}))
            try:
                self.store.apply(tx)
            except TxRejected as rejected:
                if rejected.guard == "state_version":
                    continue
                return self._rejected(run_id, key, record, token, rejected)
            metrics.STEPS.labels(run.workflow, step.id, error_type).inc()
            metrics.DEAD_LETTERS.labels(run.workflow, error_type).inc()
            if requeue:
                self.engine.enqueue_many(run_id, [key])
            else:
                self.store.persist_run(run_id)
                metrics.RUNS_FINISHED.labels(run.workflow, run_fields["status"]).inc()
            if isinstance(policy, FailRun):
                send_alert(policy, entry.model_dump(mode="json"))
            return _execution("requeued" if requeue else "dead_lettered", run_id, key, step_status=step_status.value,
                              attempt=record.attempts, outcome=result.model_dump(mode="json"),
                              detail={"entry_id": entry_id, "escalation": entry.escalation,
                                      "run_status": run_fields.get("status")})
        raise StoreUnavailable(f"could not dead-letter {run_id}:{key}: state kept changing ({_MAX_CAS} tries)")

    def _close_entry_ops(self, tx: Tx, entry_id: str, status: DeadLetterStatus, by: str, reason: str) -> None:
        tx.require("entry_open", self.keys.dlq_entry(entry_id), "status", "eq", DeadLetterStatus.OPEN.value)
        tx.hset(self.keys.dlq_entry(entry_id), {"status": status.value, "closed_at": now(), "closed_by": by,
                                                "close_reason": reason})
        tx.call("ZREM", self.keys.dlq_open, entry_id)

    # ------------------------------------------------------------------ cancel
    def cancel_step_if_open(self, run_id: str, key: str, reason: str, token: int | None = None) -> None:
        """Mark a non-terminal step of a final run cancelled (so nothing is left without an outcome)."""
        tx = Tx()
        tx.require("step_status", self.keys.step(run_id, key), "status", "in",
                   [StepStatus.QUEUED.value, StepStatus.RUNNING.value, StepStatus.RETRYING.value])
        if token is not None:
            tx.require("fence", self.keys.step(run_id, key), "fence", "eq", token)
        tx.hset(self.keys.step(run_id, key), {"status": StepStatus.CANCELLED.value, "reason": reason,
                                               "finished_at": now()})
        tx.hset(self.keys.steps(run_id), {key: StepStatus.CANCELLED.value})
        tx.call("DEL", self.keys.lease(run_id, key))
        tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
        tx.xadd(self.keys.journal(run_id), self.journal.fields("step_cancelled", step=key, data={"reason": reason}))
        try:
            self.store.apply(tx)
        except TxRejected:
            pass

    def cancel_run(self, run_id: str, *, by: str, reason: str) -> RunRecord:
        """Cancel a run: final status ``cancelled``, every unfinished step ``cancelled`` with the reason."""
        from teamster.errors import InvalidOperation  # noqa: PLC0415

        for _ in range(_MAX_CAS):
            run = self.store.get_run(run_id)
            if run.status in RUN_TERMINAL:
                raise InvalidOperation(f"run {run_id} is already {run.status.value}; nothing to cancel")
            statuses = self.store.step_statuses(run_id)
            open_steps = [k for k, s in statuses.items()
                          if s in (StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRYING)]
            t = now()
            text = f"cancelled by {by}: {reason}"
            tx = Tx()
            tx.require("state_version", self.keys.run(run_id), "state_version", "eq", run.state_version)
            tx.require("run_status", self.keys.run(run_id), "status", "nin", _FINAL)
            tx.hset(self.keys.run(run_id), {"status": RunStatus.CANCELLED.value, "finished_at": t, "updated_at": t,
                                            "state_version": run.state_version + 1,
                                            "error": {"error_type": "cancelled", "message": text}})
            for key in open_steps:
                tx.hset(self.keys.step(run_id, key), {"status": StepStatus.CANCELLED.value, "reason": text,
                                                      "finished_at": t})
                tx.call("ZREM", self.keys.inflight, Keys.member(run_id, key))
            if open_steps:
                tx.hset(self.keys.steps(run_id), {k: StepStatus.CANCELLED.value for k in open_steps})
            tx.call("ZREM", self.keys.active_runs, run_id)
            tx.xadd(self.keys.journal(run_id), self.journal.fields("run_cancelled", data={
                "by": by, "reason": reason, "steps_cancelled": open_steps}))
            try:
                self.store.apply(tx)
            except TxRejected as rejected:
                if rejected.guard == "state_version":
                    continue
                raise InvalidOperation(f"run {run_id} ended while it was being cancelled") from None
            metrics.RUNS_FINISHED.labels(run.workflow, RunStatus.CANCELLED.value).inc()
            if not self.open_entries(run_id):
                self.store.expire_run(run_id, self.settings.finished_run_ttl_seconds)
            return self.store.get_run(run_id)
        raise StoreUnavailable(f"could not cancel {run_id}: state kept changing")


def _agent_stats(agent_run: AgentRun) -> dict[str, Any]:
    return {"model_calls": agent_run.model_calls, "live_model_calls": agent_run.live_model_calls,
            "tool_calls": agent_run.tool_calls, "tokens": int(agent_run.usage.get("totalTokens", 0)),
            "duration_seconds": round(agent_run.duration_seconds, 4)}
