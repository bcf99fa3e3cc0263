"""Run commands: ``submit``, ``runs list``, ``runs show``, ``runs wait``, ``runs watch``, ``runs cancel``,
``runs budget``, ``journal``, ``replay``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from teamster.errors import InvalidInput, InvalidOperation
from teamster.orchestrator.cli._common import console, err_console, handle_errors
from teamster.orchestrator.cli._events import summarize_event
from teamster.orchestrator.cli._support import (
    AsJson,
    Column,
    echo_json,
    fmt_clock,
    fmt_duration,
    fmt_time,
    fmt_when,
    make_client,
    print_commands,
    print_json_block,
    print_note,
    print_run_outcome,
    print_table,
    read_json_arg,
    redacted,
    redacted_dump,
    redactor,
    require_by,
    run_duration,
    run_next_steps,
    styled_status,
)
from teamster.orchestrator.models import JournalEvent, RunStatus, StepRecord, StepStatus
from teamster.orchestrator.workflow import get_workflow

__all__ = ["runs_app", "submit", "journal", "replay", "REPLAY_DIFFERS", "INTERRUPTED"]

REPLAY_DIFFERS = 3
"""Exit code of ``teamster replay`` when the replay differs from the recording."""

runs_app = typer.Typer(help="List runs, show one run with its step timeline and spend, wait for a run, watch its "
                       "events live, cancel a run, change a run's budget.",
                       no_args_is_help=True, rich_markup_mode="markdown")


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
    as_json: AsJson = False,
) -> None:
    """List recent runs, newest first.

    With `--json`: a JSON array of run records (input, state and output included, secrets redacted).

    Examples:

    ```
    teamster runs list
    teamster runs list --status needs_human,escalated --workflow ticket_triage -n 50
    teamster runs list --json | jq -r '.[].run_id'
    ```
    """
    wanted = _statuses(status)
    client = make_client(load_modules=False)
    runs = client.runs(limit=limit, status=wanted, workflow=workflow)
    if as_json:
        redact = redactor(client.settings)
        echo_json([redacted_dump(run, redact) for run in runs])
        return
    if not runs:
        console.print("no runs" + (" match" if wanted or workflow else " yet: start one with `teamster submit` "
                                   "or `teamster demo`"))
        return
    rows = []
    for run in runs:
        error_type = str((run.error or {}).get("error_type") or "")
        shown = styled_status(run.status.value)
        if error_type and error_type != run.status.value:
            shown += f" ({escape(error_type)})"
        rows.append([escape(run.run_id), escape(run.workflow), fmt_when(run.created_at), run_duration(run), shown])
    print_table(f"[bold]{len(runs)} run(s), newest first[/]", [
        Column("run id", whole=True),
        Column("workflow", min_width=8),
        Column("created", whole=True),
        Column("duration", short="took", justify="right", whole=True),
        Column("status (error type)", short="status", min_width=11),
    ], rows)


def _retry_lines(steps: list[StepRecord], retries: list[JournalEvent]) -> list[str]:
    """Why each retried step was retried: one line per earlier attempt (from the journal's ``retry`` events)."""
    lines: list[str] = []
    for step in steps:
        if step.attempts <= 1:
            continue
        for event in retries:
            if event.step != step.step_key:
                continue
            data = event.data
            attempt = event.attempt if event.attempt is not None else int(data.get("next_attempt") or 2) - 1
            delay = data.get("delay_seconds")
            error_type, message = escape(str(data.get("error_type", "?"))), escape(str(data.get("message", "")))
            lines.append(f"[bold]{escape(step.step_key)}[/]: attempt {attempt} retried after [yellow]{error_type}[/]: "
                         f"{message}" + (f" (retry in {fmt_duration(float(delay))})"
                                         if isinstance(delay, int | float) else ""))
    return lines


def _waiting(step: StepRecord) -> bool:
    return step.status == StepStatus.RUNNING and bool(step.waiting_for)


def _status_cell(step: StepRecord) -> str:
    """``waiting`` for a running step that waits for provider capacity: it is not calling anything."""
    return styled_status("waiting") if _waiting(step) else styled_status(step.status.value)


def _reason_cell(step: StepRecord, children: dict[str, RunStatus | None]) -> str:
    if step.child_run:
        status = children.get(step.child_run)
        text = f"child run {step.child_run} ({status.value if status else 'gone'})"
        if step.status not in (StepStatus.PARKED, StepStatus.SUCCEEDED, StepStatus.QUEUED) and step.reason:
            text += f"; {step.reason}"
        return escape(text)
    if _waiting(step):
        since = f" for {fmt_duration(max(0.0, time.time() - step.waiting_since))}" if step.waiting_since else ""
        return escape(f"waiting{since} ({step.waiting_for})")
    return escape(step.reason or "")


def _cost(value: float) -> str:
    return "" if not value else f"{value:.4f}" if value < 100 else f"{value:,.2f}"


def _delegations(events: list[JournalEvent]) -> dict[str, list[dict[str, Any]]]:
    """The delegated calls of each step, from the journal: step key -> one summary per nested step, in order."""
    nested: dict[str, dict[str, Any]] = {}
    for event in events:
        if not event.step or "/" not in event.step:
            continue
        item = nested.setdefault(event.step, {"step_key": event.step, "agent": event.data.get("agent"),
                                              "status": "running", "attempts": set(), "live_model_calls": 0,
                                              "tokens": 0, "duration_seconds": None, "reused": 0})
        item["attempts"].add(event.attempt)
        if event.type == "delegation_result":
            item["status"] = str(event.data.get("status"))
            item["live_model_calls"] += int(event.data.get("live_model_calls") or 0)
            item["tokens"] += int((event.data.get("usage") or {}).get("totalTokens", 0))
            item["duration_seconds"] = event.data.get("duration_seconds")
        elif event.type == "delegation_reused":
            item["reused"] += 1
            item["status"] = str(event.data.get("status") or item["status"])
        elif event.type == "delegation_start":
            item["status"] = "running"
    out: dict[str, list[dict[str, Any]]] = {}
    for key, item in nested.items():
        item["attempts"] = len(item["attempts"])
        out.setdefault(key.split("/", 1)[0], []).append(item)
    return out


def _print_steps(steps: list[StepRecord], retries: list[JournalEvent],
                 delegations: dict[str, list[dict[str, Any]]] | None = None,
                 children: dict[str, RunStatus | None] | None = None) -> None:
    """The step timeline. When the console is narrow, the reason and worker columns follow the table instead of
    squeezing it; the reasons of earlier attempts of retried steps follow it too. Model calls, tokens and cost are
    what the step spent over all its attempts (replayed answers cost nothing); a child step's reason names its child
    run and that run's status now."""
    rows: list[list[str]] = []
    for step in steps:
        rows.append([escape(step.step_key), escape(step.kind), _status_cell(step), str(step.attempts),
                     fmt_duration(step.duration_seconds), str(step.spend_calls), str(step.spend_tokens),
                     _cost(step.spend_cost), escape(step.worker or "-"), _reason_cell(step, children or {})])
        for item in (delegations or {}).get(step.step_key, []):  # its delegated calls, as nested steps
            duration = item["duration_seconds"]
            rows.append([escape(item["step_key"]), "delegate", styled_status(item["status"]), str(item["attempts"]),
                         fmt_duration(float(duration)) if isinstance(duration, int | float) else "-",
                         str(item["live_model_calls"]), str(item["tokens"]), "", "",
                         f"reused {item['reused']}x from the journal" if item["reused"] else ""])
    print_table("[bold]steps[/]", [
        Column("step", whole=True),
        Column("kind", whole=True),
        Column("status", whole=True),
        Column("attempts", short="tries", justify="right", whole=True),
        Column("duration", short="took", justify="right", whole=True),
        Column("model calls", short="calls", justify="right", whole=True),
        Column("tokens", justify="right", whole=True),
        Column("cost", justify="right", whole=True, below=True),
        Column("worker", whole=True, below=True),
        Column("reason", min_width=30, below=True),
    ], rows, every="every step")
    for line in _retry_lines(steps, retries):
        print_note(line)


def _retry_data(step: StepRecord, retries: list[JournalEvent]) -> list[dict[str, Any]]:
    return [{"attempt": event.attempt, **event.data} for event in retries if event.step == step.step_key]


@runs_app.command("show")
@handle_errors
def show_run(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id (`teamster runs list` shows them).")],
    as_json: AsJson = False,
) -> None:
    """Show a run: its header, a timeline of its steps, and its output or typed error.

    A retried step is followed by why each earlier attempt was retried. For a run that failed or waits for an
    operator, the dead-letter entry and the next command to run are printed. Secrets in the run's data (API
    keys, bearer tokens, secret-named fields) are printed as `[REDACTED]`.

    A step waiting for provider capacity (shared limits, a cool-down after a 429, an open circuit breaker) shows
    as `waiting`, with what it waits for and since when. A child step names its child run and that run's status
    (`parked` while the child runs); a child run names its parent run and step. The run's spend (model calls,
    tokens, cost over all its steps, retries and escalations) is shown against its budget; each step's over all its
    attempts.

    An agent step's delegated calls (agents it called as tools) follow it as nested steps, `STEP/AGENT#N`, with
    their status, model calls and tokens (`teamster journal RUN_ID` has every event of them).

    With `--json`: `{"run": RUN, "spend": SPEND, "steps": [STEP, ...]}`, each step with its `retries` (the
    journal's retry events: attempt, error_type, message, delay_seconds, next_attempt) and its `delegations`, and a
    child step with `child` (`run_id`, `status`).

    Examples:

    ```
    teamster runs show run_d91008822a5d583a92d52c54
    teamster runs show RUN_ID --json | jq '.steps[] | {step_key, status, attempts}'
    ```
    """
    client = make_client()
    redact = redactor(client.settings)
    run = client.status(run_id)
    steps = client.steps(run_id)
    delegation_types = ("delegation_start", "delegation_result", "delegation_reused")
    events = client.journal(run_id, types=["retry", *delegation_types])  # one read of the stream for both
    retries = [event for event in events if event.type == "retry"]
    delegations = _delegations([event for event in events if event.type in delegation_types])
    spend = client.spend(run_id)
    children = client.runtime.store.run_statuses(step.child_run for step in steps if step.child_run)
    if as_json:
        echo_json({"run": redacted_dump(run, redact), "spend": spend,
                   "steps": [{**redacted_dump(step, redact), "retries": redact(_retry_data(step, retries)),
                              "delegations": delegations.get(step.step_key, []),
                              **({"child": {"run_id": step.child_run, "status": _value(children.get(step.child_run))}}
                                 if step.child_run else {})}
                             for step in steps]})
        return
    run = redacted(run, redact)
    steps = [redacted(step, redact) for step in steps]
    retries = [redacted(event, redact) for event in retries]
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold", no_wrap=True)
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
    header.add_row("spent", _spend_text(spend) + (f" of {_budget_text(run.budget)}" if run.budget else ""))
    if run.tenant:
        header.add_row("tenant", escape(run.tenant))
    if run.parent_run:
        header.add_row("parent run", f"{escape(run.parent_run)} (step {escape(run.parent_step or '?')})")
    console.print(header)
    _print_steps(steps, retries, delegations, children)
    child_commands = [f"teamster runs show {child}" for child, status in children.items()
                      if status not in (RunStatus.SUCCEEDED, None)]
    if run.status == RunStatus.SUCCEEDED:
        console.print("[bold]output:[/]")
        print_json_block(run.output or {})
        return
    if run.error:
        error = run.error
        console.print(f"[bold]error:[/] [red]{escape(str(error.get('error_type', '?')))}[/]: "
                      f"{escape(str(error.get('message', '')))}", highlight=False)
        if error.get("step"):
            print_note(f"step: {escape(str(error['step']))}")
        if error.get("dlq_entry"):
            print_note(f"dead-letter entry: {escape(str(error['dlq_entry']))}")
    print_commands(child_commands + run_next_steps(run)[1:])


def _value(status: RunStatus | None) -> str | None:
    return status.value if status is not None else None


def _spend_text(spend: dict[str, float]) -> str:
    calls = int(spend.get("model_calls", 0))
    text = f"{calls} model call{'s' if calls != 1 else ''}, {int(spend.get('tokens', 0))} tokens"
    cost = float(spend.get("cost", 0.0))
    return text + (f", cost {_cost(cost)}" if cost else "")


def _budget_text(budget: dict[str, Any]) -> str:
    parts = []
    if budget.get("max_model_calls") is not None:
        parts.append(f"{budget['max_model_calls']} model calls")
    if budget.get("max_tokens") is not None:
        parts.append(f"{budget['max_tokens']} tokens")
    if budget.get("max_cost") is not None:
        parts.append(f"cost {budget['max_cost']:g}")
    return "a budget of " + ", ".join(parts) if parts else "no budget"


@runs_app.command("budget")
@handle_errors
def set_budget(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    max_model_calls: Annotated[int | None, typer.Option(
        "--max-model-calls", min=1, help="Live model calls the whole run may make.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Tokens (in + out) of the whole run.")]
    = None,
    max_cost: Annotated[float | None, typer.Option(
        "--max-cost", help="Cost of the whole run, above 0 (TEAMSTER_MODEL_PRICES' currency).")] = None,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="Remove the run's budget.")] = False,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the journal).")] = "budget changed",
    by: Annotated[str | None, typer.Option(
        "--by", envvar="USER", show_envvar=True, help="Who changes it (recorded in the journal); defaults to $USER.")]
    = None,
) -> None:
    """Replace a run's budget: what the whole run may spend from now on, counting what it already spent.

    A step refused by the old budget ends as a `run_budget_exceeded` dead-letter entry: raise the budget here, then
    retry the entry (`teamster dlq retry ENTRY_ID`). Steps that start afterwards use the new budget. The change is
    journaled (`budget_changed`, with who, why, the old budget and the spend so far). Limits you do not give are
    unbounded.

    Examples:

    ```
    teamster runs budget RUN_ID --max-model-calls 40 --reason "long document" --by alice
    teamster runs budget RUN_ID --max-cost 2.5
    teamster runs budget RUN_ID --unlimited --reason "approved by finance"
    ```
    """
    from teamster.agents.limits import RunBudget  # noqa: PLC0415 - keeps `teamster --help` fast

    who = require_by(by)
    given = {"max_model_calls": max_model_calls, "max_tokens": max_tokens, "max_cost": max_cost}
    if unlimited == any(value is not None for value in given.values()):
        raise InvalidInput("give --unlimited, or at least one of --max-model-calls, --max-tokens, --max-cost "
                           "(not both)", hint=f"e.g. `teamster runs budget {run_id} --max-model-calls 40`")
    if max_cost is not None and not max_cost > 0:
        raise InvalidInput(f"--max-cost must be above 0, not {max_cost:g}", hint="Or remove the budget: --unlimited.")
    budget = None if unlimited else RunBudget(**{k: v for k, v in given.items() if v is not None})
    client = make_client(load_modules=False)
    run = client.set_budget(run_id, budget, by=who, reason=reason)
    spend = client.spend(run_id)
    console.print(f"run {escape(run.run_id)}: {_budget_text(run.budget) if run.budget else 'no budget'} "
                  f"(spent so far: {_spend_text(spend)})", highlight=False)
    entry = (run.error or {}).get("dlq_entry")
    if entry and (run.error or {}).get("error_type") == "run_budget_exceeded":
        print_commands([f"teamster dlq retry {entry} --by {who} --wait"])
    else:
        print_commands([f"teamster runs show {run.run_id}"])


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


