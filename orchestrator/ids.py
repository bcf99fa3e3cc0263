"""Random UUIDs for a multi-threaded worker: ``os.urandom`` drawn in blocks, so that making an id does not hand the GIL
to another thread.

``uuid.uuid4()`` is ``UUID(bytes=os.urandom(16), version=4)``, and CPython's ``os.urandom`` releases the GIL around
its ``getrandom`` system call. In a worker process with a pool of threads and an agent loop, each release lets another
thread take the GIL, and the thread that made the id then waits to get it back -- up to the interpreter's switch
interval (5 ms) when that thread has Python work to do. A step makes dozens of ids (kombu's delivery tags and Celery's
task ids, strands' ids of messages, cycles, traces and tools, teamster's transaction stamps), many of them on the
agent loop, which every step in the process waits for. Measured: with one other thread busy, a ``uuid.uuid4()``
took 0.4 ms of wall time instead of 2 us; on the provider benchmark (one worker, ``-c 500``, 1 s latency) buffered
ids cut the worker's CPU per step by about 13% and raised its throughput by about 18%.

:func:`uuid4` makes the same ids from the same source, the kernel's CSPRNG, read :data:`BLOCK` bytes at a time: one
GIL release per 256 ids. A process that forks (Celery's prefork pool) starts its child with an empty block, so two
processes never hand out the same bytes. :func:`install` makes it the process's ``uuid.uuid4`` (and kombu's, which
bound the original at import); the worker does so at start-up unless ``TEAMSTER_WORKER_BUFFERED_UUIDS`` is off. The
:mod:`secrets` module and ``os.urandom`` itself are untouched.
"""

from __future__ import annotations

import importlib
import os
import threading
import uuid
from collections.abc import Callable

__all__ = ["BLOCK", "uuid4", "install", "uninstall", "installed"]

BLOCK = 4096
"""Bytes read from ``os.urandom`` at once (256 ids)."""

_ORIGINAL: Callable[[], uuid.UUID] = uuid.uuid4


class _Block:
    """Random bytes from ``os.urandom``, handed out 16 at a time, never twice (thread-safe, reset after a fork)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()  # a new lock: another thread may have held the old one when the process forked
        self._data = b""
        self._used = 0

    def take16(self) -> bytes:
        with self._lock:
            used = self._used
            if used + 16 > len(self._data):
                self._data, used = os.urandom(self.size), 0
            self._used = used + 16
            return self._data[used:used + 16]


_BLOCK = _Block(BLOCK)
os.register_at_fork(after_in_child=_BLOCK.reset)


def uuid4() -> uuid.UUID:
    """A random (version 4) UUID, as ``uuid.uuid4()`` makes it, from bytes of ``os.urandom`` read in blocks."""
    return uuid.UUID(bytes=_BLOCK.take16(), version=4)


def _kombu_uuid() -> Callable[..., str] | None:
    try:  # the module (kombu.utils exports a function of the same name)
        module = importlib.import_module("kombu.utils.uuid")
    except ImportError:  # pragma: no cover - kombu comes with Celery
        return None
    return module.uuid  # type: ignore[no-any-return]


def install() -> None:
    """Make :func:`uuid4` this process's ``uuid.uuid4`` (and the one kombu and Celery make their ids with)."""
    uuid.uuid4 = uuid4
    kombu = _kombu_uuid()
    if kombu is not None and kombu.__defaults__ == (_ORIGINAL,):  # kombu.utils.uuid.uuid(_uuid=uuid4)
        kombu.__defaults__ = (uuid4,)


def uninstall() -> None:
    """Give the process back the standard library's ``uuid.uuid4``."""
    uuid.uuid4 = _ORIGINAL
    kombu = _kombu_uuid()
    if kombu is not None and kombu.__defaults__ == (uuid4,):
        kombu.__defaults__ = (_ORIGINAL,)


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return uuid.uuid4 is uuid4
