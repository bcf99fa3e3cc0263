"""Run commands: ``submit``, ``runs list``, ``runs show``, ``journal``, ``replay``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from teamster.errors import InvalidInput
from teamster.orchestrator.cli._common import console, err_console, handle_errors
from teamster.orchestrator.cli._events import summarize_event
from teamster.orchestrator.cli._support import (
    fmt_duration,
    fmt_time,
    fmt_when,
    make_client,
    new_table,
    print_commands,
    print_run_outcome,
    read_json_arg,
    run_duration,
    run_next_steps,
    short_json,
    styled_status,
)
from teamster.orchestrator.models import RunStatus, StepRecord
from teamster.orchestrator.workflow import get_workflow

__all__ = ["runs_app", "submit", "journal", "replay", "REPLAY_DIFFERS"]

REPLAY_DIFFERS = 3
"""Exit code of ``teamster replay`` when the replay differs from the recording."""

runs_app = typer.Typer(help="List runs and show one run with its step timeline.", no_args_is_help=True,
                       rich_markup_mode="markdown")


@handle_errors
def submit(
    workflow: Annotated[str, typer.Argument(metavar="WORKFLOW",
                                            help="Registered workflow name, e.g. `ticket_triage`.")],
    input_: Annotated[str, typer.Option("--input", "-i", help="Run input: JSON text, `@file.json`, or `@-` for stdin.",
                                        show_default=False)],
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", "-k",
        help="The same key returns the same run id instead of starting a second run.")] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until the run is final or waits for an operator, "
                                       "then print its output or its typed failure reason.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits (the run goes on afterwards).")] = 120.0,
) -> None:
    """Start a run of WORKFLOW and print its run id.

    The input is validated against the workflow's input model before anything is written; an invalid input
    is refused with the fields at fault. With `--wait`, when no worker is running and teamster uses the
    embedded development Redis, a temporary local worker is started for the run.

    Exit codes: 0 submitted (with `--wait`: succeeded), 1 error or the run did not succeed.

    Examples:

    ```
    teamster submit ticket_triage --input @ticket.json
    teamster submit ticket_triage -k T-42 --wait --input '{"ticket_id": "T-42", "customer": "Ada",
      "subject": "Order", "body": "Where is order A1001?"}'
    ```
    """
    value = read_json_arg(input_, "--input")
    client = make_client()
    try:
        run_id = client.submit(workflow, value, idempotency_key=idempotency_key)
    except InvalidInput as exc:
        fields = ", ".join(get_workflow(workflow).input_model.model_fields)
        raise InvalidInput(exc.message, hint=f"{workflow} expects a JSON object with: {fields}. Nothing was submitted.",
                           **exc.details) from None
    console.print(run_id, highlight=False)
    if not wait:
        err_console.print(f"[dim]follow it with[/] teamster runs show {escape(run_id)}", highlight=False)
        return
    from teamster.orchestrator.cli.local import await_run  # noqa: PLC0415 - keeps `teamster --help` fast

    run = await_run(client, run_id, timeout)
    if not print_run_outcome(run):
        raise typer.Exit(1)


def _statuses(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    known = [s.value for s in RunStatus]
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part not in known:
                raise typer.BadParameter(f"unknown status {part!r}; use one of: {', '.join(known)}",
                                         param_hint="--status")
            out.append(part)
    return out


@runs_app.command("list")
@handle_errors
def list_runs(
    status: Annotated[list[str] | None, typer.Option(
        "--status", "-s", help="Only runs with this status (repeat, or comma-separate).")] = None,
    workflow: Annotated[str | None, typer.Option("--workflow", "-w", help="Only runs of this workflow.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many runs.")] = 20,
) -> None:
    """List recent runs, newest first.

    Examples:

    ```
    teamster runs list
    teamster runs list --status needs_human,escalated --workflow ticket_triage -n 50
    ```
    """
    wanted = _statuses(status)
    runs = make_client(load_modules=False).runs(limit=limit, status=wanted, workflow=workflow)
    if not runs:
        console.print("no runs" + (" match" if wanted or workflow else " yet: start one with `teamster submit` "
                                   "or `teamster demo`"))
        return
    table = new_table(f"{len(runs)} run(s), newest first")
    table.add_column("run id", overflow="fold", no_wrap=True)
    table.add_column("workflow")
    table.add_column("created", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("status (error type)")
    for run in runs:
        error_type = str((run.error or {}).get("error_type") or "")
        shown = styled_status(run.status.value)
        if error_type and error_type != run.status.value:
            shown += f" ({escape(error_type)})"
        table.add_row(escape(run.run_id), escape(run.workflow), fmt_when(run.created_at), run_duration(run), shown)
    console.print(table)


def _print_steps(steps: list[StepRecord]) -> None:
    """The step timeline; in a narrow terminal the reasons follow the table instead of a squeezed column."""
    wide = console.width >= 120
    table = new_table("steps")
    table.add_column("step", no_wrap=True, overflow="fold")
    table.add_column("kind")
    table.add_column("status", no_wrap=True)
    for name in ("attempts", "duration", "model calls", "tokens"):
        table.add_column(name, justify="right")
    table.add_column("worker", overflow="fold")
    if wide:
        table.add_column("reason", overflow="fold")
    for step in steps:
        cells = [escape(step.step_key), step.kind, styled_status(step.status.value), str(step.attempts),
                 fmt_duration(step.duration_seconds), str(step.model_calls), str(step.tokens),
                 escape(step.worker or "-")]
        table.add_row(*cells, *([escape(short_json(step.reason or "", 90))] if wide else []))
    console.print(table)
    if not wide:
        for step in steps:
            if step.reason:
                console.print(f"  [bold]{escape(step.step_key)}[/] reason: {escape(step.reason)}", highlight=False,
                              soft_wrap=True)


@runs_app.command("show")
@handle_errors
def show_run(run_id: Annotated[str, typer.Argument(metavar="RUN_ID",
                                                   help="The run id (`teamster runs list` shows them).")]) -> None:
    """Show a run: its header, a timeline of its steps, and its output or typed error.

    For a run that failed or waits for an operator, the dead-letter entry and the next command to run are
    printed.

    Example:

    ```
    teamster runs show run_d91008822a5d583a92d52c54
    ```
    """
    client = make_client()
    run = client.status(run_id)
    steps = client.steps(run_id)
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column(overflow="fold")
    header.add_row("run", escape(run.run_id))
    header.add_row("workflow", f"{escape(run.workflow)} (version {escape(run.workflow_version)})")
    header.add_row("status", styled_status(run.status.value))
    header.add_row("created", fmt_time(run.created_at))
    header.add_row("finished" if run.finished_at else "updated", fmt_time(run.finished_at or run.updated_at))
    header.add_row("duration", run_duration(run))
    header.add_row("state version", str(run.state_version))
    header.add_row("trace id", escape(run.trace_id or "-"))
    if run.idempotency_key:
        header.add_row("idempotency key", escape(run.idempotency_key))
    console.print(header)
    _print_steps(steps)
    if run.status == RunStatus.SUCCEEDED:
        console.print("[bold]output:[/]")
        console.print_json(json.dumps(run.output or {}, default=str))
        return
    if run.error:
        error = run.error
        console.print(f"[bold]error:[/] [red]{escape(str(error.get('error_type', '?')))}[/]: "
                      f"{escape(str(error.get('message', '')))}", highlight=False, soft_wrap=True)
        if error.get("step"):
            console.print(f"  step: {escape(str(error['step']))}", highlight=False)
        if error.get("dlq_entry"):
            console.print(f"  dead-letter entry: {escape(str(error['dlq_entry']))}", highlight=False, soft_wrap=True)
    print_commands(run_next_steps(run)[1:])


@runs_app.command("wait")
@handle_errors
def wait_run(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait (the run goes on afterwards).")] = 120.0,
) -> None:
    """Wait until a run is final or waits for an operator, then print its output or typed reason.

    Like `--wait` on `submit`: on the embedded development Redis with no worker running, a temporary local
    worker runs it. Exit code 0 when the run succeeded, 1 otherwise.

    Example:

    ```
    teamster runs wait RUN_ID --timeout 300
    ```
    """
    client = make_client()
    from teamster.orchestrator.cli.local import await_run  # noqa: PLC0415 - keeps `teamster --help` fast

    if not print_run_outcome(await_run(client, run_id, timeout)):
        raise typer.Exit(1)


@handle_errors
def journal(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    step: Annotated[str | None, typer.Option("--step", "-s",
                                             help="Only events of this step (e.g. `classify`).")] = None,
    types: Annotated[list[str] | None, typer.Option(
        "--type", "-t", help="Only events of this type (repeat, or comma-separate), e.g. `model_call`.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON lines (one event per line).")] = False,
) -> None:
    """Print a run's journal: every decision in order (model calls, tool calls, validations, retries, commits).

    Examples:

    ```
    teamster journal RUN_ID
    teamster journal RUN_ID --step classify --type model_call,outcome
    teamster journal RUN_ID --json | jq .type
    ```
    """
    wanted = [t.strip() for value in types or [] for t in value.split(",") if t.strip()] or None
    events = make_client(load_modules=False).journal(run_id, step=step, types=wanted)
    if as_json:
        for event in events:
            typer.echo(event.model_dump_json())
        return
    if not events:
        console.print("no journal events match")
        return
    table = new_table(f"journal of {escape(run_id)}: {len(events)} event(s)")
    table.add_column("time", no_wrap=True)
    table.add_column("step", no_wrap=True, overflow="fold")
    table.add_column("attempt", justify="right")
    table.add_column("type", no_wrap=True)
    table.add_column("data", overflow="fold", min_width=20)
    for event in events:
        table.add_row(fmt_time(event.ts)[11:] + f".{int(event.ts * 1000) % 1000:03d}", escape(event.step or "-"),
                      str(event.attempt) if event.attempt is not None else "", escape(event.type),
                      escape(summarize_event(event.type, event.data)))
    console.print(table)


@handle_errors
def replay(run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")]) -> None:
    """Replay a run offline from its journal, with zero model calls, and compare every step's outcome.

    Each step's final attempt is re-executed with the current code against the recorded model responses
    and tool results. Exit code 0 when the replay is identical, 3 when anything differs (a changed prompt,
    agent version, tool set or step logic shows up here).

    Example:

    ```
    teamster replay RUN_ID
    ```
    """
    report = make_client().replay(run_id)
    table = new_table(f"replay of {escape(run_id)} ({escape(report.workflow)})")
    table.add_column("step")
    table.add_column("kind")
    table.add_column("recorded")
    table.add_column("replayed")
    table.add_column("same?")
    table.add_column("differences", overflow="fold")
    reused = 0
    for item in report.steps:
        reused += item.model_calls_replayed
        table.add_row(escape(item.step_key), item.kind, escape(str((item.recorded or {}).get("kind", "-"))),
                      escape(str((item.replayed or {}).get("kind", "-"))),
                      "[green]yes[/]" if item.same else "[red]no[/]",
                      escape("; ".join(item.differences)) or "-")
    console.print(table)
    needed = report.live_model_calls
    verdict = "[green]identical[/]" if report.identical else "[red]differs from the recording[/]"
    console.print(f"{len(report.steps)} step(s) replayed, {reused} recorded model response(s) reused, "
                  f"live model calls: 0"
                  + (f" ({needed} more would have been needed)" if needed else "") + f"; {verdict}", highlight=False)
    if not report.identical:
        raise typer.Exit(REPLAY_DIFFERS)

