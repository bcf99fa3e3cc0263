"""Lease keeping for every step a worker process runs: one thread, one round trip per renewal period.

A running step holds a lease with a fencing token; the :class:`LeaseKeeper` renews all leases of the process
together every third of the lease length (one Lua call, whatever the number of steps in flight), and tells a step
to stop (through its :class:`~teamster.agents.guard.StepControl`) when its lease was taken over or its run was
cancelled. A lease is renewed only until its step's deadline plus a grace period (invariant I8): past that, a
thread that is truly stuck stops renewing, the lease lapses and the watchdog gives the step to another worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from teamster.agents.guard import StepControl
from teamster.orchestrator import metrics
from teamster.orchestrator.models import RunStatus
from teamster.orchestrator.store import RunStore

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


@dataclass
class _Held:
    run_id: str
    step_key: str
    token: int
    control: StepControl
    renew_until: float
    stopped: bool = False


class LeaseKeeper:
    """Renews the leases of the steps this process runs (see module docstring).

    Args:
        store: The run store.
        lease_seconds: Lease length.
    """

    def __init__(self, store: RunStore, lease_seconds: float) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, run_id: str, step_key: str, token: int, control: StepControl,
             renew_for: float) -> Iterator[Callable[[float], None]]:
        """Keep the lease of a claimed step while the block runs, for at most ``renew_for`` seconds.

        Yields a function that renews it for longer: a step that waited for provider capacity has its deadline
        extended by the wait, and its lease with it.
        """
        item = _Held(run_id, step_key, token, control, time.monotonic() + renew_for)

        def extend(seconds: float) -> None:
            item.renew_until += seconds

        with self._lock:
            self._held[id(item)] = item
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="teamster-leases", daemon=True)
                self._thread.start()
        try:
            yield extend
        finally:
            with self._lock:
                self._held.pop(id(item), None)

    def _loop(self) -> None:
        period = self.lease_seconds / 3.0
        while True:
            time.sleep(period)
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                items = list(self._held.values())
            t = time.monotonic()
            due = [item for item in items if item.renew_until > t]
            for item in items:
                if item.renew_until <= t and not item.stopped:
                    # past its deadline plus grace: stop renewing; the watchdog takes the step over when it lapses
                    item.stopped = True
                    metrics.LEASES_ABANDONED.inc()
                    log.warning("step %s:%s is past its deadline; its lease is no longer renewed", item.run_id,
                                item.step_key)
            try:
                answers = self.store.renew([(i.run_id, i.step_key, i.token) for i in due], self.lease_seconds)
            except redis.RedisError as exc:  # keep trying: the leases may still be valid when Redis is back
                log.warning("lease renewal failed for %d step(s): %s", len(due), exc)
                continue
            for item, (held, run_status) in zip(due, answers, strict=True):
                if not held:
                    item.control.abort("lease_lost")
                elif run_status == RunStatus.CANCELLED:
                    item.control.abort("cancelled: the run was cancelled")
