"""Dead-letter commands: ``dlq list``, ``dlq show``, ``dlq retry``, ``dlq resolve``, ``dlq discard``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from teamster.errors import InvalidInput
from teamster.orchestrator.cli._common import console, handle_errors
from teamster.orchestrator.cli._events import summarize_event
from teamster.orchestrator.cli._support import (
    PLACEHOLDER,
    AsJson,
    Column,
    echo_json,
    entry_next_steps,
    fmt_time,
    fmt_when,
    make_client,
    placeholder_paths,
    print_command,
    print_json_block,
    print_note,
    print_run_outcome,
    print_table,
    read_json_object,
    redacted,
    redacted_dump,
    redactor,
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
    as_json: AsJson = False,
) -> None:
    """List dead-letter entries, newest first (open ones unless `--all`).

    With `--json`: a JSON array of entries (every field, secrets redacted).

    Examples:

    ```
    teamster dlq list
    teamster dlq list --all --run RUN_ID
    teamster dlq list --json | jq -r '.[] | select(.kind == "needs_human") | .entry_id'
    ```
    """
    client = make_client(load_modules=False)
    entries = client.dlq.list(include_closed=include_closed, limit=limit, run_id=run_id)
    redact = redactor(client.settings)
    if as_json:
        echo_json([redacted_dump(entry, redact) for entry in entries])
        return
    if not entries:
        console.print("no open dead-letter entries" if not include_closed else "no dead-letter entries")
        return
    rows = []
    for entry in (redacted(e, redact) for e in entries):
        rows.append([escape(entry.entry_id),
                     f"{styled_status(entry.status.value)} [red]{escape(entry.error_type)}[/]\n"
                     f"[dim]{escape(entry.workflow)}, {entry.attempts} attempt{'' if entry.attempts == 1 else 's'}, "
                     f"{fmt_when(entry.created_at)}[/]\n{escape(short_json(entry.message, 200))}"])
    print_table(f"[bold]{len(entries)} dead-letter entr{'y' if len(entries) == 1 else 'ies'}[/]", [
        Column("entry id (run:step:n)", short="entry id", whole=True),
        Column("status, error", min_width=24, below=True),
    ], rows)
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
    print_json_block(entry.details or {})
    console.print("[bold]input:[/]")
    print_json_block(entry.input)
    if entry.journal_excerpt:
        excerpt = []
        for item in entry.journal_excerpt:
            ts = float(item.get("ts") or 0)
            data = item.get("data") if isinstance(item.get("data"), dict) else {}
            excerpt.append([fmt_time(ts)[11:], str(item.get("attempt") or ""), escape(str(item.get("type", "?"))),
                            escape(summarize_event(str(item.get("type", "")), data or {}))])
        print_table(f"[bold]journal excerpt ({len(entry.journal_excerpt)} events of {escape(entry.step_key)})[/]", [
            Column("time", whole=True),
            Column("attempt", short="try", justify="right", whole=True),
            Column("type", whole=True),
            Column("data", min_width=20),
        ], excerpt)


def _child_entry(client: Client, entry: DeadLetterEntry) -> DeadLetterEntry | None:
    """The dead-letter entry of the child run a failed child step names (``child_run_failed``), if it has one."""
    child_entry = entry.details.get("child_entry") if entry.error_type == "child_run_failed" else None
    if not child_entry:
        return None
    return client.runtime.store.get_entry(str(child_entry))


def _print_child_entry(child: DeadLetterEntry) -> None:
    """The child run's entry, in short: why the child failed is why this step failed."""
    console.print(f"[bold]the child run's dead-letter entry[/] ({escape(child.entry_id)}):", highlight=False)
    print_note(f"{styled_status(child.status.value)} [red]{escape(child.error_type)}[/] at step "
               f"{escape(child.step_key)} of {escape(child.workflow)} run {escape(child.run_id)}: "
               f"{escape(short_json(child.message, 200))}")
    if child.status == DeadLetterStatus.OPEN:
        print_note("fix the child first (its entry shows how); once the child run succeeds, retry this entry: "
                   "the step takes the child's output, the child is not started again")
    print_command(f"teamster dlq show {child.entry_id}")


