"""What the operator commands print: readable at 80 columns, no padding when piped, ``--json`` everywhere,
``runs cancel``, why a step was retried, output skeletons that cannot be submitted unchanged, and redaction.

Runs execute in-process on :class:`teamster.testing.WorkflowEnvironment` (the session's real Redis, a private
key prefix); the CLI runs in-process too (typer's ``CliRunner``) and reaches the same deployment through
``TEAMSTER_REDIS_URL`` / ``TEAMSTER_KEY_PREFIX``, as an operator's shell would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner, Result

from teamster.examples.triage import SAMPLE_TICKETS, Review
from teamster.orchestrator.cli import app
from teamster.orchestrator.cli._common import console, err_console
from teamster.orchestrator.cli._support import (
    Column,
    command_lines,
    example_output,
    fmt_duration,
    placeholder_paths,
    print_table,
)
from teamster.orchestrator.models import DeadLetterStatus, RunRecord, RunStatus
from teamster.testing import WorkflowEnvironment

pytestmark = pytest.mark.integration

WORKER = "ip-10-200-33-147.eu-central-1.compute.internal:48213"
"""A realistic worker id (``host:pid`` of an EC2 host): too long for the step table at 80 columns."""
SECRET = "sk-" + "abcdefghijklmnopqrstuvwx"  # an API key: sk- and 24 letters
SKELETON = '{"approved": "<fill in: true or false>", "issues": ["<fill in: string>"]}'


@pytest.fixture(autouse=True)
def _live_console_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consoles follow $COLUMNS (another test module may have fixed their width)."""
    monkeypatch.setattr(console, "_width", None)
    monkeypatch.setattr(err_console, "_width", None)


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkflowEnvironment]:
    with WorkflowEnvironment(["tests.workflows", "teamster.examples.triage"]) as environment:
        environment.runtime.worker = WORKER  # steps record the worker that ran them
        monkeypatch.setenv("TEAMSTER_REDIS_URL", str(environment.settings.redis_url))
        monkeypatch.setenv("TEAMSTER_KEY_PREFIX", environment.settings.key_prefix)
        monkeypatch.setenv("TEAMSTER_WORKFLOW_MODULES", "tests.workflows,teamster.examples.triage")
        yield environment


