"""``teamster demo``: the first-time-user experience, offline by default.

Runs an example (``ticket_triage`` by default; ``--example NAME``, see :mod:`teamster.examples`) on a temporary
local worker and watchdog, shows the batch settle, and explains every run that did not succeed with the exact
commands to inspect and act on it.
"""

from __future__ import annotations

import importlib
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from teamster.config.settings import load_settings
from teamster.errors import InvalidInput
from teamster.examples import EXAMPLES, Example
from teamster.orchestrator.cli._common import console, err_console, handle_errors
from teamster.orchestrator.cli._support import (
    Column,
    fmt_duration,
    is_settled,
    mask_url,
    new_table,
    print_table,
    redacted,
    redactor,
    resolve_command,
    styled_status,
)
from teamster.orchestrator.models import RunRecord, RunStatus
from teamster.orchestrator.processes import raise_terminated

if TYPE_CHECKING:
    from teamster.orchestrator.client import Client
    from teamster.orchestrator.watchdog import WatchdogReport

__all__ = ["demo", "demo_samples"]


def demo_samples(example: Example, count: int | None) -> list[tuple[str, dict[str, str]]]:
    """An example's sample inputs, cycled to ``count`` (labels ``T-1001``, then ``T-1001#2``... on later cycles)."""
    samples = getattr(importlib.import_module(example.module), example.samples)  # registers the workflows
    total = len(samples) if count is None else count
    out: list[tuple[str, dict[str, str]]] = []
    for i in range(total):
        sample = dict(samples[i % len(samples)])
        cycle = i // len(samples) + 1
        out.append((str(sample[example.label_field]) + (f"#{cycle}" if cycle > 1 else ""), sample))
    return out


@dataclass
class _Item:
    label: str
    run_id: str
    run: RunRecord | None = None
    retried: bool = False


def _tally(items: list[_Item]) -> dict[str, list[_Item]]:
    groups: dict[str, list[_Item]] = {"succeeded": [], "after a retry": [], "escalated": [], "needs human": [],
                                      "failed": [], "unfinished": []}
    for item in items:
        status = item.run.status if item.run else None
        if status == RunStatus.SUCCEEDED:
            groups["succeeded"].append(item)
            if item.retried:
                groups["after a retry"].append(item)
        elif status == RunStatus.ESCALATED:
            groups["escalated"].append(item)
        elif status == RunStatus.NEEDS_HUMAN:
            groups["needs human"].append(item)
        elif status in (RunStatus.FAILED, RunStatus.CANCELLED):
            groups["failed"].append(item)
        else:
            groups["unfinished"].append(item)
    return groups


def _progress_text(example: Example, groups: dict[str, list[_Item]]) -> str:
    parts = [f"{len(v)} {k}" for k, v in groups.items() if v and k not in ("unfinished", "after a retry")]
    return f"{example.verb} {example.item}s" + (f" ({', '.join(parts)})" if parts else "")


def _watch(client: Client, example: Example, items: list[_Item], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"{example.verb} {example.item}s", total=len(items))
        while True:
            for item in items:
                if item.run is None or not is_settled(item.run):
                    item.run = client.status(item.run_id)
            done = sum(1 for item in items if item.run is not None and is_settled(item.run))
            progress.update(task, completed=done, description=_progress_text(example, _tally(items)))
            if done == len(items) or time.monotonic() >= deadline:
                return
            time.sleep(0.2)


_FOLLOWED = ["step_start", "delegation_start", "delegation_result", "delegation_reused", "child_started",
             "step_parked", "child_settled", "commit", "retry", "dead_lettered", "run_succeeded"]


def _follow(client: Client, item: _Item, timeout: float) -> None:
    """Print the progress of one run as it happens: what an app gets from ``Client.events`` (and the terminal from
    ``teamster runs watch``)."""
    from teamster.orchestrator.cli.runs import _print_event  # noqa: PLC0415 - keeps `teamster --help` fast

    console.print(f"\n[bold]{escape(item.label)}[/], live (what `Client.events(run_id)` yields and "
                  f"`teamster runs watch {escape(item.run_id)}` prints):", highlight=False, soft_wrap=True)
    redact = redactor(client.settings)
    for event in client.events(item.run_id, types=_FOLLOWED, timeout=timeout):
        _print_event(redacted(event, redact))
    console.print()


