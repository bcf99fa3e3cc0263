"""Live progress for applications: ``Client.events``, ``AsyncClient``, ``teamster runs watch`` and the FastAPI
server-sent-events example, against the session's real Redis and real worker processes.

The example triage workflow runs on the scripted model with a little latency per model call, so runs are still
going while they are followed: ``T-1001`` succeeds, ``T-1006`` (an unknown order) is escalated as cannot-complete,
``T-1008`` (an $850 refund) waits for a human. Runs of the ``idle`` client are sent to a queue no worker consumes:
they stay running until the test acts on them. Every check compares what was followed with the run's journal, read
once the run has settled (nothing writes to it then).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from teamster.config.embedded import free_port
from teamster.config.settings import load_settings
from teamster.errors import InvalidInput, RunFailed, RunNotFound, RunTimeout
from teamster.examples.triage import SAMPLE_TICKETS, TriageResult
from teamster.orchestrator.aclient import AsyncClient
from teamster.orchestrator.cli import app
from teamster.orchestrator.cli._common import console, err_console
from teamster.orchestrator.client import Client
from teamster.orchestrator.models import JournalEvent, RunStatus
from tests.harness import Worker, child_env, ctrl_c_works, wait_settled, wait_until

pytestmark = pytest.mark.integration

MODULES = "teamster.examples.triage"
ENDS = {"T-1001": ("succeeded", "run_succeeded"), "T-1006": ("escalated", "dead_lettered"),
        "T-1008": ("needs_human", "dead_lettered")}
"""Sample ticket -> how its run settles and the journal event that settles it."""


IDLE = "idle-"
"""Ticket id prefix of the idle client's runs (cancelled at the end if still running)."""


def ticket(sample: str, tag: str = "") -> dict[str, str]:
    """A sample ticket under a new id (the scripted model routes by its text)."""
    base = next(t for t in SAMPLE_TICKETS if t["ticket_id"] == sample)
    return {**base, "ticket_id": f"{tag}{sample}-{uuid.uuid4().hex[:8]}"}


def ids(events: list[JournalEvent]) -> list[str]:
    return [event.id for event in events]


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=[MODULES]))


@pytest.fixture(scope="module")
def idle(client: Client) -> Iterator[Client]:
    """A client whose step messages go to a queue no worker consumes: its runs stay running."""
    idle = Client(load_settings(workflow_modules=[MODULES], steps_queue="nobody-listens"), redis_url=client.redis_url)
    yield idle
    for run in idle.runs(limit=1000, status=["running", "pending"], workflow="ticket_triage"):
        if str(run.input.get("ticket_id", "")).startswith(IDLE):
            idle.cancel(run.run_id, reason="test cleanup")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("progress", concurrency=4, env={"workflow_modules": MODULES, "scripted_latency": 0.05}) as w:
        yield w


# --------------------------------------------------------------------------- Client.events


@pytest.mark.parametrize("sample", sorted(ENDS))
def test_events_follow_a_live_run_in_order_to_the_event_that_settled_it(
        client: Client, worker: Worker, sample: str) -> None:
    status, last = ENDS[sample]
    run_id = client.submit("ticket_triage", ticket(sample))
    events = list(client.events(run_id, timeout=120))
    run = client.status(run_id)
    assert run.status.value == status
    assert events[0].type == "run_created" and events[-1].type == last
    journal = client.journal(run_id)
    assert ids(events) == ids(journal)  # in order, none missing, none twice
    assert [e.model_dump() for e in events] == [e.model_dump() for e in journal]  # decoded like the journal
    assert {"step_start", "model_call", "outcome"} <= {e.type for e in events}


