"""The ``teamster`` command line against the session's real Redis and real worker processes.

Most commands run in-process with typer's ``CliRunner``; ``demo``, ``worker``, ``flower`` and the
embedded-Redis ``--wait`` story run as real subprocesses, as a user would run them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner, Result

from teamster.config.embedded import free_port
from teamster.config.settings import load_settings
from teamster.examples.triage import SAMPLE_TICKETS
from teamster.orchestrator.cli import app
from teamster.orchestrator.cli._common import console, err_console
from teamster.orchestrator.cli.local import ping_workers
from teamster.orchestrator.client import Client
from tests.harness import Worker, ctrl_c_works

pytestmark = pytest.mark.integration

RESOLVE_OUTPUT = '{"approved": true, "issues": []}'
SKELETON = '{"approved": "<fill in: true or false>", "issues": ["<fill in: string>"]}'
"""What `dlq show` suggests for policy_review: refused until every placeholder is replaced."""
ENTRY_RE = r"run_[0-9a-f]+:{step}:\d+"


def _ticket(ticket_id: str) -> dict[str, str]:
    return dict(next(t for t in SAMPLE_TICKETS if t["ticket_id"] == ticket_id))


@pytest.fixture(autouse=True)
def _wide_console() -> Iterator[None]:
    """Wide consoles, so every column stays in the tables and commands stay on one line in assertions."""
    widths = console._width, err_console._width  # None: the width follows the terminal and $COLUMNS
    console.width = err_console.width = 220
    yield
    console._width, err_console._width = widths


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("cli", concurrency=4, env={"workflow_modules": "teamster.examples.triage"}) as w:
        yield w


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def assert_one_line_error(result: Result, code: str, *, notes: int = 0) -> None:
    """Exit code 1, no traceback, and stderr ends with exactly one error line and its hint (after ``notes``)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error ")]
    assert len(lines) == 2 + notes and len(errors) == 1 and lines[-2] == errors[0], result.stderr
    assert errors[0].startswith(f"error {code}: "), result.stderr
    assert lines[-1].startswith("hint: "), result.stderr


def submit_and_wait(ticket: dict[str, Any]) -> tuple[Result, str]:
    result = cli("submit", "ticket_triage", "--input", json.dumps(ticket), "--wait", "--timeout", "60")
    run_id = result.stdout.splitlines()[0].strip()
    assert run_id.startswith("run_"), result.output
    return result, run_id


# --------------------------------------------------------------------------- help and options


def test_help_version_and_flower_warning() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("demo", "doctor", "submit", "runs", "journal", "replay", "dlq", "worker", "watchdog", "flower"):
        assert command in result.output
    version = cli("--version")
    assert version.exit_code == 0 and version.output.startswith("teamster ")
    flower = cli("flower", "--help")
    assert flower.exit_code == 0
    text = " ".join(flower.output.split())
    assert "/metrics" in text and "unauthenticated" in text and "private" in text
    for args in (["runs", "--help"], ["dlq", "resolve", "--help"], ["demo", "--help"], ["worker", "--help"]):
        assert cli(*args).exit_code == 0, args


# --------------------------------------------------------------------------- runs


def test_submit_show_journal_replay(worker: Worker) -> None:
    result, run_id = submit_and_wait(_ticket("T-1001"))
    assert result.exit_code == 0, result.output
    assert f"run {run_id} succeeded" in result.output
    assert '"approved": true' in result.output

    listed = cli("runs", "list", "--status", "succeeded", "--workflow", "ticket_triage", "-n", "50")
    assert listed.exit_code == 0 and run_id in listed.output

    shown = cli("runs", "show", run_id)
    assert shown.exit_code == 0, shown.output
    for text in ("ticket_triage", "succeeded", "classify", "extract_order", "draft_reply", "policy_review",
                 "model calls", "tokens", "worker", "output:", '"ticket_id": "T-1001"'):
        assert text in shown.output, text

    journal = cli("journal", run_id)
    assert journal.exit_code == 0
    for event_type in ("run_created", "step_start", "model_call", "tool_call", "outcome", "commit", "run_succeeded"):
        assert event_type in journal.output, event_type
    raw = cli("journal", run_id, "--json", "--step", "classify", "--type", "model_call,outcome")
    events = [json.loads(line) for line in raw.stdout.splitlines()]
    assert events and {e["type"] for e in events} == {"model_call", "outcome"}
    assert {e["step"] for e in events} == {"classify"}

    replay = cli("replay", run_id)
    assert replay.exit_code == 0, replay.output
    assert "live model calls: 0" in replay.output and "identical" in replay.output


