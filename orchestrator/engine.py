"""The engine: executes one step end to end -- claim, run, journal, commit or retry or dead-letter.

The step task is a thin wrapper around :meth:`Engine.execute`. The path of one step (DESIGN.md, 3-7):

1. Claim the lease with a new fencing token. A step already terminal returns its recorded result and calls
   no model (I3); a step whose lease another live worker holds is a duplicate delivery and is dropped.
2. Run it (agent, function, fan-out or join), renewing the lease while it runs; a step recovered from a dead
   worker reuses the model answers that worker already recorded.
3. Succeeded: commit the output, the new state version and the newly ready steps in one transaction guarded
   by the fencing token (I4) and the state version; then enqueue the ready steps.
4. Retryable failure with attempts left: schedule a retry (backoff + jitter, below the visibility timeout).
5. Anything else: dead-letter it with full context and run the step's escalation policy (I1, I6).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from strands.models.model import Model

from teamster.agents.guard import StepControl
from teamster.agents.outcomes import CannotComplete, Failed, NeedsHuman, Succeeded, failed_from
from teamster.agents.providers import build_model
from teamster.agents.runner import AgentRun, StepContext, run_agent, validate_input
from teamster.agents.scripted import ScriptContext, ScriptedModel
from teamster.agents.spec import AgentSpec, RetryPolicy, get_agent
from teamster.config.settings import TeamsterSettings
from teamster.errors import InvalidInput, LeaseExpiredRepeatedly, TeamsterError, TerminalError
from teamster.orchestrator import metrics
from teamster.orchestrator.journal import Journal
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import (
    RunRecord,
    StepRecord,
    StepStatus,
)
from teamster.orchestrator.planner import skip_reason, step_input
from teamster.orchestrator.store import RunStore
from teamster.orchestrator.tracing import step_span
from teamster.orchestrator.transitions import Transitions
from teamster.orchestrator.workflow import StepDef, Workflow, get_workflow

__all__ = ["Engine", "Enqueuer", "StepExecution", "LeaseExpiredRepeatedly"]

log = logging.getLogger(__name__)

StepResult = Succeeded | CannotComplete | NeedsHuman | Failed


class Enqueuer(Protocol):
    """Sends step messages (the Celery implementation lives in :mod:`tasks`)."""

    def enqueue(self, run_id: str, step_key: str, countdown: float | None = None) -> None: ...



@dataclass
class StepExecution:
    """What one delivery of a step did (the step task returns it as JSON).

    ``status`` is one of ``committed``, ``skipped``, ``retry``, ``dead_lettered``, ``requeued`` (escalated to
    a fallback), ``already_done`` (redelivery: nothing ran), ``duplicate_in_progress``, ``stale`` (commit
    rejected), ``lease_lost``, ``run_final`` and ``missing``.
    """

    status: str
    run_id: str
    step_key: str
    step_status: str | None = None
    retry_in: float | None = None
    attempt: int | None = None
    outcome: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


class _LeaseKeeper:
    """Renews the lease every third of its length; aborts the step when the lease or the run is lost."""

    def __init__(self, engine: Engine, run_id: str, step_key: str, token: int, control: StepControl) -> None:
        self.engine = engine
        self.run_id = run_id
        self.step_key = step_key
        self.token = token
        self.control = control
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease:{run_id}:{step_key}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        settings = self.engine.settings
        while not self._stop.wait(settings.lease_renew_seconds):
            try:
                if not self.engine.store.renew(self.run_id, self.step_key, self.token, settings.lease_seconds):
                    self.control.abort("lease_lost")
                    return
                status = self.engine.client.hget(self.engine.keys.run(self.run_id), "status")
                if status == '"cancelled"':
                    self.control.abort("cancelled: the run was cancelled")
                    return
            except redis.RedisError as exc:  # keep trying: the lease may still be valid when Redis is back
                log.warning("lease renewal for %s:%s failed: %s", self.run_id, self.step_key, exc)


class Engine:
    """Executes steps against the run store.

    Args:
        settings: teamster settings.
        client: Redis client (``decode_responses=True``).
        enqueuer: Sends step messages.
        worker: Name recorded on claims (default ``host:pid``).
    """

    def __init__(self, settings: TeamsterSettings, client: redis.Redis, enqueuer: Enqueuer,
                 worker: str | None = None) -> None:
        self.settings = settings
        self.client = client
        self.enqueuer = enqueuer
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.keys = Keys(settings.key_prefix)
        self.store = RunStore(client, self.keys)
        self.journal = Journal(client, self.keys, payload_cap=settings.journal_payload_cap,
                               model_response_cap=settings.journal_model_response_cap,
                               redact_patterns=settings.redact_patterns)
        self.transitions = Transitions(self)

    # ------------------------------------------------------------------ public
    def execute(self, run_id: str, step_key: str) -> StepExecution:
        """Process one delivery of a step message (idempotent: safe to call any number of times)."""
        claim = self.store.claim(run_id, step_key, self.worker, self.settings.lease_seconds)
        if claim.kind != "claimed":
            return self._not_claimed(run_id, step_key, claim.kind, claim.previous)
        record = self.store.get_step(run_id, step_key)
        run = self.store.get_run(run_id)
        assert record is not None
        wf = get_workflow(run.workflow)
        step = wf.steps[record.step_id]
        takeover = claim.previous == "running"
        if takeover:
            metrics.LEASE_EXPIRIES.inc()
        with step_span(run.trace_id, f"step {step_key}", {"teamster.run_id": run_id, "teamster.step": step_key,
                                                          "teamster.attempt": record.attempts}):
            if takeover and record.lease_expiries >= self.settings.max_lease_expiries:
                error = LeaseExpiredRepeatedly(
                    f"the step's lease expired {record.lease_expiries} times (workers killed or hung mid-step)",
                    lease_expiries=record.lease_expiries)
                self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts,
                                    data={"token": claim.token, "worker": self.worker, "takeover": True})
                return self.transitions.fail(run, wf, step, record, claim.token, failed_from(error), None)
            return self._execute_claimed(run, wf, step, record, claim.token, takeover)

    # ------------------------------------------------------------------ internals
    def _not_claimed(self, run_id: str, step_key: str, kind: str, detail: str) -> StepExecution:
        if kind == "terminal":
            record = self.store.get_step(run_id, step_key)
            self.journal.append(run_id, "redelivery_ignored", step=step_key,
                                data={"reason": "step already ended", "status": detail.strip('"')})
            return StepExecution("already_done", run_id, step_key, step_status=record.status if record else None,
                                 outcome=record.outcome if record else None)
        if kind == "busy":
            self.journal.append(run_id, "redelivery_ignored", step=step_key,
                                data={"reason": "another worker holds the lease", "token": detail})
            return StepExecution("duplicate_in_progress", run_id, step_key)
        if kind == "run_final":
            self.transitions.cancel_step_if_open(run_id, step_key, f"run is {detail.strip(chr(34))}")
            return StepExecution("run_final", run_id, step_key, detail={"run_status": detail.strip('"')})
        log.warning("step message for unknown step %s of run %s (expired or never created)", step_key, run_id)
        return StepExecution("missing", run_id, step_key)

    def _execute_claimed(self, run: RunRecord, wf: Workflow, step: StepDef, record: StepRecord, token: int,
                         takeover: bool) -> StepExecution:
        run_id, step_key = run.run_id, record.step_key
        state = wf.state_model.model_validate(run.state)
        statuses = self.store.step_statuses(run_id)
        start_data: dict[str, Any] = {"token": token, "worker": self.worker, "takeover": takeover,
                                      "kind": record.kind, "state_version": run.state_version}
        try:
            reason = None if record.branch_index is not None else skip_reason(wf, step, statuses, state)
        except Exception as exc:  # a user condition that raises is a terminal failure of the step
            self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start_data)
            error = TerminalError(f"condition of step {step.id!r} raised {type(exc).__name__}: {exc}")
            return self.transitions.fail(run, wf, step, record, token, failed_from(error), None)
        if reason is not None:
            start_data.update(state=state.model_dump(mode="json"), skip=reason)
            self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start_data)
            return self.transitions.commit(run, wf, step, record, token, None, skipped=reason)

        control = StepControl()
        started = time.monotonic()
        agent_run: AgentRun | None = None
        with _LeaseKeeper(self, run_id, step_key, token, control):
            if record.kind in ("agent", "branch"):
                spec = self._spec_for(step, record)
                recorded = (self.journal.reusable_exchanges(run_id, step_key, record.attempts - 1)
                            if takeover else [])
                try:
                    agent_input = step_input(wf, step, state, record)
                    start_data.update({"agent": spec.name, "agent_version": spec.version, "model": spec.model,
                                       "input": _jsonable(agent_input), "reused_responses": len(recorded)})
                except Exception as exc:  # noqa: BLE001 - a broken inputs() mapping is the step's failure
                    agent_input = None
                    start_data["input_error"] = f"{type(exc).__name__}: {exc}"
                self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start_data)
                if agent_input is None and "input_error" in start_data:
                    result: StepResult = failed_from(InvalidInput(
                        f"could not build the input of step {step.id!r}: {start_data['input_error']}"))
                else:
                    agent_run = run_agent(
                        spec, agent_input, settings=self.settings, model=self._model_for(spec),
                        context=StepContext(run_id=run_id, step_id=step_key, attempt=record.attempts,
                                            trace_id=run.trace_id),
                        on_event=lambda kind, data: self._journal_agent_event(run, step_key, record.attempts,
                                                                             spec, kind, data),
                        recorded=recorded, control=control,
                    )
                    result = agent_run.outcome
            else:
                start_data["state"] = state.model_dump(mode="json")
                self.journal.append(run_id, "step_start", step=step_key, attempt=record.attempts, data=start_data)
                result = self._run_deterministic(run, wf, step, state)
                self.journal.append(run_id, "outcome", step=step_key, attempt=record.attempts,
                                    data={"outcome": result.model_dump(mode="json")})
        elapsed = time.monotonic() - started
        metrics.STEP_SECONDS.labels(run.workflow, step.id).observe(elapsed)
        if control.reason == "lease_lost" or (isinstance(result, Failed) and result.error_type == "lease_lost"):
            self.journal.append(run_id, "lease_lost", step=step_key, attempt=record.attempts,
                                data={"token": token, "detail": "another worker owns the step; result dropped"})
            return StepExecution("lease_lost", run_id, step_key, attempt=record.attempts)
        if isinstance(result, Succeeded):
            return self.transitions.commit(run, wf, step, record, token, result, agent_run=agent_run)
        policy = (step.retry or self._spec_retry(step, record)).resolved(self.settings)
        attempts_used = record.attempts - record.attempt_base
        if isinstance(result, Failed) and result.retryable and attempts_used < int(policy.max_attempts or 1):
            return self.transitions.schedule_retry(run, step, record, token, result, policy, agent_run)
        return self.transitions.fail(run, wf, step, record, token, result, agent_run)

    def _spec_for(self, step: StepDef, record: StepRecord) -> AgentSpec[Any, Any]:
        spec = step.spec
        fallback = record.fallback or {}
        if fallback.get("agent"):
            spec = get_agent(str(fallback["agent"]))
        if fallback.get("model"):
            spec = spec.with_model(str(fallback["model"]))
        return spec

    def _model_for(self, spec: AgentSpec[Any, Any]) -> Model | None:
        """A fresh model for one step; the scripted model also counts its calls in Redis (tests, bench)."""
        try:
            model = build_model(spec.model or self.settings.model, self.settings, agent=spec.name)
        except TeamsterError:
            return None  # run_agent builds it again and turns the error into a typed outcome
        if isinstance(model, ScriptedModel):
            counter, client = self.keys.scripted_calls, self.client

            def count(ctx: ScriptContext) -> None:
                client.hincrby(counter, f"{ctx.run_id}:{ctx.step_id}", 1)

            model.on_call = count
        return model

    def _spec_retry(self, step: StepDef, record: StepRecord) -> RetryPolicy:
        if record.kind in ("agent", "branch"):
            return self._spec_for(step, record).retry
        return RetryPolicy()

    def _run_deterministic(self, run: RunRecord, wf: Workflow, step: StepDef, state: Any) -> StepResult:
        """Function, fan-out and join steps: plain code over the state, no model."""
        try:
            if step.kind == "function":
                assert step.fn is not None
                output = step.fn(state)
                data = output.model_dump(mode="json") if hasattr(output, "model_dump") else dict(output)
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
                branch = self.store.get_step(run.run_id, f"{fan_out}[{index}]")
                if branch is None or branch.status != StepStatus.SUCCEEDED:
                    raise TerminalError(f"join {step.id!r}: branch {index} of {fan_out!r} has not succeeded")
                outputs.append(branch.output)
            return Succeeded(output={"items": outputs})
        except TeamsterError as exc:
            return failed_from(exc)
        except Exception as exc:  # noqa: BLE001 - user code: a typed terminal failure, never a crash
            return Failed(error_type="function_error", message=f"{type(exc).__name__}: {exc}", retryable=False,
                          details={"step": step.id})

    def _journal_agent_event(self, run: RunRecord, step_key: str, attempt: int, spec: AgentSpec[Any, Any],
                             kind: str, data: dict[str, Any]) -> None:
        if kind == "model_call":
            usage = data.get("usage") or {}
            metrics.MODEL_SECONDS.labels(spec.name).observe(float(data.get("latency_ms", 0)) / 1000.0)
            for token_kind in ("inputTokens", "outputTokens"):
                if usage.get(token_kind):
                    metrics.TOKENS.labels(spec.name, token_kind).inc(int(usage[token_kind]))
        self.journal.append(run.run_id, kind, step=step_key, attempt=attempt, data=data)

    def enqueue_many(self, run_id: str, step_keys: list[str]) -> None:
        """Send step messages; a failure here is recovered by the watchdog (the steps are recorded queued)."""
        for key in step_keys:
            try:
                self.enqueuer.enqueue(run_id, key)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not enqueue %s:%s (%s); the watchdog will re-send it", run_id, key, exc)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value

