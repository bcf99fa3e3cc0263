"""The dead-letter queue: list, show, retry, resolve and discard failed steps (every action journaled).

An entry holds what is needed to understand and replay the failure (invariant I6): run, step, input, state
version, typed error, attempts, trace id, escalation taken and a journal excerpt. Operator actions:

* ``retry`` -- run the step again from its first attempt, optionally with an edited run state (validated
  against the workflow's state model before anything is written);
* ``resolve`` -- supply the step's output by hand (validated against the step's output model -- for a child step,
  the child workflow's); it is committed like a model's output and the run resumes;
* ``discard`` -- give up: the run fails with the operator's reason (a child run's parent step is woken, and fails).

A child step's entry (``child_run_failed``) is retried after its child run was fixed: the retried step takes the
child's output (or waits for it again while it runs) -- the child run is never started twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from teamster.agents.outcomes import Succeeded
from teamster.agents.runner import validate_input
from teamster.errors import DeadLetterNotFound, InvalidInput, InvalidOperation, TeamsterError
from teamster.orchestrator.children import ParentWake, wake_parent
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import DeadLetterEntry, DeadLetterStatus, Delivery, RunStatus, StepStatus, now
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.store import Tx, TxRejected
from teamster.orchestrator.transitions import Resolution, Transitions, run_deadline_seconds
from teamster.orchestrator.workflow import get_workflow

__all__ = ["DeadLetterQueue"]

_WAITING_STEP = frozenset({StepStatus.FAILED, StepStatus.CANNOT_COMPLETE, StepStatus.NEEDS_HUMAN})


class DeadLetterQueue:
    """Operator access to dead-letter entries."""

    def __init__(self, runtime: Runtime,
                 explain_missing: Callable[[TeamsterError], TeamsterError] | None = None) -> None:
        self.rt = runtime
        self._explain = explain_missing or (lambda error: error)
        self.client = runtime.client
        self.keys: Keys = runtime.keys
        self.store = runtime.store
        self.journal = runtime.journal
        self.settings = runtime.settings
        self.transitions = Transitions(runtime)

    def list(self, *, include_closed: bool = False, limit: int = 50, run_id: str | None = None,
             workflow: str | None = None) -> list[DeadLetterEntry]:
        """Entries, newest first (open ones only unless ``include_closed``)."""
        if run_id is not None:
            ids = list(self.client.smembers(self.keys.run_dlq(run_id)))  # type: ignore[arg-type]
        else:
            index = self.keys.dlq_all if include_closed else self.keys.dlq_open
            ids = list(self.client.zrevrange(index, 0, max(limit * 4, 200) - 1))  # type: ignore[arg-type]
        entries = [e for e in (self.store.get_entry(i) for i in ids) if e is not None]
        if not include_closed:
            entries = [e for e in entries if e.status == DeadLetterStatus.OPEN]
        if workflow:
            entries = [e for e in entries if e.workflow == workflow]
        entries.sort(key=lambda e: e.created_at, reverse=True)
        return entries[:limit]

    def count_open(self) -> int:
        """Number of open entries."""
        return int(self.client.zcard(self.keys.dlq_open))  # type: ignore[arg-type]

    def get(self, entry_id: str) -> DeadLetterEntry:
        """One entry.

        Raises:
            DeadLetterNotFound: no such entry.
        """
        entry = self.store.get_entry(entry_id)
        if entry is None:
            raise self._explain(DeadLetterNotFound(f"no dead-letter entry {entry_id!r}"))
        return entry

    def _open(self, entry_id: str) -> DeadLetterEntry:
        entry = self.get(entry_id)
        if entry.status != DeadLetterStatus.OPEN:
            raise InvalidOperation(f"entry {entry_id} is already {entry.status.value}"
                                   f"{' by ' + entry.closed_by if entry.closed_by else ''}")
        return entry

    # ------------------------------------------------------------------ retry
    def retry(self, entry_id: str, *, by: str, reason: str = "",
              state_patch: dict[str, Any] | None = None) -> DeadLetterEntry:
        """Re-run the failed step from attempt 1 (optionally after patching the run state)."""
        entry = self._open(entry_id)
        resend = False

        def attempt() -> None:
            nonlocal resend
            run = self.store.get_run(entry.run_id)
            if run.status in (RunStatus.CANCELLED, RunStatus.SUCCEEDED):
                raise InvalidOperation(f"run {run.run_id} is {run.status.value}; its entries can only be discarded")
            wf = get_workflow(run.workflow, run.workflow_module)
            state = run.state
            if state_patch:
                try:
                    state = validate_input(wf.state_model, {**run.state, **state_patch},
                                           what="edited state").model_dump(mode="json")
                except InvalidInput as exc:
                    raise InvalidInput(exc.message, hint="Fix the state patch; nothing was changed.",
                                       **exc.details) from None
            record = self.store.get_step(run.run_id, entry.step_key)
            t = now()
            run_fields: dict[str, Any] = {"state": state, "state_version": run.state_version + 1, "updated_at": t,
                                          "progress_at": t}
            if not self.store.open_entries(run.run_id, exclude=entry_id):
                run_fields.update(status=RunStatus.RUNNING, error=None, finished_at=None)
            tx = Tx()
            tx.require("state_version", self.keys.run(run.run_id), "state_version", "eq", run.state_version)
            resend = False
            if record is not None and record.status in _WAITING_STEP:
                tx.require("step_status", self.keys.step(run.run_id, entry.step_key), "status", "in",
                           sorted(_WAITING_STEP))
                tx.hset(self.keys.step(run.run_id, entry.step_key), {
                    "status": StepStatus.QUEUED, "attempt_base": record.attempts, "escalations_used": 0,
                    "lease_expiries": 0,
                    "fallback": None, "queued_at": t, "finished_at": None, "reason": f"retried by {by}: {reason}"})
                tx.hset(self.keys.steps(run.run_id), {entry.step_key: StepStatus.QUEUED})
                resend = True
            elif record is not None and record.status in (StepStatus.QUEUED, StepStatus.RETRYING, StepStatus.RUNNING):
                resend = True  # a deadline entry: the step never ended; send it again
            if resend:
                tx.call("ZADD", self.keys.inflight, t + self.settings.stuck_queued_seconds,
                        Keys.member(run.run_id, entry.step_key))
            tx.hset(self.keys.run(run.run_id), run_fields)
            tx.call("ZADD", self.keys.active_runs, t + run_deadline_seconds(wf, self.settings), run.run_id)
            self.transitions.close_entry(tx, entry_id, DeadLetterStatus.RETRIED, by, reason)
            tx.xadd(self.keys.journal(run.run_id), self.journal.fields(
                "dlq_retry", step=entry.step_key,
                data={"entry_id": entry_id, "by": by, "reason": reason, "state_patch": state_patch}))
            try:
                self.store.apply(tx)
            except TxRejected as rejected:
                raise InvalidOperation(f"entry {entry_id} changed while retrying ({rejected.guard})") from None

        self.store.optimistic(f"retry {entry_id}", attempt, gives_up=InvalidOperation)
        if resend:
            step = self.store.get_step(entry.run_id, entry.step_key)
            self.transitions.enqueue(entry.run_id, [entry.step_key], {entry.step_key: step.label if step else None})
        return self.get(entry_id)

    # ------------------------------------------------------------------ resolve
    def resolve(self, entry_id: str, output: dict[str, Any], *, by: str, reason: str = "") -> DeadLetterEntry:
        """Commit a human-provided output for the step (validated first); the run resumes."""
        entry = self._open(entry_id)
        run = self.store.get_run(entry.run_id)
        if run.status in (RunStatus.CANCELLED, RunStatus.SUCCEEDED):
            raise InvalidOperation(f"run {run.run_id} is {run.status.value}; its entries can only be discarded")
        wf = get_workflow(run.workflow, run.workflow_module)
        step = wf.steps[entry.step_id]
        record = self.store.get_step(run.run_id, entry.step_key)
        if record is None or record.status not in _WAITING_STEP:
            raise InvalidOperation(f"step {entry.step_key} is {record.status.value if record else 'missing'}; "
                                   "only a failed or waiting step can be resolved (retry a stuck one)")
        if record.kind in ("fan_out", "join"):
            raise InvalidOperation(f"step {entry.step_key} is a {record.kind}; retry it instead of resolving it")
        if record.kind in ("agent", "branch"):
            value = validate_input(step.spec.output_model, output, what=f"output for step {entry.step_key}")
            data = value.model_dump(mode="json")
        elif record.kind == "child":  # in place of the child run's output
            value = validate_input(step.child_workflow.result_model, output, what=f"output for step {entry.step_key}")
            data = value.model_dump(mode="json")
        elif isinstance(output, dict):
            data = output
        else:
            raise InvalidInput("a resolution must be a JSON object")
        if run.status == RunStatus.FAILED:  # fail_run: the operator's resolution revives the run
            tx = Tx().require("status", self.keys.run(run.run_id), "status", "eq", RunStatus.FAILED)
            tx.hset(self.keys.run(run.run_id), {"status": RunStatus.ESCALATED, "finished_at": None})
            try:
                self.store.apply(tx)
            except TxRejected:
                pass
            run = self.store.get_run(run.run_id)
        self.journal.append(run.run_id, "dlq_resolve", step=entry.step_key,
                            data={"entry_id": entry_id, "by": by, "reason": reason, "output": data})
        result = self.transitions.commit(run, wf, step, record, None, Succeeded(output=data),
                                         resolution=Resolution(entry_id, by, reason or "resolved"))
        if result.status != Delivery.COMMITTED:
            raise InvalidOperation(f"could not resolve {entry_id}: {result.status.value} {result.detail}")
        return self.get(entry_id)

    # ------------------------------------------------------------------ discard
    def discard(self, entry_id: str, *, by: str, reason: str) -> DeadLetterEntry:
        """Close the entry without fixing it: the run fails with the reason."""
        if not reason.strip():
            raise InvalidInput("discarding needs a reason (it is recorded on the run)")
        entry = self._open(entry_id)
        wake: ParentWake | None = None
        held: list[bool] = []

        def attempt() -> None:
            nonlocal wake, held
            run = self.store.get_run(entry.run_id)
            t = now()
            tx = Tx()
            tx.require("state_version", self.keys.run(run.run_id), "state_version", "eq", run.state_version)
            self.transitions.close_entry(tx, entry_id, DeadLetterStatus.DISCARDED, by, reason)
            wake = None
            if run.status not in (RunStatus.SUCCEEDED, RunStatus.CANCELLED, RunStatus.FAILED):
                tx.hset(self.keys.run(run.run_id), {
                    "status": RunStatus.FAILED, "finished_at": t, "updated_at": t,
                    "state_version": run.state_version + 1,
                    "error": {**(run.error or {}), "error_type": entry.error_type,
                              "message": f"discarded by {by}: {reason} (was: {entry.message})",
                              "step": entry.step_key, "dlq_entry": entry_id}})
                tx.call("ZREM", self.keys.active_runs, run.run_id)
                wake = wake_parent(tx, self.keys, self.journal, self.settings, run, RunStatus.FAILED, t,
                                   entry=entry_id)
            tx.xadd(self.keys.journal(run.run_id), self.journal.fields(
                "dlq_discard", step=entry.step_key, data={"entry_id": entry_id, "by": by, "reason": reason}))
            try:
                held = self.store.apply(tx)
            except TxRejected as rejected:
                raise InvalidOperation(f"entry {entry_id} changed while discarding ({rejected.guard})") from None

        self.store.optimistic(f"discard {entry_id}", attempt, gives_up=InvalidOperation)
        self.transitions.wake_sent(wake, held)
        if not self.store.open_entries(entry.run_id):
            self.store.expire_run(entry.run_id, self.settings.finished_run_ttl_seconds)
        return self.get(entry_id)
