"""Example: a web API that starts ticket-triage runs and streams their progress live, as server-sent events.

    POST /runs                     a ticket (JSON)  ->  202 {"run_id": "run_..."}
    GET  /runs/{run_id}            the run's status, its typed error or its output
    GET  /runs/{run_id}/events     text/event-stream: the run's journal, live, until the run settles

Run it next to a worker (FastAPI and uvicorn come with ``pip install 'teamster[web]'``); on one machine without
``TEAMSTER_REDIS_URL`` both use the embedded development Redis::

    TEAMSTER_MODEL=scripted TEAMSTER_WORKFLOW_MODULES=teamster.examples.triage teamster worker &
    uvicorn teamster.examples.progress_api:app

    curl -s localhost:8000/runs -H 'content-type: application/json' \\
         -d '{"ticket_id": "T-1", "customer": "Ada", "subject": "Order", "body": "Where is order A1001?"}'
    curl -N localhost:8000/runs/RUN_ID/events

Each journal event is one SSE message: ``id:`` its stream id, ``event:`` its type (``step_start``, ``model_call``,
``commit``, ...), ``data:`` the event as JSON (``id``, ``type``, ``ts``, ``step``, ``attempt``, ``data``; payloads
redacted as journaled). A client that reconnects sends the last id it received as ``Last-Event-ID`` (a browser's
``EventSource`` does so by itself) and the stream resumes right after that event: no duplicate, no gap. When the
run settles (succeeded, failed, cancelled, or waiting for an operator) the stream sends ``event: end`` with the
run's status and closes; a browser should close its ``EventSource`` on it (else it reconnects and gets the ``end``
again). While nothing happens, a comment line every 15 s keeps proxies from closing the connection.

The app uses :class:`teamster.AsyncClient`: status reads and event streams run on ``redis.asyncio`` (each open
stream holds one pooled Redis connection while it waits: size ``TEAMSTER_REDIS_MAX_CONNECTIONS`` to the streams you
serve), submits run in a worker thread; the event loop never blocks on Redis or Celery.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from teamster.errors import TeamsterError
from teamster.examples.triage import Ticket, triage
from teamster.orchestrator.aclient import AsyncClient
from teamster.orchestrator.models import JournalEvent
from teamster.orchestrator.progress import check_event_id

__all__ = ["app", "lifespan", "sse_message", "KEEPALIVE_SECONDS"]

KEEPALIVE_SECONDS = 15.0
"""A comment line goes out after this long without an event (proxies close idle connections)."""

_HTTP_STATUS = {"invalid_input": 422, "payload_rejected": 413, "idempotency_conflict": 409, "run_not_found": 404,
                "store_data_lost": 404, "store_unavailable": 503, "unknown_workflow": 500}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One :class:`AsyncClient` for the application's event loop, closed at shutdown."""
    async with AsyncClient() as client:
        app.state.teamster = client
        yield


app = FastAPI(title="teamster live progress example", lifespan=lifespan)


def _client(request: Request) -> AsyncClient:
    client: AsyncClient = request.app.state.teamster
    return client


@app.exception_handler(TeamsterError)
async def _teamster_error(_request: Request, exc: TeamsterError) -> JSONResponse:
    """A typed teamster error as JSON with a fitting HTTP status (its ``code`` is stable)."""
    return JSONResponse({"error": exc.code, "message": exc.message, "hint": exc.hint},
                        status_code=_HTTP_STATUS.get(exc.code, 500))


@app.post("/runs", status_code=202)
async def start_run(ticket: Ticket, request: Request) -> dict[str, str]:
    """Start a triage run for the ticket (the ticket id is the idempotency key: posting it twice starts one run)."""
    run_id = await _client(request).submit(triage, ticket.model_dump(), idempotency_key=ticket.ticket_id)
    return {"run_id": run_id}


@app.get("/runs/{run_id}")
async def run_status(run_id: str, request: Request) -> dict[str, Any]:
    """The run's status, with its typed error (and dead-letter entry) or its output."""
    run = await _client(request).status(run_id)
    return {"run_id": run.run_id, "workflow": run.workflow, "status": run.status.value, "error": run.error,
            "output": run.output, "created_at": run.created_at, "finished_at": run.finished_at}


def sse_message(event: JournalEvent) -> str:
    """One journal event as a server-sent event (``id``, ``event``, ``data`` on one line of JSON)."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


@app.get("/runs/{run_id}/events")
async def run_events(run_id: str, request: Request,
                     last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """The run's journal as server-sent events, live, resuming after ``Last-Event-ID``; ends when the run
    settles (with ``event: end``)."""
    client = _client(request)
    after = check_event_id((last_event_id or "").strip() or None, "Last-Event-ID")  # none: from the first event
    await client.status(run_id)  # 404 before the stream starts
    return StreamingResponse(_stream(client, run_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(client: AsyncClient, run_id: str, after: str) -> AsyncIterator[str]:
    events = client.events(run_id, after=after)
    pending: asyncio.Future[JournalEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield ": keep-alive\n\n"  # the same read goes on waiting
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            pending = None
            yield sse_message(event)
        run = await client.status(run_id)
        yield f"event: end\ndata: {json.dumps({'run_id': run_id, 'status': run.status.value})}\n\n"
    finally:  # the stream ended, or the client went away: stop the read, close the follow
        if pending is not None and not pending.done():
            pending.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await events.aclose()
