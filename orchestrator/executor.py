"""The path of one step, top to bottom: claim -> run -> commit, retry or dead-letter -> enqueue what is ready.

The step task is a thin wrapper around :meth:`StepExecutor.execute` (DESIGN.md, "the path of one job", 3-7):

1. Claim the lease with a new fencing token; the claim returns the step and run records. A step already
   terminal returns its recorded result and calls no model (I3); a step whose lease another live worker holds
   is a duplicate delivery and is dropped; a parked child step waits for its child run and is left alone.
2. Decide: a step whose condition is false (or whose upstream steps were all skipped) is skipped with its reason.
3. Run it (agent, function, fan-out or join) while the process's :class:`~teamster.orchestrator.leases.LeaseKeeper`
   renews the lease; a step recovered from a dead worker reuses the model answers that worker recorded. A child
   step starts its child run and parks instead (:mod:`~teamster.orchestrator.child_steps`); queued again when the
   child settles, it ends with the child's result like any step.
4. Succeeded: commit the output, the new state version and the newly ready steps in one transaction guarded by the
   fencing token (I4) and the state version; the commit sends the ready steps.
5. Retryable failure with attempts left: record the retry (the task schedules it with backoff + jitter).
6. Anything else: dead-letter it with full context and run the step's escalation policy (I1, I6).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from pydantic import BaseModel

from teamster.agents.classify import classify_exception
from teamster.agents.delegation import DelegationMemory
from teamster.agents.guard import StepControl
from teamster.agents.limits import RunBudget
from teamster.agents.loop import AgentLoop
from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Succeeded, failed_from
from teamster.agents.runner import HARD_GRACE_SECONDS, AgentRun, StepContext, run_agent_async, validate_input
from teamster.agents.spec import AgentSpec, RetryPolicy, get_agent
from teamster.errors import (
    FunctionError,
    InvalidInput,
    LeaseExpiredRepeatedly,
    StepTimeout,
    StoreUnavailable,
    TeamsterError,
    TerminalError,
)
from teamster.orchestrator import metrics
from teamster.orchestrator.child_steps import ChildSteps
from teamster.orchestrator.leases import LeaseKeeper
from teamster.orchestrator.limits import RedisGate
from teamster.orchestrator.models import (
    Delivery,
    RunRecord,
    StepExecution,
    StepRecord,
    StepStatus,
)
from teamster.orchestrator.planner import skip_reason, step_input
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.step_journal import StepJournal
from teamster.orchestrator.store import Claim, RunStore
from teamster.orchestrator.tracing import step_span
from teamster.orchestrator.transitions import Transitions
from teamster.orchestrator.workflow import StepDef, Workflow, get_workflow

__all__ = ["StepExecutor", "run_deterministic", "spec_for"]

log = logging.getLogger(__name__)

StepResult = Succeeded | CannotComplete | NeedsHuman | Failed

LEASE_GRACE_SECONDS = 5.0
"""How long past its deadline a step's lease is still renewed (then a stuck step is left to the watchdog)."""


def spec_for(step: StepDef, record: StepRecord) -> AgentSpec[Any, Any]:
    """The agent a step runs now: its own, or the fallback agent/model an escalation chose."""
    spec = step.spec
    fallback = record.fallback or {}
    if fallback.get("agent"):
        spec = get_agent(str(fallback["agent"]))
    if fallback.get("model"):
        spec = spec.with_model(str(fallback["model"]))
    return spec


def run_deterministic(store: RunStore, run: RunRecord, wf: Workflow, step: StepDef, state: BaseModel) -> StepResult:
    """Function, fan-out and join steps: plain code over the state, no model (also what replay re-runs)."""
    try:
        if step.kind == "function":
            assert step.fn is not None
            output = step.fn(state)
            data = output.model_dump(mode="json") if isinstance(output, BaseModel) else dict(output)
            return Succeeded(output=data)
        if step.kind == "fan_out":
            assert step.over is not None
            items = [validate_input(step.spec.input_model, item, what=f"fan-out item {i} of {step.id!r}")
                     for i, item in enumerate(step.over(state))]
            return Succeeded(output={"items": [i.model_dump(mode="json") for i in items]})
        # join: the outputs of every branch, in order
        fan_out = step.fan_out or ""
        count = run.branches.get(fan_out, 0)  # written by the fan-out's commit, before the join was queued
        outputs = []
        for index in range(count):
            branch = store.get_step(run.run_id, f"{fan_out}[{index}]")
            if branch is None or branch.status != StepStatus.SUCCEEDED:
                raise TerminalError(f"join {step.id!r}: branch {index} of {fan_out!r} has not succeeded")
            outputs.append(branch.output)
        return Succeeded(output={"items": outputs})
    except TeamsterError as exc:
        return failed_from(exc)
    except Exception as exc:  # noqa: BLE001 - user code: a typed terminal failure, never a crash
        return failed_from(FunctionError(f"{type(exc).__name__}: {exc}", step=step.id))


