"""One long-lived event loop per process, on which every agent step runs.

strands' synchronous ``Agent.__call__`` starts a thread and a new event loop for every call; with hundreds of
steps in flight that is hundreds of loops, and no async client can be shared between them. Instead, each worker
process runs one event loop in a daemon thread: the step task (a Celery thread) hands the step's coroutine to it
and waits for the result. HTTP clients and their connection pools are bound to this loop and shared by every step
(see :mod:`teamster.agents.providers`).

Synchronous tools run in the loop's default executor (strands uses ``asyncio.to_thread``), sized with
``tool_threads``: a step that times out abandons a tool thread that cannot be cancelled, and its late result is
discarded.

The loop is created on first use in each process (a forked child gets its own).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["AgentLoop", "DaemonExecutor"]

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


class AgentLoop:
    """An event loop running in a daemon thread.

    Args:
        tool_threads: Size of the loop's default executor (synchronous tools, Bedrock's streaming calls).
        name: Thread name.
    """

    _shared: AgentLoop | None = None
    _lock = threading.Lock()

    def __init__(self, tool_threads: int = 64, name: str = "teamster-agents") -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.executor = DaemonExecutor(tool_threads, thread_name_prefix=f"{name}-tool")
        self.loop.set_default_executor(self.executor)
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

                cls._shared = AgentLoop(get_settings().tool_threads)
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
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)
