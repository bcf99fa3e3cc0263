"""Redis key naming of the run store, the journal and the dead-letter queue (one place)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """Every key teamster writes, under ``prefix`` (``TEAMSTER_KEY_PREFIX``)."""

    prefix: str

    def run(self, run_id: str) -> str:
        """Hash: the run record."""
        return f"{self.prefix}:run:{run_id}"

    def steps(self, run_id: str) -> str:
        """Hash: step_key -> status, for every step record of the run (the run's step index). It records a step's
        status when it is queued and when it ends: an open step (running, retrying) reads ``queued`` here; its
        record has the live status."""
        return f"{self.prefix}:run:{run_id}:steps"

    def step(self, run_id: str, step_key: str) -> str:
        """Hash: one step record."""
        return f"{self.prefix}:run:{run_id}:step:{step_key}"

    def limit(self, name: str) -> str:
        """Base of one shared provider limit's keys, ``{base}:slots|log|tokens|queue|alive`` (``name``: a provider
        string, or ``model@tenant``; see ``limits.LIMIT_KEY_PARTS``)."""
        return f"{self.prefix}:limit:{name}"

    def provider(self, model: str) -> str:
        """Base of one provider string's health keys, ``{base}:cooldown|errors|open|probe`` (every worker's)."""
        return f"{self.prefix}:provider:{model}"

    def journal(self, run_id: str) -> str:
        """Stream: the run's journal."""
        return f"{self.prefix}:journal:{run_id}"

    @property
    def epoch(self) -> str:
        """String (JSON): when teamster first wrote to this Redis under this prefix. Its absence, while runs are
        expected, means Redis lost the data (restarted without persistence, flushed, evicted)."""
        return f"{self.prefix}:epoch"

    @property
    def runs(self) -> str:
        """Sorted set: every run id by creation time."""
        return f"{self.prefix}:runs"

    @property
    def inflight(self) -> str:
        """Sorted set: ``run_id|step_key`` of non-terminal steps, scored by when the watchdog should look."""
        return f"{self.prefix}:inflight"

    @property
    def parked(self) -> str:
        """Sorted set: ``run_id|step_key`` of parked child steps, scored by when the watchdog checks their child run
        (a safety net for a lost wake-up)."""
        return f"{self.prefix}:parked"

    @property
    def active_runs(self) -> str:
        """Sorted set: non-final runs scored by their progress deadline."""
        return f"{self.prefix}:active_runs"

    @property
    def dlq_open(self) -> str:
        """Sorted set: open dead-letter entry ids by creation time."""
        return f"{self.prefix}:dlq:open"

    @property
    def dlq_all(self) -> str:
        """Sorted set: every dead-letter entry id by creation time."""
        return f"{self.prefix}:dlq:all"

    def dlq_entry(self, entry_id: str) -> str:
        """String: one dead-letter entry (JSON)."""
        return f"{self.prefix}:dlq:entry:{entry_id}"

    def run_dlq(self, run_id: str) -> str:
        """Set: dead-letter entry ids of one run."""
        return f"{self.prefix}:run:{run_id}:dlq"

    def applied(self, stamp: str) -> str:
        """String, short-lived: the stamp of a transaction without a marker of its own (see ``store.Tx``), so a retry
        after a lost reply recognises that it was applied."""
        return f"{self.prefix}:applied:{stamp}"

    def run_keys(self, run_id: str, step_keys: Iterable[str]) -> list[str]:
        """Every key of one run whose steps are ``step_keys`` (what a finished run's retention expires or keeps)."""
        keys = [self.run(run_id), self.steps(run_id), self.journal(run_id), self.run_dlq(run_id)]
        keys += [self.step(run_id, k) for k in step_keys]
        return keys

    @staticmethod
    def member(run_id: str, step_key: str) -> str:
        """Member of the in-flight set."""
        return f"{run_id}|{step_key}"