def test_retry_shows_in_the_step_timeline(worker: Worker) -> None:
    result, run_id = submit_and_wait(_ticket("T-1007"))
    assert result.exit_code == 0, result.output
    shown = cli("runs", "show", run_id)
    row = next(line for line in shown.output.splitlines() if "classify" in line)
    assert re.search(r"classify\s+agent\s+succeeded\s+2\s", row), row
    retry_events = cli("journal", run_id, "--type", "retry")
    assert "model_throttled" in retry_events.output


# --------------------------------------------------------------------------- dead-letter queue


def test_dlq_resolve_needs_human_then_run_succeeds(worker: Worker) -> None:
    result, run_id = submit_and_wait(_ticket("T-1008"))
    assert result.exit_code == 1, result.output
    assert f"run {run_id} is needs_human" in result.output
    entry_id = re.search(ENTRY_RE.format(step="policy_review"), result.output).group(0)  # type: ignore[union-attr]
    assert entry_id.startswith(run_id)
    assert f"teamster dlq resolve {entry_id} --output '{SKELETON}' --by you" in result.output

    listed = cli("dlq", "list", "--run", run_id)
    assert listed.exit_code == 0 and entry_id in listed.output and "needs_human" in listed.output
    assert entry_id in cli("dlq", "list", "-n", "200").output

    shown = cli("dlq", "show", entry_id)
    assert shown.exit_code == 0, shown.output
    for text in ("needs_human", "Refund of $850.00", "retryable", "attempts", "state version", "trace id",
                 "human_review()", "details:", "input:", '"refund_amount": 850.0', "journal excerpt",
                 "What you can do", f"teamster dlq resolve {entry_id} --output '{SKELETON}' --by you",
                 f"teamster dlq retry {entry_id}", f"teamster dlq discard {entry_id}"):
        assert text in shown.output, text

    bad = cli("dlq", "resolve", entry_id, "--output", '{"approved": "maybe"}', "--by", "tester")
    assert_one_line_error(bad, "invalid_input")
    assert "approved" in bad.stderr

    resolved = cli("dlq", "resolve", entry_id, "--output", RESOLVE_OUTPUT, "--by", "tester",
                   "--reason", "refund approved", "--wait")
    assert resolved.exit_code == 0, resolved.output
    assert f"run {run_id} succeeded" in resolved.output
    assert Client(load_settings()).status(run_id).status.value == "succeeded"

    closed = cli("dlq", "show", entry_id)
    assert "resolved" in closed.output and "tester" in closed.output
    assert entry_id in cli("dlq", "list", "--all", "--run", run_id).output
    again = cli("dlq", "resolve", entry_id, "--output", RESOLVE_OUTPUT, "--by", "tester")
    assert_one_line_error(again, "invalid_operation")


def test_dlq_retry_and_discard(worker: Worker) -> None:
    result, run_id = submit_and_wait(_ticket("T-1006"))
    assert result.exit_code == 1 and f"run {run_id} is escalated" in result.output
    assert "cannot_complete" in result.output
    first = re.search(ENTRY_RE.format(step="extract_order"), result.output).group(0)  # type: ignore[union-attr]

    retried = cli("dlq", "retry", first, "--by", "tester", "--reason", "order system was down", "--wait")
    assert retried.exit_code == 1, retried.output  # the same unknown order: escalated again, with a new entry
    assert f"entry {first} retried by tester" in retried.output
    second = re.search(ENTRY_RE.format(step="extract_order"), retried.output.split("is escalated", 1)[1])
    assert second is not None and second.group(0) != first

    missing_reason = cli("dlq", "discard", second.group(0), "--by", "tester")
    assert missing_reason.exit_code == 2  # usage error: --reason is required
    discarded = cli("dlq", "discard", second.group(0), "--by", "tester", "--reason", "customer withdrew")
    assert discarded.exit_code == 0, discarded.output
    assert "discarded by tester" in discarded.output and "failed" in discarded.output
    shown = cli("runs", "show", run_id)
    assert "failed" in shown.output and "discarded by tester: customer withdrew" in shown.output


# --------------------------------------------------------------------------- doctor and processes


def test_doctor_ok_against_the_test_redis(worker: Worker) -> None:
    result = cli("doctor", "--settings")
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s*Redis\s+OK\s", result.output, re.M)
    assert re.search(r"^\s*workers\s+OK\s+\d+ alive", result.output, re.M)
    assert "TEAMSTER_KEY_PREFIX" in result.output and "all checks passed" in result.output


def test_doctor_fails_when_redis_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMSTER_REDIS_URL", "redis://127.0.0.1:1/0")
    result = cli("doctor")
    assert result.exit_code == 1
    assert re.search(r"^\s*Redis\s+FAIL\s+cannot reach redis://127.0.0.1:1/0", result.output, re.M)
    assert "Traceback" not in result.output


def test_watchdog_once(worker: Worker) -> None:
    result = cli("watchdog", "--once")
    assert result.exit_code == 0, result.output
    assert "watchdog:" in result.output


