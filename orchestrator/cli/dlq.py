"""Dead-letter commands: ``dlq list``, ``dlq show``, ``dlq retry``, ``dlq resolve``, ``dlq discard``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from teamster.errors import InvalidInput
from teamster.orchestrator.cli._common import console, handle_errors
from teamster.orchestrator.cli._events import summarize_event
from teamster.orchestrator.cli._support import (
    entry_next_steps,
    fmt_time,
    fmt_when,
    make_client,
    new_table,
    print_run_outcome,
    read_json_object,
    require_by,
    short_json,
    styled_status,
)
from teamster.orchestrator.models import DeadLetterEntry, DeadLetterStatus

if TYPE_CHECKING:
    from teamster.orchestrator.client import Client

__all__ = ["dlq_app"]

dlq_app = typer.Typer(
    help="The dead-letter queue: every failure teamster could not fix, with what is needed to act on it.",
    no_args_is_help=True, rich_markup_mode="markdown")

By = Annotated[str | None, typer.Option(
    "--by", envvar="USER", show_envvar=True, help="Who acts (recorded in the journal); defaults to $USER.")]
Reason = Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the journal and on the entry).")]
Wait = Annotated[bool, typer.Option("--wait", "-w", help="Wait until the run is final or waits again, and print it "
                                    "(starts a temporary local worker when none runs on the embedded Redis).")]
Timeout = Annotated[float, typer.Option(help="Seconds --wait waits (the run goes on afterwards).")]
EntryId = Annotated[str, typer.Argument(metavar="ENTRY_ID",
                                        help="The dead-letter entry id (`teamster dlq list` shows them).")]


@dlq_app.command("list")
@handle_errors
def list_entries(
    include_closed: Annotated[bool, typer.Option("--all", "-a", help="Include closed entries (retried, resolved, "
                                                 "discarded).")] = False,
    run_id: Annotated[str | None, typer.Option("--run", help="Only entries of this run.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many entries.")] = 50,
) -> None:
    """List dead-letter entries, newest first (open ones unless `--all`).

    Examples:

    ```
    teamster dlq list
    teamster dlq list --all --run RUN_ID
    ```
    """
    entries = make_client(load_modules=False).dlq.list(include_closed=include_closed, limit=limit, run_id=run_id)
    if not entries:
        console.print("no open dead-letter entries" if not include_closed else "no dead-letter entries")
        return
    table = new_table(f"{len(entries)} dead-letter entr{'y' if len(entries) == 1 else 'ies'}")
    table.add_column("entry id (run:step:n)", overflow="fold", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("error", min_width=24)
    for entry in entries:
        table.add_row(escape(entry.entry_id), styled_status(entry.status.value),
                      f"[red]{escape(entry.error_type)}[/] [dim]{escape(entry.workflow)}, {entry.attempts} attempt"
                      f"{'' if entry.attempts == 1 else 's'}, {fmt_when(entry.created_at)}[/]\n"
                      f"{escape(short_json(entry.message, 160))}")
    console.print(table)
    console.print("[dim]details and what to do:[/] teamster dlq show ENTRY_ID", highlight=False)


def _print_entry(entry: DeadLetterEntry) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("entry", escape(entry.entry_id)),
        ("status", styled_status(entry.status.value)),
        ("kind", escape(entry.kind)),
        ("run", escape(entry.run_id)),
        ("workflow", escape(entry.workflow)),
        ("step", escape(entry.step_key) + (f" (agent {escape(entry.agent)})" if entry.agent else "")),
        ("error type", f"[red]{escape(entry.error_type)}[/]"),
        ("message", escape(entry.message)),
        ("retryable", "yes" if entry.retryable else "no"),
        ("attempts", str(entry.attempts)),
        ("state version", str(entry.state_version)),
        ("trace id", escape(entry.trace_id or "-")),
        ("escalation", escape(entry.escalation or "-")),
        ("created", fmt_time(entry.created_at)),
    ]
    if entry.question:
        rows.append(("question", escape(entry.question)))
    if entry.status != DeadLetterStatus.OPEN:
        rows.append(("closed", f"{fmt_time(entry.closed_at)} by {escape(entry.closed_by or '?')}"
                     + (f": {escape(entry.close_reason)}" if entry.close_reason else "")))
    for name, value in rows:
        grid.add_row(name, value)
    console.print(grid)
    console.print("[bold]details:[/]")
    console.print_json(json.dumps(entry.details or {}, default=str))
    console.print("[bold]input:[/]")
    console.print_json(json.dumps(entry.input, default=str))
    if entry.journal_excerpt:
        table = new_table(f"journal excerpt ({len(entry.journal_excerpt)} events of {escape(entry.step_key)})")
        table.add_column("time")
        table.add_column("attempt", justify="right")
        table.add_column("type")
        table.add_column("data", overflow="fold")
        for item in entry.journal_excerpt:
            ts = float(item.get("ts") or 0)
            data = item.get("data") if isinstance(item.get("data"), dict) else {}
            table.add_row(fmt_time(ts)[11:], str(item.get("attempt") or ""), escape(str(item.get("type", "?"))),
                          escape(summarize_event(str(item.get("type", "")), data or {})))
        console.print(table)


@dlq_app.command("show")
@handle_errors
def show_entry(entry_id: EntryId) -> None:
    """Show every field of a dead-letter entry and what the operator can do next.

    Fields: error type, message, retryable, details, attempts, input, state version, trace id, escalation
    taken and the journal excerpt of the failed step.

    Example:

    ```
    teamster dlq show run_4f2f359863da59c7ad078d44:policy_review:1
    ```
    """
    entry = make_client().dlq.get(entry_id)
    _print_entry(entry)
    if entry.status != DeadLetterStatus.OPEN:
        console.print(f"This entry is closed ({escape(entry.status.value)}). The run: "
                      f"teamster runs show {escape(entry.run_id)}", highlight=False, soft_wrap=True)
        return
    console.print("[bold]What you can do:[/]")
    for explanation, command in entry_next_steps(entry):
        console.print(f"  [dim]# {escape(explanation)}[/]", highlight=False)
        console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)
    console.print(f"  [dim]# the full journal of the run[/]\n  teamster journal {escape(entry.run_id)}",
                  highlight=False, soft_wrap=True)


def _after(client: Client, entry: DeadLetterEntry, action: str, wait: bool, timeout: float) -> None:
    run = client.status(entry.run_id)
    console.print(f"entry {escape(entry.entry_id)} {action} by {escape(entry.closed_by or '?')}; "
                  f"run {escape(run.run_id)} is now {styled_status(run.status.value)}", highlight=False,
                  soft_wrap=True)
    if not wait:
        console.print(f"[dim]follow it with[/] teamster runs show {escape(run.run_id)}", highlight=False)
        return
    from teamster.orchestrator.cli.local import await_run  # noqa: PLC0415 - keeps `teamster --help` fast

    run = await_run(client, run.run_id, timeout)
    if not print_run_outcome(run):
        raise typer.Exit(1)


@dlq_app.command("retry")
@handle_errors
def retry_entry(
    entry_id: EntryId,
    by: By = None,
    reason: Reason = "",
    state_patch: Annotated[str | None, typer.Option(
        "--state-patch", help="Fields merged into the run state before the retry: JSON object or `@file.json` "
        "(validated against the workflow's state model; nothing changes if it is invalid).")] = None,
    wait: Wait = False,
    timeout: Timeout = 120.0,
) -> None:
    """Run the failed step again from its first attempt (optionally after patching the run state).

    Examples:

    ```
    teamster dlq retry ENTRY_ID --by alice --reason "provider outage is over" --wait
    teamster dlq retry ENTRY_ID --state-patch '{"body": "order A1001 never arrived"}'
    ```
    """
    patch = read_json_object(state_patch, "--state-patch") if state_patch is not None else None
    client = make_client()
    entry = client.dlq.retry(entry_id, by=require_by(by), reason=reason, state_patch=patch)
    _after(client, entry, "retried", wait, timeout)


@dlq_app.command("resolve")
@handle_errors
def resolve_entry(
    entry_id: EntryId,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="The step's output: JSON object or `@file.json`, validated against the step's "
        "output model (`teamster dlq show` prints a skeleton).", show_default=False)],
    by: By = None,
    reason: Reason = "",
    wait: Wait = False,
    timeout: Timeout = 120.0,
) -> None:
    """Supply the failed step's output by hand; it is committed like a model's output and the run resumes.

    Examples:

    ```
    teamster dlq resolve ENTRY_ID --output '{"approved": true, "issues": []}' --by alice --wait
    teamster dlq resolve ENTRY_ID --output @review.json --reason "refund approved by finance"
    ```
    """
    data = read_json_object(output, "--output")
    client = make_client()
    try:
        entry = client.dlq.resolve(entry_id, data, by=require_by(by), reason=reason)
    except InvalidInput as exc:
        raise InvalidInput(exc.message, hint=f"`teamster dlq show {entry_id}` prints a skeleton of the expected "
                           "output; nothing was changed.", **exc.details) from None
    _after(client, entry, "resolved", wait, timeout)


@dlq_app.command("discard")
@handle_errors
def discard_entry(
    entry_id: EntryId,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why you give up (required; recorded on the run).",
                                        show_default=False)],
    by: By = None,
) -> None:
    """Give up on a dead-letter entry: the run fails with your reason.

    Example:

    ```
    teamster dlq discard ENTRY_ID --by alice --reason "customer withdrew the ticket"
    ```
    """
    client = make_client()
    entry = client.dlq.discard(entry_id, by=require_by(by), reason=reason)
    _after(client, entry, "discarded", False, 0)
