"""Child runs, the parts every transition shares: the child's run id, the writes that wake a parked parent step,
and the tree of runs a cancellation reaches.

A child step (:meth:`~teamster.orchestrator.workflow.Workflow.child`) starts its child run and parks in one
transaction (:mod:`~teamster.orchestrator.child_steps`). Whatever settles the child run afterwards -- its last
commit, a dead-letter write that leaves it escalated, needs_human or failed, the watchdog's deadline escalation, a
cancellation, a discarded entry -- queues the parked parent step again *in the same transaction*, through
:func:`wake_parent`: conditional writes that apply only while the parent step is still parked on this very child
(so a second settling, or a parent that was cancelled meanwhile, changes nothing). The caller then sends the parent
step's message; if that message is lost, the parent step is ``queued`` in the in-flight set and the watchdog re-sends
it like any queued step. The watchdog also checks parked steps (``{prefix}:parked``) and wakes one whose child
settled without waking it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from teamster.config.settings import TeamsterSettings
from teamster.errors import RunNotFound
from teamster.orchestrator.journal import Journal
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import RUN_TERMINAL, STEP_OPEN, RunRecord, RunStatus, StepStatus
from teamster.orchestrator.store import RunStore, Tx

__all__ = ["child_run_id", "wake_parent", "requeue_parked_ops", "ParentWake", "CancelTree", "cancel_tree",
           "SETTLED_RUN"]

SETTLED_RUN = frozenset({*RUN_TERMINAL, RunStatus.ESCALATED, RunStatus.NEEDS_HUMAN})
"""Run statuses that wake a parked parent: final, or waiting for an operator."""


def child_run_id(parent_run_id: str, step_key: str) -> str:
    """The run id of the child run started by step ``step_key`` of ``parent_run_id``: derived from both, so every
    delivery, retry or takeover of the step names the same child (and the store refuses a second one)."""
    return "run_" + uuid.uuid5(uuid.NAMESPACE_URL, f"teamster:child:{parent_run_id}:{step_key}").hex[:24]


@dataclass(frozen=True)
class ParentWake:
    """The wake-up a transaction carries (:func:`wake_parent`): which parent step, and the condition that says
    whether it applied."""

    run_id: str
    step_key: str
    condition: int

    def applied(self, held: list[bool]) -> bool:
        """Whether the parent step was queued again (from what :meth:`RunStore.apply` returned)."""
        return len(held) >= self.condition and held[self.condition - 1]


def requeue_parked_ops(tx: Tx, keys: Keys, journal: Journal, settings: TeamsterSettings, run_id: str, key: str,
                       t: float, *, reason: str, settled: dict[str, Any], when: int | None = None) -> None:
    """Add to ``tx`` the writes that queue parked step ``key`` of ``run_id`` again: its record and index entry
    ``queued`` (with ``reason``), out of the parked set, into the in-flight set, and a ``child_settled`` journal event
    with ``settled`` as its data. The caller guards them (``when``: only if that :meth:`Tx.condition` holds)."""
    step = keys.step(run_id, key)
    member = Keys.member(run_id, key)
    tx.hset(step, {"status": StepStatus.QUEUED, "queued_at": t, "reason": reason}, when=when)
    tx.hset(keys.steps(run_id), {key: StepStatus.QUEUED}, when=when)
    tx.call("ZREM", keys.parked, member, when=when)
    tx.call("ZADD", keys.inflight, t + settings.stuck_queued_seconds, member, when=when)
    tx.xadd(keys.journal(run_id), journal.fields("child_settled", step=key, data=settled), when=when)


def wake_parent(tx: Tx, keys: Keys, journal: Journal, settings: TeamsterSettings, child: RunRecord,
                status: RunStatus, t: float, *, entry: str | None = None) -> ParentWake | None:
    """Add to ``tx`` (which settles ``child`` as ``status``) the writes that queue its parked parent step again, if
    ``child`` is a child run. They apply only while that step is parked on this child; the caller sends the parent
    step's message when :meth:`ParentWake.applied` (duplicates are harmless). Returns None for a top-level run."""
    if not child.parent_run or not child.parent_step:
        return None
    parent, key = child.parent_run, child.parent_step
    step = keys.step(parent, key)
    held = tx.condition((step, "status", "eq", StepStatus.PARKED), (step, "child_run", "eq", child.run_id))
    requeue_parked_ops(tx, keys, journal, settings, parent, key, t, reason=f"child run {child.run_id} is {status}",
                       settled={"child_run": child.run_id, "workflow": child.workflow, "status": status,
                                "dlq_entry": entry}, when=held)
    return ParentWake(parent, key, held)


@dataclass
class CancelTree:
    """A run to cancel and, recursively, its child runs that are not final yet (what one cancellation reaches)."""

    run: RunRecord
    open_steps: list[str]
    children: list[CancelTree] = field(default_factory=list)

    def walk(self) -> list[CancelTree]:
        """This node and every descendant, parents first."""
        out = [self]
        for child in self.children:
            out += child.walk()
        return out


def cancel_tree(store: RunStore, run: RunRecord, seen: set[str] | None = None) -> CancelTree:
    """``run`` with its open steps and, recursively, every child run of its steps that is not final (running, or
    waiting for an operator). Child runs are found by their derived ids (:func:`child_run_id`), one pipelined
    read per level."""
    seen = seen if seen is not None else set()
    seen.add(run.run_id)
    statuses = store.step_statuses(run.run_id)
    node = CancelTree(run, [key for key, status in statuses.items() if status in STEP_OPEN])
    candidates = {child_run_id(run.run_id, key): key for key in statuses}
    for child_id, status in store.run_statuses(candidates).items():
        if status is None or status in RUN_TERMINAL or child_id in seen:
            continue
        try:
            child = store.get_run(child_id)
        except RunNotFound:
            continue  # expired since it was read
        if child.parent_run == run.run_id:
            node.children.append(cancel_tree(store, child, seen))
    return node