def test_resuming_after_an_event_id_yields_exactly_the_rest(client: Client, worker: Worker) -> None:
    run_id = client.submit("ticket_triage", ticket("T-1001"))
    live = client.events(run_id, timeout=120)
    first = [next(live) for _ in range(3)]
    live.close()  # the application stops listening (a dropped connection, a restart)
    rest = list(client.events(run_id, after=first[-1].id, timeout=120))
    journal = client.journal(run_id)
    assert ids(first + rest) == ids(journal) and rest[-1].type == "run_succeeded"
    for k in (0, len(journal) // 2, len(journal) - 2):  # of a finished run, from anywhere
        assert ids(list(client.events(run_id, after=journal[k].id))) == ids(journal[k + 1:])
    assert list(client.events(run_id, after=journal[-1].id)) == []  # settled, nothing after the last event
    assert ids(list(client.events(run_id, after=None))) == ids(journal)


def test_events_of_a_finished_run_filters_and_timeouts(client: Client, worker: Worker) -> None:
    run = wait_settled(client, client.submit("ticket_triage", ticket("T-1006")))
    assert run.status == RunStatus.ESCALATED
    journal = client.journal(run.run_id)
    assert ids(list(client.events(run.run_id))) == ids(journal)  # already settled: what is written, then stops
    calls = list(client.events(run.run_id, types=["model_call", "dead_lettered"]))
    assert ids(calls) == ids(client.journal(run.run_id, types=["model_call", "dead_lettered"]))
    # escalated is not final: until="final" waits for an operator, so the timeout ends it, saying where to resume
    seen: list[JournalEvent] = []
    with pytest.raises(RunTimeout) as timeout:
        for event in client.events(run.run_id, until="final", timeout=0.5):
            seen.append(event)
    assert ids(seen) == ids(journal)
    assert timeout.value.details["last_event_id"] == journal[-1].id and "escalated" in timeout.value.message
    with pytest.raises(RunTimeout):
        list(client.events(run.run_id, until=None, timeout=0.2))


def test_until_final_follows_a_run_through_an_operators_resolution(client: Client, worker: Worker) -> None:
    run = wait_settled(client, client.submit("ticket_triage", ticket("T-1008")))
    assert run.status == RunStatus.NEEDS_HUMAN
    before = len(client.journal(run.run_id))
    followed: list[JournalEvent] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            for event in client.events(run.run_id, until="final", timeout=120):
                followed.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_until(lambda: len(followed) >= before or errors, message="the follower did not read the journal")
    client.dlq.resolve(run.error["dlq_entry"], {"approved": True, "issues": []}, by="test", reason="refund ok")
    thread.join(timeout=120)
    assert not thread.is_alive() and not errors, errors
    assert client.status(run.run_id).status == RunStatus.SUCCEEDED
    assert followed[-1].type == "run_succeeded" and "dlq_resolve" in {e.type for e in followed[before:]}
    assert ids(followed) == ids(client.journal(run.run_id))


def test_unknown_runs_and_bad_arguments_are_typed_errors(client: Client) -> None:
    client.runtime.store.ensure_epoch()  # this Redis holds teamster data: a missing run is just missing
    with pytest.raises(RunNotFound):
        client.events("run_does_not_exist")
    run_id = client.submit("ticket_triage", ticket("T-1001"))
    for bad in ("yesterday", "12-ab", "-1", ""):
        with pytest.raises(InvalidInput):
            client.events(run_id, after=bad)
    with pytest.raises(InvalidInput):
        client.events(run_id, until="eventually")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        client.events(run_id, timeout=-1)


# --------------------------------------------------------------------------- AsyncClient


def test_async_client_submits_follows_and_waits_from_asyncio(client: Client, idle: Client, worker: Worker) -> None:
    async def main() -> None:
        async with AsyncClient(load_settings(workflow_modules=[MODULES])) as aclient:
            run_id = await aclient.submit("ticket_triage", ticket("T-1001"))
            assert (await aclient.status(run_id)).workflow == "ticket_triage"
            events = [event async for event in aclient.events(run_id, timeout=120)]
            assert events[0].type == "run_created" and events[-1].type == "run_succeeded"
            assert ids(events) == ids(client.journal(run_id))
            resumed = [e async for e in aclient.events(run_id, after=events[2].id, types=["commit", "run_succeeded"])]
            assert ids(resumed) == ids([e for e in events[3:] if e.type in ("commit", "run_succeeded")])
            output = await aclient.result(run_id)
            assert isinstance(output, TriageResult) and output.approved and output.category == "order"

            escalated = await aclient.submit("ticket_triage", ticket("T-1006"))
            with pytest.raises(RunFailed) as failed:
                await aclient.result(escalated, timeout=120)  # waits on the journal for the run to settle
            assert failed.value.status == "escalated" and failed.value.reason["error_type"] == "cannot_complete"
            assert failed.value.reason["dlq_entry"]

            with pytest.raises(InvalidInput):
                await aclient.submit("ticket_triage", {"ticket_id": "T-x"})
            with pytest.raises(RunNotFound):
                await aclient.status("run_does_not_exist")
            with pytest.raises(RunNotFound):
                await aclient.result("run_does_not_exist")
            with pytest.raises(RunNotFound):
                [e async for e in aclient.events("run_does_not_exist")]
            with pytest.raises(InvalidInput):
                aclient.events(run_id, after="not-an-id")

    asyncio.run(main())


def test_async_events_wait_on_redis_while_other_tasks_run(idle: Client) -> None:
    """An iterator waiting for the next event of a run that is not moving lets the loop serve the task that
    cancels the run; then it yields the cancellation and ends. ``result`` of a run not moving times out."""
    run_id = idle.submit("ticket_triage", ticket("T-1001", IDLE))

    async def main() -> None:
        async with AsyncClient(load_settings(workflow_modules=[MODULES])) as aclient:
            with pytest.raises(RunTimeout):
                await aclient.result(run_id, timeout=0.3)
            received: list[JournalEvent] = []

            async def follow() -> None:
                async for event in aclient.events(run_id, timeout=120):
                    received.append(event)

            follower = asyncio.create_task(follow())
            while len(received) < len(idle.journal(run_id)):  # it has read what is written: it waits in Redis
                await asyncio.sleep(0.02)
            cancelled = await aclient.cancel(run_id, reason="customer withdrew", by="test")
            assert cancelled.status == RunStatus.CANCELLED
            await asyncio.wait_for(follower, timeout=60)
            assert received[-1].type == "run_cancelled"
            with pytest.raises(RunFailed) as failed:
                await aclient.result(run_id)
            assert failed.value.status == "cancelled"

    asyncio.run(main())
    assert ids(list(idle.events(run_id))) == ids(idle.journal(run_id))


# --------------------------------------------------------------------------- teamster runs watch


@pytest.fixture()
def _live_console_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consoles follow $COLUMNS (another test module may have fixed their width)."""
    monkeypatch.setattr(console, "_width", None)
    monkeypatch.setattr(err_console, "_width", None)


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "80", "TEAMSTER_WORKFLOW_MODULES": MODULES})


@pytest.mark.usefixtures("_live_console_width")
def test_runs_watch_prints_events_live_then_the_outcome(client: Client, worker: Worker) -> None:
    run_id = client.submit("ticket_triage", ticket("T-1001"))
    result = cli("runs", "watch", run_id)
    assert result.exit_code == 0, result.output
    journal = client.journal(run_id)
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 and line == line.rstrip() for line in lines), result.stdout  # 80 columns, piped
    typed = [line.split()[1] for line in lines if line[:2].isdigit() and line[2] == ":"]
    assert typed == [event.type for event in journal]  # one line per event, in order
    assert any("classify #1: call 1" in line for line in lines)  # the step, its attempt and a summary
    assert f"run {run_id} succeeded" in result.stdout and '"approved": true' in result.stdout

    escalated = client.submit("ticket_triage", ticket("T-1006"))
    result = cli("runs", "watch", escalated)
    assert result.exit_code == 1, result.output
    assert f"run {escalated} is escalated: cannot_complete" in result.stdout
    assert "dead-letter entry" in result.stdout and "teamster dlq show" in result.stdout


@pytest.mark.usefixtures("_live_console_width")
def test_runs_watch_json_and_after(client: Client, worker: Worker) -> None:
    run_id = client.submit("ticket_triage", ticket("T-1008"))
    result = cli("runs", "watch", run_id, "--json")
    assert result.exit_code == 1, result.output  # it waits for a human: not succeeded
    printed = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but one object per line
    journal = client.journal(run_id)
    assert [e["id"] for e in printed] == ids(journal) and printed[-1]["type"] == "dead_lettered"
    assert set(printed[0]) == {"id", "type", "ts", "step", "attempt", "data"}
    rest = cli("runs", "watch", run_id, "--json", "--after", journal[4].id)
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == ids(journal[5:])
    bad = cli("runs", "watch", run_id, "--after", "latest")
    assert bad.exit_code == 1 and "error invalid_input: after='latest' is not a journal event id" in bad.stderr
    missing = cli("runs", "watch", "run_does_not_exist")
    assert missing.exit_code == 1 and "error run_not_found" in missing.stderr


def test_runs_watch_stops_on_ctrl_c_and_the_run_goes_on(idle: Client, tmp_path: Path) -> None:
    run_id = idle.submit("ticket_triage", ticket("T-1001", IDLE))
    out = tmp_path / "watch.out"
    env = child_env(workflow_modules=MODULES)
    with out.open("w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "teamster.orchestrator.cli", "runs", "watch", run_id],
                                stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=ctrl_c_works)
        try:
            wait_until(lambda: "step_queued" in out.read_text() or proc.poll() is not None, timeout=60,
                       message="runs watch printed nothing")
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr
    assert f"stopped watching; run {run_id} goes on" in stderr and "Traceback" not in stderr
    assert "run_created" in out.read_text()
    assert idle.status(run_id).status == RunStatus.RUNNING


# --------------------------------------------------------------------------- the FastAPI example over HTTP


def sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events from response lines: ``{"id", "event", "data"}`` per message (comments skipped)."""
    message: dict[str, str] = {}
    for line in lines:
        if not line:
            if message:
                yield message
            message = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        message[name] = f"{message[name]}\n{value}" if name == "data" and name in message else value


def stream(url: str, last_event_id: str | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """Messages of one SSE connection: all of them until the server ends the stream, or the first ``limit``
    (then the connection is closed, as a client going away does)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[dict[str, str]] = []
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=120)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in sse(response.iter_lines()):
            out.append(message)
            if limit is not None and len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def api(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``uvicorn teamster.examples.progress_api:app`` on a free port, as its docstring says to run it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("api") / "uvicorn.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "teamster.examples.progress_api:app",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=child_env())

        def up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(up, timeout=60, message="uvicorn did not start")
            assert proc.poll() is None, log.read_text()
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_fastapi_example_streams_a_run_as_server_sent_events(api: str, client: Client) -> None:
    posted = httpx.post(f"{api}/runs", json=ticket("T-1001"), timeout=30)
    assert posted.status_code == 202, posted.text
    run_id = posted.json()["run_id"]
    messages = stream(f"{api}/runs/{run_id}/events")  # from the first event, live, until the run settles
    *events, end = messages
    assert end["event"] == "end" and json.loads(end["data"]) == {"run_id": run_id, "status": "succeeded"}
    journal = client.journal(run_id)
    assert [m["id"] for m in events] == ids(journal)
    assert [m["event"] for m in events] == [e.type for e in journal]
    assert [JournalEvent.model_validate_json(m["data"]) for m in events] == journal
    status = httpx.get(f"{api}/runs/{run_id}", timeout=30).json()
    assert status["status"] == "succeeded" and status["output"]["approved"] is True
    # a reconnect with Last-Event-ID resumes right after that event
    resumed = stream(f"{api}/runs/{run_id}/events", last_event_id=journal[3].id)
    assert [m.get("id") for m in resumed[:-1]] == ids(journal[4:]) and resumed[-1]["event"] == "end"


def test_fastapi_example_resumes_a_live_stream_and_refuses_bad_requests(api: str, client: Client) -> None:
    posted = httpx.post(f"{api}/runs", json=ticket("T-1006"), timeout=30)
    run_id = posted.json()["run_id"]
    first = stream(f"{api}/runs/{run_id}/events", limit=2)  # the client goes away after two events
    rest = stream(f"{api}/runs/{run_id}/events", last_event_id=first[-1]["id"])
    assert rest[-1] == {"event": "end", "data": json.dumps({"run_id": run_id, "status": "escalated"})}
    assert [m["id"] for m in first + rest[:-1]] == ids(client.journal(run_id))
    again = httpx.post(f"{api}/runs", json=client.status(run_id).input, timeout=30)
    assert again.json()["run_id"] == run_id  # the ticket id is the idempotency key
    assert httpx.get(f"{api}/runs/run_does_not_exist", timeout=30).status_code == 404
    assert httpx.get(f"{api}/runs/run_does_not_exist/events", timeout=30).status_code == 404
    bad = httpx.get(f"{api}/runs/{run_id}/events", headers={"Last-Event-ID": "latest"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_input"
    assert httpx.post(f"{api}/runs", json={"ticket_id": "T-1"}, timeout=30).status_code == 422


def test_example_module_imports_without_starting_anything() -> None:
    """Importing the example builds the app; its client is made at start-up (lifespan), not at import."""
    code = ("import json, teamster.examples.progress_api as m; "
            "print(json.dumps({'routes': sorted(r.path for r in m.app.routes if r.path.startswith('/runs'))}))")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["routes"] == ["/runs", "/runs/{run_id}", "/runs/{run_id}/events"]
