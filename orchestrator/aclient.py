"""The client API for asyncio applications (FastAPI, Starlette, aiohttp): submit, status, result, events, cancel.

Example:
    >>> async with AsyncClient() as client:
    ...     run_id = await client.submit("ticket_triage", ticket, idempotency_key=ticket["ticket_id"])
    ...     async for event in client.events(run_id):  # live, until the run settles
    ...         print(event.type, event.step)
    ...     print(await client.result(run_id))

The event loop never waits on Redis or Celery:

* Reads (``status``, ``result``, ``events``) use ``redis.asyncio`` on the client's own ``BlockingConnectionPool``
  (as many connections as a worker process: ``TEAMSTER_REDIS_MAX_CONNECTIONS``; when all are busy a command waits
  up to ``TEAMSTER_REDIS_POOL_TIMEOUT`` for one). A waiting ``events`` iterator -- a server-sent-events stream, say --
  holds one connection while it waits for the next event, so size the pool to the streams you serve at once.
* ``submit`` and ``cancel`` run the synchronous :class:`~teamster.orchestrator.client.Client` in a worker thread
  (``asyncio.to_thread``): the input validation, the create-run transaction and the Celery (kombu) send of the
  first steps are synchronous code.

Errors and validation are the synchronous client's (:mod:`teamster.errors`): ``InvalidInput``, ``RunNotFound``,
``RunFailed``, ``RunTimeout``, ``StoreUnavailable``, ... Create one ``AsyncClient`` per event loop -- at application
start-up, e.g. in a FastAPI lifespan: constructing it imports ``TEAMSTER_WORKFLOW_MODULES`` -- and close it with
``await client.aclose()`` (or ``async with``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel

from teamster.agents.limits import RunBudget
from teamster.config.settings import TeamsterSettings
from teamster.errors import DeadLetterNotFound, RunNotFound, RunTimeout, StoreUnavailable, TeamsterError
from teamster.orchestrator.client import Client, settled_result
from teamster.orchestrator.connection import pool_options
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import JournalEvent, RunRecord
from teamster.orchestrator.progress import BATCH, Follower, Until
from teamster.orchestrator.store import decode_fields
from teamster.orchestrator.workflow import Workflow

__all__ = ["AsyncClient"]

A = TypeVar("A", bound=Callable[..., Awaitable[Any]])


def _store_errors(func: A) -> A:
    """Redis unreachable -> :class:`StoreUnavailable`; "not found" said with what Redis knows (as the sync
    client's ``_store_errors``)."""

    @functools.wraps(func)
    async def wrapper(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        try:
            return await func(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        except (RunNotFound, DeadLetterNotFound) as exc:
            raise await self._explain(exc) from None

    return wrapper  # type: ignore[return-value]


class AsyncClient:
    """A connection to one teamster deployment for asyncio code (see the module docstring).

    Args:
        settings: Settings (default: from the environment).
        redis_url: Override the Redis URL (default: settings, or the embedded development server).
        load_modules: Import ``TEAMSTER_WORKFLOW_MODULES`` now (default True).

    Attributes:
        sync: The synchronous :class:`Client` this one delegates writes to; its other calls (``dlq``,
            ``journal``, ``replay``, ...) block, so call them with ``asyncio.to_thread``.
    """

    def __init__(self, settings: TeamsterSettings | None = None, *, redis_url: str | None = None,
                 load_modules: bool = True) -> None:
        self.sync = Client(settings, redis_url=redis_url, load_modules=load_modules)
        self.settings = self.sync.settings
        self.redis_url = self.sync.redis_url
        self.keys = Keys(self.settings.key_prefix)
        self._redis: Any = None

    @property
    def redis(self) -> Any:
        """The ``redis.asyncio`` client (``decode_responses=True``), on this client's own pool (built on first use,
        bound to the running event loop)."""
        if self._redis is None:
            pool = aioredis.BlockingConnectionPool.from_url(self.redis_url, **pool_options(self.settings))
            self._redis = aioredis.Redis(connection_pool=pool)
        return self._redis

    async def _explain(self, error: TeamsterError) -> TeamsterError:
        """:meth:`Client.explain_missing` (in a thread): was the run never there, or did Redis lose it?"""
        try:
            return await asyncio.to_thread(self.sync.explain_missing, error)
        except redis.RedisError:
            return error

    async def _get_run(self, run_id: str) -> RunRecord:
        raw = await self.redis.hgetall(self.keys.run(run_id))
        if not raw:
            raise RunNotFound(f"no run {run_id!r}")
        return RunRecord.model_validate(decode_fields(raw))

    # ------------------------------------------------------------------ apps
    async def submit(self, workflow: Workflow | str, input: Any, *, idempotency_key: str | None = None,  # noqa: A002
                     budget: RunBudget | None = None) -> str:
        """Validate ``input`` and start a run; returns its id (the same id again for the same key).

        Runs :meth:`Client.submit` in a worker thread: validation, the create-run transaction and the Celery send
        of the first steps are synchronous.

        Raises:
            UnknownWorkflow: no such workflow.
            InvalidInput: the input does not match the workflow's input model (nothing was written).
            PayloadRejected: the input is too large or not JSON.
            IdempotencyConflict: the key was used before with another input.
            StoreUnavailable: Redis is down (nothing was written).
        """
        return await asyncio.to_thread(self.sync.submit, workflow, input, idempotency_key=idempotency_key,
                                       budget=budget)

    @_store_errors
    async def status(self, run_id: str) -> RunRecord:
        """The run record (status, error with its dead-letter entry, output when succeeded).

        Raises:
            RunNotFound: no such run.
        """
        return await self._get_run(run_id)

    @_store_errors
    async def result(self, run_id: str, timeout: float | None = 60.0) -> BaseModel:
        """Wait for the run's output (an instance of the workflow's output model), without polling: it waits on
        the run's journal (``XREAD BLOCK``) and reads the run's status when something is written.

        Raises:
            RunFailed: the run failed, was cancelled, or waits for an operator (escalated / needs_human);
                ``reason`` holds the dead-letter error.
            RunTimeout: still running after ``timeout`` seconds (the run goes on).
            RunNotFound: no such run.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self._get_run(run_id)
            output = settled_result(run)
            if output is not None:
                return output
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RunTimeout(f"run {run_id} is still {run.status.value} after {timeout}s", run_id=run_id)
            tail = await self.redis.xrevrange(self.keys.journal(run_id), count=1)
            # from the journal's end, until the run settles; yields (decodes) nothing but the last event
            follower = Follower(self.keys, run_id, after=tail[0][0] if tail else None, types=["run_succeeded"],
                                until="settled", timeout=remaining)
            try:
                async for _event in self._follow(follower, explain=False):
                    pass
            except RunTimeout:
                pass  # read the status once more, then say how the run is

    def events(self, run_id: str, *, after: str | None = None, types: list[str] | None = None,
               until: Until = "settled", timeout: float | None = None) -> AsyncGenerator[JournalEvent, None]:
        """Follow the run's journal live (an async iterator): every event already written, then each new one.

        The same as :meth:`Client.events` (``after``, ``types``, ``until``, ``timeout``), with ``XREAD BLOCK`` on
        ``redis.asyncio``: a waiting iterator holds one connection of the client's pool and no thread. Stopping
        early, close it (``await it.aclose()``) or let it be collected; cancelling a task that waits in it is safe.

        Raises:
            InvalidInput: ``after`` is not an event id, or ``until`` / ``timeout`` is invalid (raised by this call).
            RunNotFound: no such run (raised by the first step of the iteration).
            RunTimeout: ``timeout`` passed before the run settled (the run goes on; ``details["last_event_id"]``
                resumes it).
            StoreUnavailable: Redis cannot be reached.
        """
        return self._follow(Follower(self.keys, run_id, after=after, types=types, until=until, timeout=timeout))

    async def _follow(self, follower: Follower, *, explain: bool = True) -> AsyncGenerator[JournalEvent, None]:
        client = self.redis
        try:
            while True:
                async with client.pipeline(transaction=True) as pipe:
                    follower.snapshot(pipe)
                    replies = await pipe.execute()
                for event in follower.take_snapshot(replies):
                    yield event
                if follower.done:
                    return
                if follower.more:
                    continue
                streams, block_ms = follower.xread_args()
                for event in follower.take_block(await client.xread(streams, count=BATCH, block=block_ms)):
                    yield event
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        except RunNotFound as exc:
            if not explain:  # the caller's _store_errors explains it
                raise
            raise await self._explain(exc) from None

    async def cancel(self, run_id: str, *, reason: str = "cancelled by client", by: str = "client") -> RunRecord:
        """Cancel a run (:meth:`Client.cancel`, in a worker thread); steps not yet finished end as ``cancelled``.

        Raises:
            RunNotFound: no such run.
            InvalidOperation: the run is already final.
        """
        return await asyncio.to_thread(self.sync.cancel, run_id, reason=reason, by=by)

    # ------------------------------------------------------------------ lifecycle
    async def aclose(self) -> None:
        """Close this client's Redis connections (the synchronous client's process-wide pool stays)."""
        client, self._redis = self._redis, None
        if client is not None:
            await client.connection_pool.disconnect()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