def _summary(client: Client, example: Example, items: list[_Item], embedded: bool) -> None:
    for item in items:
        if item.run is not None and item.run.status == RunStatus.SUCCEEDED:
            # a child step's second attempt takes its child's result: not a retry
            item.retried = any(step.attempts > 1 and step.kind != "child" for step in client.steps(item.run_id))
    groups = _tally(items)
    shown = items if len(items) <= 20 else [
        i for i in items if i.retried or i.run is None or i.run.status != RunStatus.SUCCEEDED]
    rows: list[list[str]] = []
    for item in shown:
        run = item.run
        assert run is not None  # _watch read every run
        note = "after a retry" if item.retried else ""
        if run.error:
            note = str(run.error.get("error_type"))
        duration = (run.finished_at or run.updated_at) - run.created_at
        rows.append([escape(item.label), escape(item.run_id), styled_status(run.status.value), fmt_duration(duration),
                     escape(note)])
    print_table("[bold]runs[/]", [Column(example.item, min_width=14), Column("run id", whole=True),
                                  Column("status", whole=True), Column("duration", short="took", justify="right",
                                                                       whole=True),
                                  Column("note", min_width=16, below=True)], rows, key=1, every="every run")
    if len(shown) < len(items):
        console.print(f"[dim]({len(items) - len(shown)} more runs succeeded on the first try; "
                      "`teamster runs list` shows them)[/]")
    table = new_table("summary")
    table.add_column("outcome", no_wrap=True)
    table.add_column("runs", justify="right")
    table.add_column(f"{example.item}s", overflow="fold")
    for name, style in (("succeeded", "green"), ("after a retry", "green"), ("escalated", "magenta"),
                        ("needs human", "yellow"), ("failed", "red"), ("unfinished", "cyan")):
        if name == "unfinished" and not groups[name]:
            continue
        label = "succeeded after a retry (counted above)" if name == "after a retry" else name
        table.add_row(f"[{style}]{label}[/]", str(len(groups[name])),
                      escape(", ".join(i.label for i in groups[name])) or "-")
    console.print(table)
    console.print(f"summary: {len(groups['succeeded'])} succeeded ({len(groups['after a retry'])} after a retry), "
                  f"{len(groups['escalated'])} escalated, {len(groups['needs human'])} needs human, "
                  f"{len(groups['failed'])} failed", highlight=False)
    failed = [i for i in items if i.run is not None and i.run.status != RunStatus.SUCCEEDED]
    if failed:
        console.print("\n[bold]Why they did not succeed[/] (nothing fails silently: each has a typed reason and a "
                      "dead-letter entry):")
        for item in failed:
            assert item.run is not None
            error = item.run.error or {}
            console.print(f"  {escape(item.label)} {styled_status(item.run.status.value)} at step "
                          f"{escape(str(error.get('step', '?')))}: {escape(str(error.get('error_type', '?')))}: "
                          f"{escape(str(error.get('message', '')))}", highlight=False, soft_wrap=True)
            if error.get("dlq_entry"):
                console.print(f"      dead-letter entry: {escape(str(error['dlq_entry']))}", highlight=False,
                              soft_wrap=True)
    _next_steps(example, items, groups, embedded)


def _next_steps(example: Example, items: list[_Item], groups: dict[str, list[_Item]], embedded: bool) -> None:
    steps: list[tuple[str, str]] = []
    for item in groups["after a retry"][:1]:
        steps.append((f"{item.label}: the step timeline shows the throttled attempt and the retry",
                      f"teamster runs show {item.run_id}"))
    for item in groups["escalated"][:1] + groups["failed"][:1]:
        entry = (item.run.error or {}).get("dlq_entry") if item.run else None
        steps.append((f"{item.label}: why it stopped", f"teamster runs show {item.run_id}"))
        if entry:
            steps.append((f"{item.label}: the dead-letter entry (input, error, journal excerpt, what to do)",
                          f"teamster dlq show {entry}"))
    for item in groups["needs human"][:1]:
        entry_id = (item.run.error or {}).get("dlq_entry") if item.run else None
        if entry_id:
            steps.append((f"{item.label}: the question for a human", f"teamster dlq show {entry_id}"))
            if example.approve:  # filled in for this example: the command runs as pasted
                steps.append((f"{item.label}: answer it; the run goes on",
                              resolve_command(str(entry_id), example.approve) + " --wait"))
    pick = (groups["after a retry"] or groups["succeeded"] or items)[0]
    steps += [("everything waiting for an operator", "teamster dlq list"),
              (f"{pick.label}: every decision of the run, in order", f"teamster journal {pick.run_id}"),
              (f"{pick.label}: replay it offline from the journal (zero model calls)",
               f"teamster replay {pick.run_id}")]
    console.print("\n[bold]Where to look next:[/]")
    for comment, command in steps:
        console.print(f"  [dim]# {escape(comment)}[/]", highlight=False, soft_wrap=True)
        console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)
    if embedded:
        console.print("[dim]The data stays in the embedded Redis (AOF on): these commands work from any shell; "
                      "with --wait a temporary local worker runs the resumed step.[/]")


