"""One long-lived event loop per process, on which every agent step runs.

strands' synchronous ``Agent.__call__`` starts a thread and a new event loop for every call; with hundreds of
steps in flight that is hundreds of loops, and no async client can be shared between them. Instead, each worker
process runs one event loop in a daemon thread: the step task (a Celery thread) hands the step's coroutine to it
and waits for the result. HTTP clients and their connection pools are bound to this loop and shared by every step
(see :mod:`teamster.agents.providers`).

Synchronous tools run in the loop's default executor (strands uses ``asyncio.to_thread``), sized with
``tool_threads``: a step that times out abandons a tool thread that cannot be cancelled, and its late result is
discarded.

The loop is created on first use in each process (a forked child gets its own). It also decides how many steps the
process runs at once (:class:`Admission`): no more than the loop keeps up with.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["Admission", "AgentLoop", "DaemonExecutor"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool whose threads are daemons and are not joined at interpreter exit.

    The standard ``ThreadPoolExecutor`` joins its threads when the interpreter exits: one tool that never returns
    would then keep a worker from ever shutting down. A tool abandoned at its step's deadline must not do that.
    (It subclasses ``ThreadPoolExecutor`` only because asyncio accepts nothing else as a default executor; the
    scheduling is its own.)
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "teamster-tool") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.max_workers = max_workers
        self.prefix = thread_name_prefix
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...],
                                            dict[str, Any]] | None] = queue.SimpleQueue()
        self._pool_threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:  # type: ignore[override]
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._work.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._pool_threads) < self.max_workers:
                name = f"{self.prefix}-{len(self._pool_threads)}"
                thread = threading.Thread(target=self._serve, name=name, daemon=True)
                self._pool_threads.append(thread)
                thread.start()
            else:
                self._idle -= 1 if self._idle else 0
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                    future.set_exception(exc)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._pool_threads)
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join(timeout=1.0)


class Admission:
    """How many steps one worker process runs at once: as many as its event loop keeps up with.

    All the steps of a process share one event loop and one GIL. Past what those serve, more steps in flight only
    take turns: each is claimed, its deadline runs, its objects stay alive for the garbage collector to scan again,
    and every step in the process gets slower and costs more CPU. So a step's thread takes a slot before it claims
    its step (:meth:`slot`). Below ``limit`` steps it goes on at once; at the limit it waits, its step still queued
    in the run store (no lease, no deadline running), until a step of the process ends.

    The limit follows the loop's lag, which the loop measures every ``TICK`` seconds (how late a timer fires,
    averaged): above ``max_lag`` it shrinks by ``STEP`` of the steps in flight (never below ``floor``); below half of
    it, it grows by ``STEP`` (and one) while steps wait for a slot, up to ``ceiling`` (the worker's concurrency). It
    starts at four times the floor, so that a worker starting on a backlog does not claim hundreds of steps before it
    has measured anything; from there it reaches 500 in about five seconds on an idle loop. ``max_lag`` 0 turns it
    off: the limit is the ceiling.

    Args:
        ceiling: The most steps at once (the worker's concurrency).
        max_lag: Loop lag, in seconds, above which the process takes fewer steps.
        floor: The fewest steps the limit allows.
    """

    TICK = 0.1
    STEP = 0.05

    def __init__(self, ceiling: int, max_lag: float, floor: int = 8) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(self.ceiling, floor))
        self.max_lag = max_lag
        self.limit = float(min(self.ceiling, 4 * self.floor) if max_lag > 0 else self.ceiling)
        self.in_flight = 0
        self.waiting = 0
        self.lag = 0.0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self) -> Iterator[float]:
        """Hold one of the process's step slots while the block runs; yields the seconds it waited for it."""
        started = time.monotonic()
        with self._cond:
            if self.in_flight >= int(self.limit):
                self.waiting += 1
                try:  # a step always runs when none is in flight; the timeout only covers a lost notify
                    while self.in_flight >= int(self.limit) and self.in_flight > 0:
                        self._cond.wait(self.TICK * 5)
                finally:
                    self.waiting -= 1
            self.in_flight += 1
        waited = time.monotonic() - started
        try:
            yield waited
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify()

    def observe(self, lag: float) -> None:
        """Take one lag measurement of the loop (every ``TICK``) and adapt the limit to it."""
        with self._cond:
            self.lag = 0.7 * self.lag + 0.3 * max(0.0, lag)
            if self.max_lag <= 0:
                return
            if self.lag > self.max_lag:
                self.limit = max(float(self.floor), min(self.limit, float(self.in_flight)) * (1 - self.STEP))
            elif self.lag < self.max_lag / 2 and self.waiting and self.limit < self.ceiling:
                before = int(self.limit)
                self.limit = min(float(self.ceiling), self.limit * (1 + self.STEP) + 1)
                self._cond.notify(int(self.limit) - before)


class AgentLoop:
    """An event loop running in a daemon thread.

    Args:
        tool_threads: Size of the loop's default executor (synchronous tools, Bedrock's streaming calls).
        name: Thread name.
        admission: How many steps the process runs at once (default: no limit but the worker's threads).
    """

    _shared: AgentLoop | None = None
    _lock = threading.Lock()

    def __init__(self, tool_threads: int = 64, name: str = "teamster-agents",
                 admission: Admission | None = None) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.executor = DaemonExecutor(tool_threads, thread_name_prefix=f"{name}-tool")
        self.loop.set_default_executor(self.executor)
        self.admission = admission or Admission(ceiling=1 << 30, max_lag=0.0)
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    @classmethod
    def shared(cls) -> AgentLoop:
        """The process's loop (created on first use, and again in a forked child), its executor sized by
        ``TEAMSTER_TOOL_THREADS``."""
        with cls._lock:
            if cls._shared is None or cls._shared.pid != os.getpid() or not cls._shared.thread.is_alive():
                from teamster.config.settings import get_settings  # noqa: PLC0415

                settings = get_settings()
                cls._shared = AgentLoop(settings.tool_threads, admission=Admission(
                    ceiling=settings.worker_concurrency, max_lag=settings.worker_max_loop_lag))
                atexit.register(cls._shared.close_clients)
            return cls._shared

    @classmethod
    def owns_running_loop(cls) -> bool:
        """Whether the running event loop is this process's agent loop (teamster closes what it shares there)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        shared = cls._shared
        return shared is not None and shared.loop is running and shared.pid == os.getpid()

    def close_clients(self, timeout: float = 5.0) -> None:
        """Close the provider clients shared on this loop and their connection pools (registered at exit, so
        pooled connections are closed, not dropped with an "unclosed" warning). Waits at most ``timeout``."""
        if self.pid != os.getpid() or not self.thread.is_alive() or self.loop.is_closed():
            return  # a forked child, or the loop is gone: nothing of this process to close
        if threading.current_thread() is self.thread:
            return  # called on the loop itself: waiting here would block it
        from teamster.agents.providers import aclose_shared_clients  # noqa: PLC0415 - providers imports this module

        try:
            self.submit(aclose_shared_clients()).result(timeout)
        except Exception as exc:  # noqa: BLE001 - at exit: a client that does not close is only logged
            log.debug("shared provider clients did not close: %s", exc)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self._lag_watch = self.loop.create_task(self._watch_lag())  # held: the loop keeps only weak references
        self.loop.run_forever()

    async def _watch_lag(self) -> None:
        """How late a timer fires on this loop, every ``Admission.TICK``: how far behind the loop (and the GIL it
        shares with the step threads) is. It sets the process's admission limit."""
        from teamster.orchestrator import metrics  # noqa: PLC0415 - the orchestrator imports this module

        tick = Admission.TICK
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            self.admission.observe(time.monotonic() - before - tick)
            metrics.LOOP_LAG.set(self.admission.lag)
            metrics.ADMISSION_LIMIT.set(int(self.admission.limit))

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)