# --------------------------------------------------------------------------- error paths


@pytest.mark.parametrize("args", [
    ["runs", "list"],
    ["runs", "show", "run_x"],
    ["submit", "ticket_triage", "--input", json.dumps(SAMPLE_TICKETS[0])],
    ["dlq", "list"],
    ["journal", "run_x"],
])
def test_redis_down_is_one_line(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setenv("TEAMSTER_REDIS_URL", "redis://127.0.0.1:1/0")
    result = cli(*args)
    assert_one_line_error(result, "store_unavailable")


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["runs", "show", "run_nope"], "run_not_found", "run_nope"),
    (["journal", "run_nope"], "run_not_found", "run_nope"),
    (["replay", "run_nope"], "run_not_found", "run_nope"),
    (["dlq", "show", "nope:step:1"], "dead_letter_not_found", "nope:step:1"),
    (["dlq", "discard", "nope:step:1", "--by", "t", "--reason", "x"], "dead_letter_not_found", "nope:step:1"),
    (["submit", "ticket_triage", "--input", "{bad json"], "invalid_input", "--input is not valid JSON"),
    (["submit", "ticket_triage", "--input", "@/nonexistent/ticket.json"], "invalid_input", "cannot read --input"),
    (["submit", "ticket_triage", "--input", '{"ticket_id": "T-1"}'], "invalid_input", "customer: Field required"),
    (["submit", "no_such_workflow", "--input", "{}"], "unknown_workflow", "no_such_workflow"),
    (["dlq", "retry", "x:y:1", "--by", "t", "--state-patch", "[1"], "invalid_input", "--state-patch is not valid"),
    (["dlq", "resolve", "x:y:1", "--by", "t", "--output", "[1, 2]"], "invalid_input", "must be a JSON object"),
])
def test_error_paths_are_one_line(args: list[str], code: str, needle: str) -> None:
    result = cli(*args)
    assert_one_line_error(result, code)
    assert needle in result.stderr


def test_usage_errors_exit_2() -> None:
    result = cli("runs", "list", "--status", "bogus")
    assert result.exit_code == 2 and "unknown status 'bogus'" in result.output


def test_error_text_is_not_read_as_markup() -> None:
    result = cli("submit", "[bold]wf", "--input", "{}")
    assert_one_line_error(result, "unknown_workflow")
    assert "'[bold]wf'" in result.stderr


def test_invalid_input_hint_names_the_fields() -> None:
    result = cli("submit", "ticket_triage", "--input", '{"ticket_id": "T-1"}')
    assert "body: Field required" in result.stderr
    assert "ticket_id, customer, subject, body" in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = cli("--debug", "runs", "show", "run_nope")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "error run_not_found" in result.stderr


def test_invalid_settings_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMSTER_LEASE_SECONDS", "-1")
    result = cli("runs", "list")
    assert_one_line_error(result, "invalid_settings")
    assert "TEAMSTER_LEASE_SECONDS" in result.stderr


# --------------------------------------------------------------------------- real subprocesses


def _python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "teamster.orchestrator.cli", *args]


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def test_worker_command_runs_a_celery_worker(tmp_path: Path) -> None:
    name = f"cliworker-{uuid.uuid4().hex[:6]}"
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "TEAMSTER_WORKFLOW_MODULES": "teamster.examples.triage", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_python_cli("worker", "-c", "2", "-n", f"{name}@%h"), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while " ready." not in (tmp_path / "worker.log").read_text(errors="replace"):
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.1)
        settings = load_settings()
        assert any(n.startswith(name) for n in ping_workers(settings, os.environ["TEAMSTER_REDIS_URL"]))
    finally:
        code = _stop(proc)
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert code == 0, text
    assert "teamster.steps" in text and "teamster.control" in text  # both queues consumed