class StepExecutor:
    """Executes step deliveries against the run store (one per worker process; stateless apart from leases).

    Args:
        runtime: The deployment.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.store = runtime.store
        self.journal = runtime.journal
        self.transitions = Transitions(runtime)
        self.leases = LeaseKeeper(runtime.store, runtime.settings.lease_seconds)
        self.children = ChildSteps(runtime, self.transitions)

    def execute(self, run_id: str, step_key: str) -> StepExecution:
        """Process one delivery of a step message (idempotent: safe to call any number of times)."""
        claim = self.store.claim(run_id, step_key, self.rt.worker, self.settings.lease_seconds)
        if claim.kind == "terminal":
            record = self.store.get_step(run_id, step_key)
            self.journal.append(run_id, "redelivery_ignored", step=step_key,
                                data={"reason": "step already ended", "status": claim.step_status})
            return StepExecution(Delivery.ALREADY_DONE, run_id, step_key, step_status=claim.step_status,
                                 outcome=record.outcome if record else None)
        if claim.kind == "busy":
            self.journal.append(run_id, "redelivery_ignored", step=step_key,
                                data={"reason": "another worker holds the lease", "token": claim.holder})
            return StepExecution(Delivery.DUPLICATE, run_id, step_key)
        if claim.kind == "parked":
            self.journal.append(run_id, "redelivery_ignored", step=step_key,
                                data={"reason": "the step is parked until its child run settles",
                                      "child_run": claim.holder})
            return StepExecution(Delivery.PARKED, run_id, step_key, step_status=StepStatus.PARKED,
                                 detail={"child_run": claim.holder, "redelivery": True})
        if claim.kind == "run_final":
            self.transitions.cancel_step_if_open(run_id, step_key, f"run is {claim.run_status}")
            return StepExecution(Delivery.RUN_FINAL, run_id, step_key, detail={"run_status": claim.run_status})
        if claim.kind != "claimed" or claim.run is None or claim.step is None:
            log.warning("step message for unknown step %s of run %s (expired or never created)", step_key, run_id)
            return StepExecution(Delivery.MISSING, run_id, step_key)

        try:
            return self._execute_claimed(claim)
        except (redis.RedisError, StoreUnavailable):
            raise  # Redis is away: the delivery is retried; the lease lapses if it stays away
        except Exception as exc:  # noqa: BLE001 - anything else ends this attempt now, typed, with its reason
            log.exception("step %s:%s failed unexpectedly", run_id, step_key)
            return self._fail_unexpected(claim, exc)

    def _fail_unexpected(self, claim: Claim, exc: Exception) -> StepExecution:
        """End a claimed step's attempt that raised: a typed failure with the real reason, dead-lettered unless it
        is retryable (a worker that did not die never leaves it to lease expiry)."""
        assert claim.run is not None and claim.step is not None
        run, record = claim.run, claim.step
        error = classify_exception(exc)
        wf: Workflow | None
        try:
            wf = get_workflow(run.workflow, run.workflow_module)
        except TeamsterError:
            wf = None
        step = wf.steps.get(record.step_id) if wf is not None else None
        outcome = failed_from(error)
        tail = [("outcome", {"outcome": outcome.model_dump(mode="json"), "unexpected": type(exc).__name__})]
        return self._retry_or_fail(run, wf, step, record, claim.token, outcome, None, tail)

    def _execute_claimed(self, claim: Claim) -> StepExecution:
        assert claim.run is not None and claim.step is not None
        run, record, token = claim.run, claim.step, claim.token
        run_id, step_key = run.run_id, record.step_key
        wf = get_workflow(run.workflow, run.workflow_module)
        step = wf.steps[record.step_id]
        takeover = claim.previous == StepStatus.RUNNING
        statuses = claim.statuses or {}
        start: dict[str, Any] = {"token": token, "worker": self.rt.worker, "takeover": takeover, "kind": record.kind,
                                 "state_version": run.state_version}
        with step_span(run.trace_id, f"step {step_key}", {"teamster.run_id": run_id, "teamster.step": step_key,
                                                          "teamster.attempt": record.attempts}):
            if takeover:
                metrics.LEASE_EXPIRIES.inc()
                if record.lease_expiries >= self.settings.max_lease_expiries:
                    self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start)
                    error = LeaseExpiredRepeatedly(
                        f"the step's lease expired {record.lease_expiries} times (workers killed or hung mid-step)",
                        lease_expiries=record.lease_expiries)
                    return self.transitions.fail(run, wf, step, record, token, failed_from(error), None)

            # -- decide: skip or run
            state = wf.state_model.model_validate(run.state)
            try:
                reason = None if record.branch_index is not None else skip_reason(wf, step, statuses, state)
            except Exception as exc:  # noqa: BLE001 - a user condition that raises is the step's failure
                self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start)
                broken = TerminalError(f"condition of step {step.id!r} raised {type(exc).__name__}: {exc}")
                return self.transitions.fail(run, wf, step, record, token, failed_from(broken), None)
            if reason is not None:
                start.update(state=state.model_dump(mode="json"), skip=reason)
                self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start)
                return self.transitions.commit(run, wf, step, record, token, None, skipped=reason, statuses=statuses)

            if record.kind == "child":
                return self._run_child(run, wf, step, record, token, state, start, statuses)

            # -- run, holding the lease
            control = StepControl()
            started = time.monotonic()
            agent_run: AgentRun | None = None
            budget = self._budget_seconds(step, record)
            with self.leases.hold(run_id, step_key, token, control,
                                  renew_for=budget + LEASE_GRACE_SECONDS) as extend_lease:
                if record.kind in ("agent", "branch"):
                    result, agent_run, tail = self._run_agent(run, wf, step, record, state, start, takeover, control,
                                                              extend_lease)
                else:
                    start["state"] = state.model_dump(mode="json")
                    self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start)
                    result = run_deterministic(self.store, run, wf, step, state)
                    tail = [("outcome", {"outcome": result.model_dump(mode="json")})]
            metrics.STEP_SECONDS.labels(run.workflow, step.id).observe(time.monotonic() - started)

            # -- end: commit, retry or dead-letter
            return self._end_attempt(run, wf, step, record, token, result, tail, control, agent_run, statuses)

    # ------------------------------------------------------------------ internals
    def _end_attempt(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int,
                     result: StepResult, tail: list[tuple[str, dict[str, Any]]], control: StepControl,
                     agent_run: AgentRun | None, statuses: dict[str, StepStatus]) -> StepExecution:
        """The end of an attempt that ran while holding the lease: its result dropped when the lease was lost
        (another worker owns the step), else committed, retried or dead-lettered; ``tail`` (the attempt's last
        journal events) goes out with it."""
        if control.reason == "lease_lost" or (isinstance(result, Failed) and result.error_type == "lease_lost"):
            tail.append(("lease_lost", {"token": token, "detail": "another worker owns the step; result dropped"}))
            self.journal.append_many(run.run_id, tail, step=record.step_key, attempt=record.attempts)
            return StepExecution(Delivery.LEASE_LOST, run.run_id, record.step_key, attempt=record.attempts)
        if isinstance(result, Succeeded):
            return self.transitions.commit(run, wf, step, record, token, result, agent_run=agent_run,
                                           statuses=statuses, events=tail)
        return self._retry_or_fail(run, wf, step, record, token, result, agent_run, tail)

    def _retry_or_fail(self, run: RunRecord, wf: Workflow | None, step: StepDef | None, record: StepRecord,
                       token: int, result: Failed | CannotComplete | NeedsHuman, agent_run: AgentRun | None,
                       tail: Sequence[tuple[str, dict[str, Any]]]) -> StepExecution:
        """An attempt that did not succeed: a retryable failure with attempts left under the step's retry policy is
        retried, anything else dead-lettered (``wf``/``step`` None: the workflow cannot be loaded; no retry)."""
        if step is not None and isinstance(result, Failed) and result.retryable:
            policy = self._retry_policy(step, record).resolved(self.settings)
            if record.attempts - record.attempt_base < int(policy.max_attempts or 1):
                assert wf is not None
                return self.transitions.schedule_retry(run, wf, step, record, token, result, policy, agent_run,
                                                       events=tail)
        return self.transitions.fail(run, wf, step, record, token, result, agent_run, events=tail)

    def _run_child(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int,
                   state: BaseModel, start: dict[str, Any], statuses: dict[str, StepStatus]) -> StepExecution:
        """A child step (:mod:`~teamster.orchestrator.child_steps`): start its child run and park, or end -- commit or
        dead-letter -- with the result of its settled child run."""
        control = StepControl()
        with self.leases.hold(run.run_id, record.step_key, token, control,
                              renew_for=self.settings.step_timeout_seconds + LEASE_GRACE_SECONDS):
            done = self.children.run(run, wf, step, record, token, state, start)
        if isinstance(done, StepExecution):
            return done
        result, tail = done  # a lost lease shows in control.reason (a child's failure is child_run_failed)
        return self._end_attempt(run, wf, step, record, token, result, tail, control, None, statuses)

    def _run_agent(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, state: BaseModel,
                   start: dict[str, Any], takeover: bool, control: StepControl, extend_lease: Callable[[float], None],
                   ) -> tuple[StepResult, AgentRun | None, list[tuple[str, dict[str, Any]]]]:
        """Run an agent step; returns its result, what it cost, and its last journal events (not yet written:
        they go out with the commit, retry or dead-letter transaction)."""
        run_id, step_key = run.run_id, record.step_key
        spec = spec_for(step, record)
        recorded = self.journal.reusable_exchanges(run_id, step_key, record.attempts - 1) if takeover else []
        memory = self.journal.delegations(run_id, step_key, record.attempts - 1 if takeover else None) \
            if spec.delegates else None
        start.update(agent=spec.name, agent_version=spec.version, model=spec.model, reused_responses=len(recorded))
        if memory is not None:
            start.update(reusable_delegations=len(memory.results), resumable_delegations=len(memory.exchanges))
        try:
            agent_input = step_input(wf, step, state, record)
        except Exception as exc:  # noqa: BLE001 - a broken inputs() mapping is the step's failure
            start["input_error"] = f"{type(exc).__name__}: {exc}"
            self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start)
            error = InvalidInput(f"could not build the input of step {step.id!r}: {start['input_error']}")
            return failed_from(error), None, []
        start["input"] = agent_input.model_dump(mode="json") if isinstance(agent_input, BaseModel) else agent_input
        context = StepContext(run_id=run_id, step_id=step_key, attempt=record.attempts, trace_id=run.trace_id)
        gate = self.rt.limiter.gate(run_id=run_id, step_key=step_key, workflow=run.workflow, tenant=run.tenant,
                                    budget=RunBudget.model_validate(run.budget) if run.budget else None,
                                    agent_limits=spec.limits, on_wait=extend_lease)
        return self._await_agent(spec, agent_input, context, start, recorded, control, gate, memory)

    def _await_agent(self, spec: AgentSpec[Any, Any], agent_input: Any, context: StepContext, start: dict[str, Any],
                     recorded: list[Any], control: StepControl, gate: RedisGate, memory: DelegationMemory | None,
                     ) -> tuple[StepResult, AgentRun | None, list[tuple[str, dict[str, Any]]]]:
        """Run the agent on the process's event loop, which journals its events (:class:`StepJournal`: the step's
        start goes out with its first model call, a model call within ``HOLD_SECONDS`` or with the step's end); this
        thread waits for the end.

        Returns the outcome, the agent's run, and the events that go out with the step's end (typically the last
        model call, validation, outcome).
        """
        run_id, step_key, attempt = context.run_id, context.step_id, context.attempt
        budget = spec.budget.timeout_seconds or self.settings.step_timeout_seconds
        sink = StepJournal(self.journal, self.rt.limiter.client, run_id=run_id, step_key=step_key, attempt=attempt,
                           agent=spec.name, first=[("step_start", start)])
        future = AgentLoop.shared().submit(sink.run(run_agent_async(
            spec, agent_input, settings=self.settings, on_event=sink.put, recorded=recorded, control=control,
            context=context, gate=gate, memory=memory)))
        started = time.monotonic()

        def left() -> float:  # the deadline moves by the time the step spent waiting for provider capacity
            return started + budget + gate.waited_seconds + 2 * HARD_GRACE_SECONDS - time.monotonic()

        while True:
            try:
                agent_run, tail = future.result(timeout=max(0.0, left()))
            except concurrent.futures.TimeoutError:
                if left() > 0:
                    continue  # the step waited for capacity meanwhile: its deadline moved
                break  # the loop did not return in time: abandon the step (below)
            agent_run.unrecorded_spend = gate.unrecorded()
            return agent_run.outcome, agent_run, tail
        sink.abandon()
        control.abort("timeout")
        future.cancel()
        outcome = failed_from(StepTimeout(f"step ran past its deadline of {budget:g}s and did not stop; abandoned",
                                          limit=budget, abandoned=True))
        return outcome, None, [("outcome", {"outcome": outcome.model_dump(mode="json"), "abandoned": True})]

    def _budget_seconds(self, step: StepDef, record: StepRecord) -> float:
        if record.kind in ("agent", "branch"):
            return spec_for(step, record).budget.timeout_seconds or self.settings.step_timeout_seconds
        return self.settings.step_timeout_seconds

    def _retry_policy(self, step: StepDef, record: StepRecord) -> RetryPolicy:
        if step.retry is not None:
            return step.retry
        if record.kind in ("agent", "branch"):
            return spec_for(step, record).retry
        return RetryPolicy()