def cli(*args: str, columns: int = 80) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def ok(*args: str, columns: int = 80) -> Result:
    result = cli(*args, columns=columns)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Result, code: str) -> tuple[str, str]:
    """Exit code 1, nothing on stdout, one error line and its hint on stderr; returns (error, hint)."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"error {code}: ") and lines[1].startswith("hint: "), result.stderr
    return lines[0], lines[1]


def flat(text: str) -> str:
    """Text with its line breaks and runs of spaces made single spaces (undoes wrapping)."""
    return " ".join(text.split())


def ticket(ticket_id: str) -> dict[str, str]:
    return dict(next(t for t in SAMPLE_TICKETS if t["ticket_id"] == ticket_id))


def shell_args(command: str) -> list[str]:
    """The arguments bash gives a command pasted as printed (line continuations, quotes spanning lines)."""
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run([bash, "-c", 'printf "%s\\0" ' + command.strip()], capture_output=True, text=True,
                          check=True)
    return done.stdout.split("\0")[:-1]


def printed_command(output: str, start: str) -> str:
    """The (possibly multi-line) command in ``output`` that begins with ``start``."""
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    block = [lines[first]]
    quoted = block[0].count("'") % 2 == 1
    while block[-1].endswith("\\") or quoted:
        block.append(lines[first + len(block)])
        quoted ^= block[-1].count("'") % 2 == 1
    return "\n".join(block)


@pytest.fixture()
def runs(env: WorkflowEnvironment) -> dict[str, RunRecord]:
    """A throttled-then-succeeded run, a needs-human run, an escalated run and a fan-out."""
    out = {
        "retried": env.run("t_linear", {"text": "throttle-once: summarise the quarterly report"}),
        "human": env.run("ticket_triage", ticket("T-1008")),
        "escalated": env.run("ticket_triage", ticket("T-1006")),
        "fanout": env.run("t_fanout", {"text": "x", "items": ["alpha", "bad-beta", "gamma"]}),
    }
    assert out["retried"].status == RunStatus.SUCCEEDED
    assert out["human"].status == RunStatus.NEEDS_HUMAN
    assert out["escalated"].status == RunStatus.ESCALATED
    return out


# --------------------------------------------------------------------------- 1, 2: 80 columns, no padding


def test_consoles_follow_columns_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "77")
    assert console.width == 77 and err_console.width == 77
    monkeypatch.setenv("COLUMNS", "131")
    assert console.width == 131


def test_every_table_fits_80_columns_without_cutting(env: WorkflowEnvironment, runs: dict[str, RunRecord]) -> None:
    human, escalated = runs["human"], runs["escalated"]
    human_entry = str((human.error or {})["dlq_entry"])
    escalated_entry = str((escalated.error or {})["dlq_entry"])
    outputs = {
        "runs list": ok("runs", "list").stdout,
        "runs show retried": ok("runs", "show", runs["retried"].run_id).stdout,
        "runs show human": ok("runs", "show", human.run_id).stdout,
        "runs show fanout": ok("runs", "show", runs["fanout"].run_id).stdout,
        "dlq list": ok("dlq", "list").stdout,
        "dlq show human": ok("dlq", "show", human_entry).stdout,
        "dlq show escalated": ok("dlq", "show", escalated_entry).stdout,
        "journal": ok("journal", human.run_id).stdout,
        "replay": ok("replay", runs["retried"].run_id).stdout,
    }
    for name, text in outputs.items():
        for line in text.splitlines():
            assert len(line) <= 80, (name, line)
            assert not line.endswith(" "), (name, line)  # stdout is not a terminal: no padding
        assert "…" not in text, (name, text)
    lines = {name: text.splitlines() for name, text in outputs.items()}
    for run in runs.values():  # ids whole, on one line
        assert any(run.run_id in line for line in lines["runs list"]), run.run_id
    for entry in (human_entry, escalated_entry):
        assert any(line.startswith(entry) for line in lines["dlq list"]), entry
        assert any(entry in line for line in lines["runs show human"] + lines["runs show fanout"]
                   + lines["dlq show human"] + lines["dlq show escalated"])
    # the worker column does not fit: the worker id follows the table, whole
    assert f"  worker (every step): {WORKER}" in lines["runs show retried"]
    step_header = next(line for line in lines["runs show human"] if line.startswith("step "))
    assert step_header.split() == ["step", "kind", "status", "tries", "took", "calls", "tokens"]
    assert "policy_review reason: Refund of $850.00 exceeds" in outputs["runs show human"]
    assert re.search(r"^check\[1\]\s+branch\s+cannot_complete\s", outputs["runs show fanout"], re.M)
    assert "check[1] reason: cannot check bad-beta" in flat(outputs["runs show fanout"])


def test_wide_terminals_keep_every_column(env: WorkflowEnvironment, runs: dict[str, RunRecord]) -> None:
    shown = ok("runs", "show", runs["human"].run_id, columns=240).stdout
    header = next(line for line in shown.splitlines() if line.startswith("step "))
    assert header.split() == ["step", "kind", "status", "attempts", "duration", "model", "calls", "tokens",
                              "worker", "reason"]
    assert re.search(rf"^policy_review\s+agent\s+needs_human\s+1\s.*{re.escape(WORKER)}\s+Refund of \$850\.00",
                     shown, re.M)
    assert not any(line.endswith(" ") for line in shown.splitlines())


@pytest.mark.parametrize("width", [40, 60, 80, 100, 140])
def test_print_table_never_cuts_an_id(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      width: int) -> None:
    """Whole columns stay whole while they fit; the rest wraps or moves below the table; nothing is cut (at 40
    columns the ids cannot fit beside the other columns: they wrap, they are not cut)."""
    monkeypatch.setenv("COLUMNS", str(width))
    run_id = "run_0123456789abcdef01234567"
    rows = [[run_id, "a workflow with a rather long name", "needs_human", WORKER,
             "the reason is a sentence long enough to need wrapping at eighty columns " * 2]]
    print_table("[bold]title[/]", [
        Column("run id", whole=True),
        Column("workflow", min_width=8),
        Column("status", whole=True),
        Column("worker", whole=True, below=True),
        Column("reason", min_width=30, below=True),
    ], rows)
    out = capsys.readouterr().out
    assert all(len(line) <= width and not line.endswith(" ") for line in out.splitlines()), out
    assert "…" not in out
    printed = Counter(re.sub(r"[\s─]", "", out))
    assert not Counter(re.sub(r"\s", "", "title run id workflow status worker reason" + "".join(rows[0]))) - printed
    if width >= 60:  # and each word whole
        assert any(run_id in line for line in out.splitlines())
        assert any(WORKER in line for line in out.splitlines())
        assert all(word in out for cell in rows[0] for word in cell.split())


def test_long_commands_are_split_so_a_shell_still_runs_them() -> None:
    command = ("teamster dlq resolve run_0123456789abcdef01234567:policy_review:1 --output "
               "'" + SKELETON + "' --by you")
    assert command_lines(command, 200) == ["  " + command]
    lines = command_lines(command, 80)
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines), lines
    pasted, given = shell_args("\n".join(lines)), shell_args(command)
    assert pasted[:5] + pasted[6:] == given[:5] + given[6:] == [
        "teamster", "dlq", "resolve", "run_0123456789abcdef01234567:policy_review:1", "--output", "--by", "you"]
    assert pasted[5] != given[5] and json.loads(pasted[5]) == json.loads(given[5]) == json.loads(SKELETON)
    short = "teamster dlq retry run_0123456789abcdef01234567:policy_review:1 --by you --wait"
    assert command_lines(short, 80) == [
        "  teamster dlq retry run_0123456789abcdef01234567:policy_review:1 --by you \\", "      --wait"]


# --------------------------------------------------------------------------- 3: --json


def test_json_outputs_are_one_document_each(env: WorkflowEnvironment, runs: dict[str, RunRecord]) -> None:
    retried, human = runs["retried"], runs["human"]
    entry_id = str((human.error or {})["dlq_entry"])

    listed = json.loads(ok("runs", "list", "--json").stdout)
    assert {r["run_id"] for r in listed} == {r.run_id for r in runs.values()}
    assert all("status" in r and "input" in r for r in listed)
    assert json.loads(ok("runs", "list", "--json", "--status", "cancelled").stdout) == []

    shown = json.loads(ok("runs", "show", retried.run_id, "--json").stdout)
    assert shown["run"]["run_id"] == retried.run_id and shown["run"]["status"] == "succeeded"
    steps = {s["step_key"]: s for s in shown["steps"]}
    assert list(steps) == ["summarize", "label", "report"]
    assert steps["summarize"]["attempts"] == 2 and steps["summarize"]["worker"] == WORKER
    assert [(r["attempt"], r["error_type"], r["next_attempt"]) for r in steps["summarize"]["retries"]] == [
        (1, "model_throttled", 2)]
    assert steps["label"]["retries"] == []

    entries = json.loads(ok("dlq", "list", "--json").stdout)
    assert entry_id in {e["entry_id"] for e in entries}
    assert json.loads(ok("dlq", "list", "--json", "--run", retried.run_id).stdout) == []

    entry = json.loads(ok("dlq", "show", entry_id, "--json").stdout)
    assert entry["entry"]["entry_id"] == entry_id and entry["entry"]["kind"] == "needs_human"
    commands = [n["command"] for n in entry["next"]]
    assert f"teamster dlq resolve {entry_id} --output '{SKELETON}' --by you" in commands
    assert f"teamster dlq discard {entry_id} --by you --reason 'why'" in commands
    assert all(n["what"] for n in entry["next"])

    report = json.loads(ok("replay", retried.run_id, "--json").stdout)
    assert report["run_id"] == retried.run_id and report["identical"] is True
    assert report["live_model_calls"] == 0
    assert [s["step_key"] for s in report["steps"]] == ["summarize", "label", "report"]

    events = [json.loads(line) for line in ok("journal", retried.run_id, "--json").stdout.splitlines()]
    assert events[0]["type"] == "run_created" and events[-1]["type"] == "run_succeeded"


def test_json_errors_stay_off_stdout(env: WorkflowEnvironment) -> None:
    env.run("t_linear", {"text": "the deployment holds a run"})
    for args in (["runs", "show", "run_nope", "--json"], ["dlq", "show", "nope:step:1", "--json"],
                 ["replay", "run_nope", "--json"]):
        one_line_error(cli(*args), "dead_letter_not_found" if args[0] == "dlq" else "run_not_found")


# --------------------------------------------------------------------------- 4: runs cancel


def test_cancel_a_run_then_refuse_to_cancel_it_again(env: WorkflowEnvironment) -> None:
    run_id = env.submit("t_linear", {"text": "never started"})  # its first step waits in the queue
    result = ok("runs", "cancel", run_id, "--reason", "customer withdrew", "--by", "alice")
    assert f"run {run_id} is now cancelled" in result.stdout
    assert "cancelled by alice: customer withdrew" in flat(result.stdout)
    assert env.client.status(run_id).status == RunStatus.CANCELLED
    cancelled = [e for e in env.client.journal(run_id) if e.type == "run_cancelled"]
    assert [(e.data["by"], e.data["reason"]) for e in cancelled] == [("alice", "customer withdrew")]

    error, hint = one_line_error(cli("runs", "cancel", run_id, "--reason", "again", "--by", "alice"),
                                 "invalid_operation")
    assert "already cancelled" in error
    assert f"teamster runs show {run_id}" in hint


def test_cancel_a_finished_run_is_refused(env: WorkflowEnvironment) -> None:
    run = env.run("t_linear", {"text": "done already"})
    assert run.status == RunStatus.SUCCEEDED
    error, hint = one_line_error(cli("runs", "cancel", run.run_id, "--reason", "too late", "--by", "bob"),
                                 "invalid_operation")
    assert f"run {run.run_id} is already succeeded" in error and "Only a run that is not final" in hint
    assert env.client.status(run.run_id).status == RunStatus.SUCCEEDED
    one_line_error(cli("runs", "cancel", "run_nope", "--reason", "x", "--by", "bob"), "run_not_found")
    assert cli("runs", "cancel", run.run_id, "--by", "bob").exit_code == 2  # --reason is required


# --------------------------------------------------------------------------- 5: why an attempt was retried


def test_runs_show_says_why_an_attempt_was_retried(env: WorkflowEnvironment) -> None:
    run = env.run("t_linear", {"text": "throttle-once: summarise this"})
    retry = next(e for e in env.client.journal(run.run_id) if e.type == "retry")
    shown = ok("runs", "show", run.run_id).stdout
    assert re.search(r"^summarize\s+agent\s+succeeded\s+2\s", shown, re.M)
    expected = (f"summarize: attempt 1 retried after model_throttled: {retry.data['message']} "
                f"(retry in {fmt_duration(float(retry.data['delay_seconds']))})")
    assert retry.data["message"].startswith("model throttled")
    assert expected in flat(shown)
    assert "label: attempt" not in flat(shown)  # a step that ran once has no retry line


# --------------------------------------------------------------------------- 6: output skeletons


_Mode = Literal["fast", "slow", "careful"]


class _Nested(BaseModel):
    level: str = Field(pattern="^(low|high)$")
    score: float


class _Everything(BaseModel):
    name: str
    count: int
    ratio: float
    ok: bool
    kind: str | None = None
    mode: _Mode
    tags: list[str]
    nested: _Nested
    maybe: _Nested | None = None
    extra: dict[str, int]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def test_every_leaf_of_a_skeleton_is_a_placeholder() -> None:
    assert example_output(Review) == SKELETON
    skeleton = json.loads(example_output(_Everything))
    assert skeleton == {
        "name": "<fill in: string>", "count": "<fill in: integer>", "ratio": "<fill in: number>",
        "ok": "<fill in: true or false>", "kind": "<fill in: string or null>",
        "mode": "<fill in: one of fast|slow|careful>", "tags": ["<fill in: string>"],
        "nested": {"level": "<fill in: string>", "score": "<fill in: number>"},
        "maybe": {"level": "<fill in: string>", "score": "<fill in: number>"},
        "extra": {"<fill in: key>": "<fill in: integer>"},
    }
    assert all(isinstance(leaf, str) and leaf.startswith("<fill in: ") for leaf in _leaves(skeleton))
    assert placeholder_paths(skeleton) == ["name", "count", "ratio", "ok", "kind", "mode", "tags[0]",
                                           "nested.level", "nested.score", "maybe.level", "maybe.score",
                                           "extra.<fill in: key>"]
    assert placeholder_paths({"approved": True, "issues": []}) == []


def test_a_pasted_skeleton_is_refused_and_a_filled_in_one_resolves(env: WorkflowEnvironment) -> None:
    run = env.run("t_human", {"text": "please ask who the customer is"})
    assert run.status == RunStatus.NEEDS_HUMAN
    entry_id = str((run.error or {})["dlq_entry"])
    shown = ok("dlq", "show", entry_id).stdout
    command = printed_command(shown, f"teamster dlq resolve {entry_id}")
    args = shell_args(command)  # exactly what a paste of the printed command runs
    assert args[:3] == ["teamster", "dlq", "resolve"]
    output = args[args.index("--output") + 1]
    assert json.loads(output) == {"summary": "<fill in: string>"}

    error, hint = one_line_error(cli(*args[1:]), "invalid_input")
    assert "placeholder at summary" in error
    assert hint == "hint: replace every <fill in: ...> placeholder with a real value; nothing was changed"
    assert env.client.dlq.get(entry_id).status == DeadLetterStatus.OPEN
    assert env.client.status(run.run_id).status == RunStatus.NEEDS_HUMAN

    args[args.index("--output") + 1] = output.replace("<fill in: string>", "Ada Lovelace, order A1001")
    resolved = ok(*args[1:])
    assert f"entry {entry_id} resolved by you" in resolved.stdout
    assert env.client.dlq.get(entry_id).status == DeadLetterStatus.RESOLVED
    # the CLI sent the next step to the Celery queue, which no worker reads here: deliver it in-process
    env.queue.enqueue(run.run_id, "label")
    env.drain()
    done = env.client.status(run.run_id)
    assert done.status == RunStatus.SUCCEEDED and done.state["summarize"] == {"summary": "Ada Lovelace, order A1001"}


def test_a_placeholder_left_in_a_list_is_refused(env: WorkflowEnvironment) -> None:
    run = env.run("ticket_triage", ticket("T-1008"))
    entry_id = str((run.error or {})["dlq_entry"])
    error, _ = one_line_error(cli("dlq", "resolve", entry_id, "--by", "tester", "--output",
                                  '{"approved": true, "issues": ["<fill in: string>"]}'), "invalid_input")
    assert "placeholder at issues[0]" in error
    assert env.client.dlq.get(entry_id).status == DeadLetterStatus.OPEN


# --------------------------------------------------------------------------- 7: redaction


def test_secrets_in_step_data_are_never_printed(env: WorkflowEnvironment) -> None:
    done = env.run("t_linear", {"text": f"{SECRET} is the key to summarise"})
    assert SECRET in json.dumps(done.output)  # stored as given (the summary is the first 40 characters)
    human = env.run("t_human", {"text": f"ask who owns {SECRET}"})
    entry_id = str((human.error or {})["dlq_entry"])
    outputs = {
        "runs show": ok("runs", "show", done.run_id).stdout,
        "runs show --json": ok("runs", "show", done.run_id, "--json").stdout,
        "runs list --json": ok("runs", "list", "--json").stdout,
        "dlq show": ok("dlq", "show", entry_id).stdout,
        "dlq show --json": ok("dlq", "show", entry_id, "--json").stdout,
        "dlq list --json": ok("dlq", "list", "--json").stdout,
        "journal": ok("journal", human.run_id).stdout,
        "journal --json": ok("journal", done.run_id, "--json").stdout,
    }
    for name, text in outputs.items():
        assert SECRET not in text and SECRET[:19] not in text, name
    for name in ("runs show", "runs show --json", "dlq show", "dlq show --json"):
        assert "[REDACTED]" in outputs[name], name
    run_json = json.loads(outputs["runs show --json"])["run"]
    assert run_json["input"]["text"] == "[REDACTED] is the key to summarise"
    assert run_json["output"]["summary"].startswith("[REDACTED]")
    assert json.loads(outputs["dlq show --json"])["entry"]["input"]["text"] == "ask who owns [REDACTED]"