@handle_errors
def demo(
    example_name: Annotated[str, typer.Option("--example", "-e", help="Which example to run: " + "; ".join(
        f"`{e.name}`: {e.summary}" for e in EXAMPLES.values()) + ".", show_default=True)] = "triage",
    tickets: Annotated[int | None, typer.Option("--tickets", "-n", min=1, help="How many runs to submit (the "
                                                "example's samples, cycled). Default: each sample once.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model provider, e.g. `bedrock:MODEL-ID`. "
                                              "Default: `scripted` (offline, deterministic, free).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the batch to settle.")] = 180.0,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Threads of the local "
                                             "worker.")] = 4,
) -> None:
    """Try teamster in one command: run an example's samples on a temporary local worker.

    By default (`--example triage`) it submits the sample tickets to the `ticket_triage` workflow (classify, order
    lookup, draft reply, policy review) and shows every outcome: most succeed, one after a retry (the model was
    throttled), one is escalated because the agent cannot complete it (unknown order), one waits for a human
    (refund above the limit). `--example research` runs a supervisor agent that delegates to specialists, then a
    child workflow; it follows one run's progress live. Then it prints the exact commands to inspect and resolve
    what did not succeed.

    Offline by default: the scripted model plays the LLM. Without `TEAMSTER_REDIS_URL`, an embedded
    redis-server keeps the data (AOF) for the next commands. The worker and watchdog stop when the demo ends
    (also on Ctrl-C).

    Examples:

    ```
    teamster demo
    teamster demo --tickets 50
    teamster demo --example research
    teamster demo --model bedrock:global.anthropic.claude-sonnet-4-6
    ```
    """
    from teamster.agents.providers import check_provider  # noqa: PLC0415 - keeps `teamster --help` fast
    from teamster.config.embedded import resolve_redis_url  # noqa: PLC0415
    from teamster.orchestrator.cli.local import LocalStack, ping_workers  # noqa: PLC0415
    from teamster.orchestrator.client import Client  # noqa: PLC0415

    example = EXAMPLES.get(example_name)
    if example is None:
        raise InvalidInput(f"unknown example {example_name!r}",
                           hint="Choose one of: " + ", ".join(EXAMPLES) + " (`teamster demo --help` says what each "
                                "shows).")
    base = load_settings()
    modules = list(base.workflow_modules) + ([] if example.module in base.workflow_modules else [example.module])
    settings = load_settings(model=model or "scripted", workflow_modules=modules)
    check_provider(settings.model, settings)
    if settings.model == "scripted":
        console.print(Panel("[bold]Offline demo:[/] the [bold]scripted model[/] plays the LLM: deterministic, no API "
                            "calls, no cost, no credentials.\nIts outcomes are scripted to show every path; run "
                            "[bold]teamster demo --model bedrock:MODEL-ID[/] (or openai:, anthropic:, ollama:) for "
                            "a real model.", title="teamster demo", border_style="yellow"))
    else:
        console.print(Panel(f"teamster demo with model [bold]{escape(settings.model)}[/] (real model calls).",
                            title="teamster demo"))
    url = resolve_redis_url(settings)
    embedded = settings.redis_url is None
    if embedded:
        console.print(f"Redis: embedded redis-server at {escape(url)}; data in "
                      f"{escape(str(Path(settings.embedded_dir) / 'data'))} (AOF: kept across restarts).",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"Redis: {escape(mask_url(url))} (TEAMSTER_REDIS_URL)", highlight=False, soft_wrap=True)
        others = ping_workers(settings, url)
        if others:
            err_console.print(f"[yellow]warning:[/] {len(others)} other worker(s) on this broker may take demo steps "
                              "with their own model settings", highlight=False)
    client = Client(settings, redis_url=url)
    batch = demo_samples(example, tickets)

    def on_report(report: WatchdogReport) -> None:
        console.print(f"[dim]watchdog: {escape(str({k: v for k, v in report.as_dict().items() if v}))}[/]")

    started = time.monotonic()
    stack = LocalStack(settings, url, concurrency=concurrency, workflow_modules=modules, on_report=on_report)
    # SIGTERM (kill, a supervisor) and SIGHUP (the terminal closed) stop the demo like Ctrl-C: its worker and
    # watchdog are stopped, never left behind.
    previous = {sig: signal.signal(sig, raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            with err_console.status("starting a local worker and watchdog…"):
                stack.start()
            console.print(f"local worker {escape(stack.nodename)} and watchdog started "
                          f"({time.monotonic() - started:.1f}s); submitting {len(batch)} {example.item}s to "
                          f"{example.workflow}", highlight=False)
            key = uuid.uuid4().hex[:8]
            items = [_Item(label, client.submit(example.workflow, sample, idempotency_key=f"demo-{key}-{i}"))
                     for i, (label, sample) in enumerate(batch)]
            if example.follow:
                _follow(client, items[0], timeout)
            _watch(client, example, items, timeout)
        finally:
            stack.stop()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted:[/] the local worker and watchdog were stopped; the runs submitted so "
                          "far stay in Redis (`teamster runs list`).", highlight=False)
        raise typer.Exit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print(f"done in {time.monotonic() - started:.1f}s; the local worker and watchdog were stopped.",
                  highlight=False)
    _summary(client, example, items, embedded)
    if any(item.run is None or not is_settled(item.run) for item in items):
        err_console.print(f"[red]error[/] some runs did not settle within {timeout:.0f}s", highlight=False)
        raise typer.Exit(1)
