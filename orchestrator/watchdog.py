"""The watchdog: no step is lost, none waits on Redis's visibility timeout, no run hangs silently.

Every non-terminal step is in the in-flight set, scored by when it deserves a look: lease expiry for a
running step (renewals push it forward), ``stuck_queued_seconds`` after queueing, the retry time plus grace
for a retrying step. A scan takes the due members and

* re-enqueues a running step whose lease lapsed (its worker died): the next claim takes over with a new
  fencing token, reusing the recorded model answers; after ``max_lease_expiries`` the step is dead-lettered;
* re-sends a step queued or retrying for too long (duplicates are harmless: claims and commits are fenced);
* escalates runs with no progress past their deadline to the dead-letter queue (a run's score in the active set is
  its deadline as of when it was set; a step commit does not move it, so a due run whose ``progress_at`` is recent
  only gets its score moved) -- except a run whose parked child
  step waits for a child run that is still running: the child has its own deadline, and its escalation wakes the
  parent, so the parent's deadline is pushed back instead;
* checks parked child steps (``{prefix}:parked``): one whose child run settled without waking it (a lost wake-up) is
  queued again; one whose own run ended (failed, cancelled) is cancelled, and its child run with it.

It runs under celery beat (``teamster.watchdog`` task) or as ``teamster watchdog``; several watchdogs at
once are safe (every action is idempotent).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from teamster.errors import TeamsterError
from teamster.orchestrator import metrics
from teamster.orchestrator.child_steps import ChildSteps
from teamster.orchestrator.children import SETTLED_RUN, child_run_id
from teamster.orchestrator.models import RUN_TERMINAL, STEP_TERMINAL, RunRecord, RunStatus, StepStatus, now
from teamster.orchestrator.runtime import Runtime
from teamster.orchestrator.transitions import Transitions, run_deadline_seconds
from teamster.orchestrator.workflow import registered_workflows

__all__ = ["Watchdog", "WatchdogReport"]

log = logging.getLogger(__name__)


@dataclass
class WatchdogReport:
    """What one scan did."""

    lease_recoveries: int = 0
    requeued: int = 0
    late_retries: int = 0
    escalated_runs: int = 0
    cleaned: int = 0
    child_wakeups: int = 0
    """Parked steps queued again because their child run had settled without waking them."""
    deadlines_deferred: int = 0
    """Runs past their progress deadline left running because a child run of theirs is still running."""
    orphans_cancelled: int = 0
    """Child runs cancelled because the run that started them ended."""

    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Watchdog:
    """Scans the in-flight set and active runs (see module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.store = runtime.store
        self.keys = runtime.keys
        self.client = runtime.client
        self.journal = runtime.journal
        self.settings = runtime.settings
        self.transitions = Transitions(runtime)
        self.children = ChildSteps(runtime, self.transitions)
        self._epoch: float | None = None

    def scan(self, limit: int = 500) -> WatchdogReport:
        """One pass over what is due now."""
        report = WatchdogReport()
        t = now()
        self._check_epoch()
        due = self.client.zrangebyscore(self.keys.inflight, "-inf", t, start=0, num=limit)
        for member in due:  # type: ignore[union-attr]
            self._check_step(str(member), t, report)
        for member in self.client.zrangebyscore(self.keys.parked, "-inf", t, start=0, num=limit):  # type: ignore[union-attr]
            self._check_parked(str(member), t, report)
        for run_id in self.client.zrangebyscore(self.keys.active_runs, "-inf", t, start=0, num=limit):  # type: ignore[union-attr]
            self._check_run(str(run_id), t, report)
        if report.total():
            log.info("watchdog: %s", report.as_dict())
        return report

    def _check_epoch(self) -> None:
        """Say it loudly when Redis lost teamster's data since the last scan (its epoch mark vanished or changed)."""
        epoch = self.store.epoch()
        if epoch is None:
            epoch = self.store.ensure_epoch()
            if self._epoch is not None or self.client.zcard(self.keys.runs):
                metrics.STORE_DATA_LOST.inc()
                log.error("Redis lost teamster's data under prefix %r%s: its epoch mark %s was gone (restarted "
                          "without persistence, flushed, or evicting keys); runs written before that are lost",
                          self.keys.prefix, f" since {self._epoch:.0f} (unix time)" if self._epoch else "",
                          self.keys.epoch)
        elif self._epoch is not None and abs(epoch - self._epoch) > 1e-6:
            metrics.STORE_DATA_LOST.inc()
            log.error("Redis lost teamster's data under prefix %r: its epoch mark changed from %.0f to %.0f "
                      "(unix time)", self.keys.prefix, self._epoch, epoch)
        self._epoch = epoch

    def _bump(self, member: str, score: float) -> None:
        self.client.zadd(self.keys.inflight, {member: score})

    def _check_step(self, member: str, t: float, report: WatchdogReport) -> None:
        run_id, _, key = member.partition("|")
        record = self.store.get_step(run_id, key)
        if record is None or record.status in STEP_TERMINAL:
            self.client.zrem(self.keys.inflight, member)
            report.cleaned += 1
            return
        run_status = self.store.run_status(run_id)
        if run_status is None or run_status in RUN_TERMINAL:
            self.transitions.cancel_step_if_open(run_id, key, "run ended")
            self.client.zrem(self.keys.inflight, member)
            report.cleaned += 1
            return
        if record.status == StepStatus.PARKED:  # watched through the parked set
            self.client.zrem(self.keys.inflight, member)
            report.cleaned += 1
            return
        grace = self.settings.stuck_queued_seconds
        if record.status == StepStatus.RUNNING:
            remaining = self.store.lease_remaining(run_id, key)
            if remaining > 0:  # still leased: look again when it lapses
                self._bump(member, t + remaining + 0.05)
                return
            metrics.LEASE_EXPIRIES.inc()
            self.journal.append(run_id, "lease_expired", step=key, attempt=record.attempts,
                                data={"worker": record.worker, "token": record.fence,
                                      "action": "re-enqueued for another worker"})
            report.lease_recoveries += 1
        elif record.status == StepStatus.RETRYING:
            if record.next_retry_at is not None and record.next_retry_at + grace > t:
                self._bump(member, record.next_retry_at + grace)
                return
            self.journal.append(run_id, "requeued", step=key, data={"reason": "retry message overdue"})
            report.late_retries += 1
        else:
            self.journal.append(run_id, "requeued", step=key,
                                data={"reason": f"queued for {t - record.queued_at:.0f}s without being claimed"})
            report.requeued += 1
        self._bump(member, t + grace)
        self.transitions.enqueue(run_id, [key], {key: record.label})

    def _check_parked(self, member: str, t: float, report: WatchdogReport) -> None:
        """A parked child step: wake it if its child settled (a lost wake-up), clean it up if its run ended."""
        run_id, _, key = member.partition("|")
        record = self.store.get_step(run_id, key)
        if record is None or record.status != StepStatus.PARKED:
            self.client.zrem(self.keys.parked, member)
            report.cleaned += 1
            return
        child_id = record.child_run or child_run_id(run_id, key)
        run_status = self.store.run_status(run_id)
        if run_status is None or run_status in RUN_TERMINAL:
            # the step first, so cancelling the child does not queue it again
            self.transitions.cancel_step_if_open(run_id, key, f"run ended ({run_status or 'gone'})")
            self.client.zrem(self.keys.parked, member)
            if self.store.run_status(child_id) not in (*RUN_TERMINAL, None):
                try:
                    self.transitions.cancel_run(child_id, by="watchdog",
                                                reason=f"its parent run {run_id} is {run_status or 'gone'}")
                    report.orphans_cancelled += 1
                except TeamsterError as exc:  # it ended meanwhile
                    log.info("watchdog: child run %s not cancelled: %s", child_id, exc)
            report.cleaned += 1
            return
        child_status = self.store.run_status(child_id)
        if child_status is not None and child_status not in SETTLED_RUN:
            self._bump_parked(member, t + self.settings.stuck_queued_seconds)
            return
        if self.children.wake_parked(run_id, key, child_id, child_status):
            report.child_wakeups += 1
        self._bump_parked(member, t + self.settings.stuck_queued_seconds)

    def _bump_parked(self, member: str, score: float) -> None:
        self.client.zadd(self.keys.parked, {member: score}, xx=True)

    def _waits_for_children(self, run: RunRecord) -> bool:
        """Whether a parked step of ``run`` waits for a child run that is still running (making its own progress,
        under its own deadline)."""
        parked = [key for key, status in self.store.step_statuses(run.run_id).items() if status == StepStatus.PARKED]
        if not parked:
            return False
        statuses = self.store.run_statuses(child_run_id(run.run_id, key) for key in parked)
        return any(status in (RunStatus.RUNNING, RunStatus.PENDING) for status in statuses.values())

    def _check_run(self, run_id: str, t: float, report: WatchdogReport) -> None:
        try:
            run = self.store.get_run(run_id)
        except Exception:  # noqa: BLE001 - expired or removed
            self.client.zrem(self.keys.active_runs, run_id)
            return
        if run.status not in (RunStatus.RUNNING, RunStatus.PENDING):
            self.client.zrem(self.keys.active_runs, run_id)
            return
        wf = registered_workflows().get(run.workflow)
        deadline = run_deadline_seconds(wf, self.settings)
        if run.progress_at + deadline > t:  # progress since the score was set (commits leave it to this check)
            self.client.zadd(self.keys.active_runs, {run_id: run.progress_at + deadline}, xx=True)
            return
        if self._waits_for_children(run):
            self.client.zadd(self.keys.active_runs, {run_id: t + deadline}, xx=True)
            report.deadlines_deferred += 1
            return
        if self.transitions.escalate_stalled(run, wf, t - run.progress_at):
            report.escalated_runs += 1

    def run_forever(self, stop: threading.Event, interval: float | None = None,
                    on_report: Callable[[WatchdogReport], None] | None = None) -> None:
        """Scan every ``interval`` seconds until ``stop`` is set; Redis errors are logged and retried."""
        period = interval or self.settings.watchdog_interval_seconds
        while not stop.is_set():
            try:
                report = self.scan()
                if on_report is not None:
                    on_report(report)
            except Exception:  # noqa: BLE001 - a watchdog must outlive Redis blips
                log.exception("watchdog scan failed; retrying in %ss", period)
            stop.wait(period)