def _print_parent(client: Client, entry: DeadLetterEntry) -> None:
    """For an entry of a child run: its parent, which waits on (or failed with) this run."""
    try:
        run = client.status(entry.run_id)
    except Exception:  # noqa: BLE001 - the run may have expired; the entry stands on its own
        return
    if run.parent_run:
        print_note(f"this run is a child run of {escape(run.parent_run)} (step {escape(run.parent_step or '?')}): "
                   "once it succeeds, retry the parent's entry (if it has one) to go on with its output")
        print_command(f"teamster runs show {run.parent_run}")


def _next_steps(entry: DeadLetterEntry) -> list[tuple[str, str]]:
    if entry.status != DeadLetterStatus.OPEN:
        return [("the run", f"teamster runs show {entry.run_id}")]
    return [*entry_next_steps(entry), ("the full journal of the run", f"teamster journal {entry.run_id}")]


@dlq_app.command("show")
@handle_errors
def show_entry(entry_id: EntryId, as_json: AsJson = False) -> None:
    """Show every field of a dead-letter entry and what the operator can do next.

    Fields: error type, message, retryable, details, attempts, input, state version, trace id, escalation
    taken and the journal excerpt of the failed step. Secrets in its data are printed as `[REDACTED]`. The
    `dlq resolve` command it suggests holds a skeleton of the step's output whose every value is a
    `<fill in: ...>` placeholder: replace them before running it.

    A child step that failed because its child run did not succeed (`child_run_failed`) shows the child run's own
    entry and the command to look at it: fix the child, then retry this entry (the child is not started again).

    With `--json`: `{"entry": ENTRY, "next": [{"what": ..., "command": ...}, ...]}`, plus `"child_entry": ENTRY`
    for a `child_run_failed` entry whose child run has one.

    Examples:

    ```
    teamster dlq show run_4f2f359863da59c7ad078d44:policy_review:1
    teamster dlq show ENTRY_ID --json | jq -r '.next[].command'
    ```
    """
    client = make_client()
    entry = client.dlq.get(entry_id)
    redact = redactor(client.settings)
    child = _child_entry(client, entry)
    if as_json:
        echo_json({"entry": redacted_dump(entry, redact),
                   **({"child_entry": redacted_dump(child, redact)} if child is not None else {}),
                   "next": [{"what": what, "command": command} for what, command in _next_steps(entry)]})
        return
    _print_entry(redacted(entry, redact))
    if child is not None:
        _print_child_entry(redacted(child, redact))
    _print_parent(client, entry)
    if entry.status != DeadLetterStatus.OPEN:
        console.print(f"This entry is closed ({escape(entry.status.value)}). The run:", highlight=False)
        print_command(f"teamster runs show {entry.run_id}")
        return
    console.print("[bold]What you can do:[/]")
    for explanation, command in _next_steps(entry):
        console.print(f"  [dim]# {escape(explanation)}[/]", highlight=False)
        print_command(command)


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

    The output is validated against the step's output model. The skeleton `teamster dlq show` prints is
    refused as long as any `<fill in: ...>` placeholder is left in it.

    Examples:

    ```
    teamster dlq resolve ENTRY_ID --output '{"approved": true, "issues": []}' --by alice --wait
    teamster dlq resolve ENTRY_ID --output @review.json --reason "refund approved by finance"
    ```
    """
    data = read_json_object(output, "--output")
    _refuse_placeholders(data)
    client = make_client()
    try:
        entry = client.dlq.resolve(entry_id, data, by=require_by(by), reason=reason)
    except InvalidInput as exc:
        raise InvalidInput(exc.message, hint=f"`teamster dlq show {entry_id}` prints a skeleton of the expected "
                           "output; nothing was changed.", **exc.details) from None
    _after(client, entry, "resolved", wait, timeout)


def _refuse_placeholders(data: dict[str, Any]) -> None:
    paths = placeholder_paths(data)
    if paths:
        where = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise InvalidInput(f"--output still holds a {PLACEHOLDER} ...> placeholder at {where}",
                           hint="replace every <fill in: ...> placeholder with a real value; nothing was changed",
                           paths=paths)


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