INTERRUPTED = 130
"""Exit code of ``teamster runs watch`` stopped with Ctrl-C (the run goes on)."""

_EVENT_STYLE = {"run_succeeded": "green", "dead_lettered": "red", "retry": "yellow", "run_cancelled": "dim",
                "commit_rejected": "yellow", "lease_expired": "yellow"}


def _print_event(event: JournalEvent) -> None:
    """One journal event as it arrives: time, type, then the step (with its attempt) and a summary, wrapped under
    itself in a narrow terminal."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, style="dim")
    grid.add_column(no_wrap=True, min_width=15)
    grid.add_column(overflow="fold")
    where = (event.step or "") + (f" #{event.attempt}" if event.attempt is not None and event.step else "")
    summary = summarize_event(event.type, event.data)
    text = Text(f"{where}: " if where and summary else where, style="bold")
    text.append(summary)
    grid.add_row(fmt_clock(event.ts),
                 Text(event.type, style=_EVENT_STYLE.get(event.type, "")), text)
    console.print(grid)


@runs_app.command("watch")
@handle_errors
def watch_run(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per event and line (secrets "
                                          "redacted), nothing else on stdout.")] = False,
    after: Annotated[str | None, typer.Option(
        "--after", metavar="EVENT_ID", help="Start after this event id (the last one you saw), instead of at the "
        "run's first event.")] = None,
) -> None:
    """Print a run's journal live, one line per event as it is written, until the run settles.

    Starts with the events already written, then waits for each new one (no polling). When the run succeeds,
    fails, is cancelled or waits for an operator, prints its output or its typed reason and the next commands,
    like `teamster runs wait`. Ctrl-C stops watching; the run goes on.

    With `--json`: each event whole (`id`, `type`, `ts`, `step`, `attempt`, `data`), one JSON object per line; the
    exit code says how the run ended. Resume an interrupted watch with `--after` the last `id` seen.

    Exit codes: 0 the run succeeded, 1 it did not (or an error), 130 stopped with Ctrl-C.

    Examples:

    ```
    teamster runs watch RUN_ID
    teamster runs watch RUN_ID --json | jq -r '[.id, .type, .step] | @tsv'
    teamster runs watch RUN_ID --after 1718000000000-3
    ```
    """
    try:
        client = make_client()
        redact = redactor(client.settings)
        for event in client.events(run_id, after=after):
            event = redacted(event, redact)
            if as_json:
                typer.echo(event.model_dump_json())
            else:
                _print_event(event)
        run = client.status(run_id)
    except KeyboardInterrupt:
        err_console.print(f"stopped watching; run {escape(run_id)} goes on", highlight=False)
        raise typer.Exit(INTERRUPTED) from None
    if as_json:
        if run.status != RunStatus.SUCCEEDED:
            raise typer.Exit(1)
        return
    if not print_run_outcome(run):
        raise typer.Exit(1)


@runs_app.command("cancel")
@handle_errors
def cancel_run(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (required; recorded in the journal and as the "
                                        "run's error).", show_default=False)],
    by: Annotated[str | None, typer.Option(
        "--by", envvar="USER", show_envvar=True, help="Who cancels (recorded in the journal); defaults to $USER.")]
    = None,
) -> None:
    """Cancel a run that is not final: it ends as `cancelled`, and so does every step not yet finished.

    Its child runs that are not final are cancelled with it, recursively. A child run cancelled on its own lets its
    parent's step go on: it fails with `child_run_failed` (and its escalation policy runs).

    A step a worker is running when the run is cancelled cannot commit its result. A run that already
    succeeded, failed or was cancelled is refused (exit code 1).

    Example:

    ```
    teamster runs cancel RUN_ID --reason "customer withdrew the ticket" --by alice
    ```
    """
    who = require_by(by)
    client = make_client(load_modules=False)
    try:
        run = client.cancel(run_id, reason=reason, by=who)
    except InvalidOperation as exc:
        raise InvalidOperation(exc.message, hint=f"Only a run that is not final can be cancelled: "
                               f"`teamster runs show {run_id}` shows its status and outcome.", **exc.details) from None
    run = redacted(run, redactor(client.settings))
    console.print(f"run {escape(run.run_id)} is now {styled_status(run.status.value)}", highlight=False)
    message = (run.error or {}).get("message")
    if message:
        print_note(f"reason: {escape(str(message))}")
    print_commands([f"teamster runs show {run.run_id}"])


@handle_errors
def journal(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    step: Annotated[str | None, typer.Option("--step", "-s",
                                             help="Only events of this step (e.g. `classify`).")] = None,
    types: Annotated[list[str] | None, typer.Option(
        "--type", "-t", help="Only events of this type (repeat, or comma-separate), e.g. `model_call`.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON lines (one event per line, secrets "
                                          "redacted).")] = False,
) -> None:
    """Print a run's journal: every decision in order (model calls, tool calls, validations, retries, commits).

    The table summarises each event's data (long text is cut, marked `[+N chars]`); `--json` prints every event
    whole, one JSON object per line.

    Examples:

    ```
    teamster journal RUN_ID
    teamster journal RUN_ID --step classify --type model_call,outcome
    teamster journal RUN_ID --json | jq .type
    ```
    """
    wanted = [t.strip() for value in types or [] for t in value.split(",") if t.strip()] or None
    client = make_client(load_modules=False)
    redact = redactor(client.settings)
    events = [redacted(event, redact) for event in client.journal(run_id, step=step, types=wanted)]
    if as_json:
        for event in events:
            typer.echo(event.model_dump_json())
        return
    if not events:
        console.print("no journal events match")
        return
    rows = [[fmt_clock(event.ts), escape(event.step or "-"),
             str(event.attempt) if event.attempt is not None else "", escape(event.type),
             escape(summarize_event(event.type, event.data))] for event in events]
    print_table(f"[bold]journal of {escape(run_id)}: {len(events)} event(s)[/]", [
        Column("time", whole=True),
        Column("step", whole=True),
        Column("attempt", short="try", justify="right", whole=True),
        Column("type", whole=True),
        Column("data", min_width=20),
    ], rows)


@handle_errors
def replay(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the replay report as one JSON document (the exit "
                                          "code is the same).")] = False,
) -> None:
    """Replay a run offline from its journal, with zero model calls, and compare every step's outcome.

    Each step's final attempt is re-executed with the current code against the recorded model responses
    and tool results. Exit code 0 when the replay is identical, 3 when anything differs (a changed prompt,
    agent version, tool set or step logic shows up here).

    With `--json`: the report (`run_id`, `workflow`, `identical`, `live_model_calls`, and `steps` with each
    step's recorded and replayed outcome and its differences).

    Examples:

    ```
    teamster replay RUN_ID
    teamster replay RUN_ID --json | jq '.steps[] | select(.same | not)'
    ```
    """
    client = make_client()
    report = client.replay(run_id)
    redact = redactor(client.settings)
    if as_json:
        echo_json({**redacted_dump(report, redact), "identical": report.identical,
                   "live_model_calls": report.live_model_calls})
        if not report.identical:
            raise typer.Exit(REPLAY_DIFFERS)
        return
    shown = redacted(report, redact)
    rows = [[escape(item.step_key), escape(item.kind), escape(str((item.recorded or {}).get("kind", "-"))),
             escape(str((item.replayed or {}).get("kind", "-"))), "[green]yes[/]" if item.same else "[red]no[/]",
             escape("; ".join(item.differences)) or "-"] for item in shown.steps]
    print_table(f"[bold]replay of {escape(run_id)} ({escape(report.workflow)})[/]", [
        Column("step", whole=True),
        Column("kind", whole=True),
        Column("recorded", whole=True),
        Column("replayed", whole=True),
        Column("same?", whole=True),
        Column("differences", min_width=20, below=True),
    ], rows)
    reused = sum(item.model_calls_replayed for item in report.steps)
    needed = report.live_model_calls
    verdict = "[green]identical[/]" if report.identical else "[red]differs from the recording[/]"
    console.print(f"{len(report.steps)} step(s) replayed, {reused} recorded model response(s) reused, "
                  f"live model calls: 0"
                  + (f" ({needed} more would have been needed)" if needed else "") + f"; {verdict}", highlight=False)
    if not report.identical:
        raise typer.Exit(REPLAY_DIFFERS)