def test_flower_command_serves_with_basic_auth(tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "FLOWER_BASIC_AUTH": "ops:s3cret"}
    proc = subprocess.Popen(_python_cli("flower", "--port", str(port)), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def status(path: str, auth: bool) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if auth:
            request.add_header("Authorization", "Basic b3BzOnMzY3JldA==")  # ops:s3cret
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                first = status("/", auth=False)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
                time.sleep(0.2)
        assert first == 401
        assert status("/", auth=True) == 200
        assert status("/metrics", auth=False) == 200  # what the help text warns about
    finally:
        _stop(proc)
        log.close()


def _embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TEAMSTER_REDIS_URL", "TEAMSTER_MODEL")}
    env.update(TEAMSTER_EMBEDDED_DIR=str(tmp_path / "embedded"), COLUMNS="220", PYTHONUNBUFFERED="1")
    return env


def _embedded_alive(tmp_path: Path) -> bool:
    """Whether the embedded Redis a test process started still answers."""
    record = tmp_path / "embedded" / "embedded.json"
    if not record.exists():
        return False
    client = redis.Redis.from_url(json.loads(record.read_text())["url"], socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _shutdown_embedded(tmp_path: Path) -> bool:
    """Stop an embedded Redis a test process left behind (returns whether one was still running)."""
    record = tmp_path / "embedded" / "embedded.json"
    if not record.exists():
        return False
    client = redis.Redis.from_url(json.loads(record.read_text())["url"], socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        return False
    try:
        client.shutdown(nosave=True)
    except redis.RedisError:
        pass
    return True


def _process_running(marker: str) -> bool:
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                if marker.encode() in (proc_dir / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def test_demo_then_operator_commands_on_the_embedded_redis(tmp_path: Path) -> None:
    env = _embedded_env(tmp_path)
    try:
        demo = subprocess.run(_python_cli("demo"), env=env, capture_output=True, text=True, timeout=150)
        out = demo.stdout
        assert demo.returncode == 0, out + demo.stderr
        assert "scripted model" in out and "Offline demo" in out
        assert "summary: 8 succeeded (1 after a retry), 1 escalated, 1 needs human, 0 failed" in out
        assert re.search(r"succeeded after a retry \(counted above\)\s+1\s+T-1007\s", out)
        assert re.search(r"^\s*escalated\s+1\s+T-1006\s", out, re.M)
        assert re.search(r"^\s*needs human\s+1\s+T-1008\s", out, re.M)
        assert re.search(r"^\s*T-1007\s+run_\w+\s+succeeded\s+\S+\s+after a retry", out, re.M)
        assert re.search(r"T-1006 escalated at step extract_order: cannot_complete: order Z9999", out)
        escalated = re.search(ENTRY_RE.format(step="extract_order"), out).group(0)  # type: ignore[union-attr]
        human = re.search(ENTRY_RE.format(step="policy_review"), out).group(0)  # type: ignore[union-attr]
        assert re.search(r"teamster runs show run_[0-9a-f]+", out)
        assert f"teamster dlq show {escalated}" in out
        assert f"teamster dlq resolve {human} --output '{RESOLVE_OUTPUT}' --by you --wait" in out  # runs as pasted
        node = re.search(r"local worker (teamster-local-[0-9a-f]+)@", out).group(1)  # type: ignore[union-attr]
        assert not _process_running(node), "the demo's worker outlived it"
        # the embedded Redis is a daemon with its own lifecycle (`teamster redis stop`): it outlives the demo
        assert _embedded_alive(tmp_path), "the demo's embedded Redis is gone: the next commands would not find the runs"

        # Another shell, the same embedded Redis: no worker runs, so --wait starts a temporary one
        # (with the scripted model the run used, although TEAMSTER_MODEL is unset here).
        retry = subprocess.run(_python_cli("dlq", "retry", escalated, "--by", "tester", "--wait", "--timeout", "60"),
                               env=env, capture_output=True, text=True, timeout=120)
        assert "no worker is running: started a temporary local worker" in retry.stderr, retry.stderr
        assert retry.returncode == 1 and "is escalated: cannot_complete" in retry.stdout, retry.stdout + retry.stderr

        resolve = subprocess.run(_python_cli("dlq", "resolve", human, "--output", RESOLVE_OUTPUT, "--by", "tester",
                                             "--wait"), env=env, capture_output=True, text=True, timeout=120)
        assert resolve.returncode == 0, resolve.stdout + resolve.stderr
        assert "succeeded" in resolve.stdout and '"ticket_id": "T-1008"' in resolve.stdout
    finally:
        _shutdown_embedded(tmp_path)


def test_demo_ctrl_c_stops_the_worker(tmp_path: Path) -> None:
    env = _embedded_env(tmp_path)
    proc = subprocess.Popen(_python_cli("demo", "--tickets", "400"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_works)
    try:
        assert proc.stdout is not None
        node = None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            found = re.search(r"local worker (teamster-local-[0-9a-f]+)@", line)
            if found:
                node = found.group(1)
                break
            assert time.monotonic() < deadline
        assert node is not None and _process_running(node)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert not _process_running(node)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _shutdown_embedded(tmp_path)


def test_wait_without_worker_on_a_configured_redis_warns_and_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMSTER_KEY_PREFIX", f"test-noworker-{uuid.uuid4().hex[:6]}")  # no worker serves it
    result = cli("submit", "ticket_triage", "--input", json.dumps(_ticket("T-1001")), "--wait", "--timeout", "1")
    assert "no worker answered a ping: the run will proceed when a worker starts" in result.stderr
    assert result.stdout.startswith("run_")
    assert_one_line_error(result, "run_timeout", notes=1)  # the warning, then the error and its hint
    assert "it goes on" in result.stderr
