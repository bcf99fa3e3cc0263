"""The ``teamster`` command line: run workers, submit and inspect runs, operate the dead-letter queue.

Every error is one red line plus a hint (exit code 1); ``--debug`` shows the traceback. Start with
``teamster demo`` (offline), then ``teamster doctor`` against a real deployment.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated

import typer

from teamster.orchestrator.cli._common import console, state
from teamster.orchestrator.cli.demo import demo
from teamster.orchestrator.cli.dlq import dlq_app
from teamster.orchestrator.cli.doctor import doctor
from teamster.orchestrator.cli.embedded import redis_app
from teamster.orchestrator.cli.ops import flower, watchdog, worker
from teamster.orchestrator.cli.runs import journal, replay, runs_app, submit

__all__ = ["app", "main", "version"]

app = typer.Typer(
    name="teamster",
    help="Run LLM agents reliably on a task queue: constrained agents as idempotent Celery tasks on Redis, "
    "with a journal for every decision and a dead-letter queue for every failure.\n\n"
    "New here? Run `teamster demo` (offline, no credentials needed).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version() -> str:
    """The installed teamster version."""
    try:
        return package_version("teamster")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"teamster {version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    show_version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """Global options (given before the command: `teamster --debug runs list`)."""
    state.debug = debug


app.command("demo", rich_help_panel="Start here")(demo)
app.command("doctor", rich_help_panel="Start here")(doctor)
app.command("submit", rich_help_panel="Runs")(submit)
app.add_typer(runs_app, name="runs", rich_help_panel="Runs")
app.command("journal", rich_help_panel="Runs")(journal)
app.command("replay", rich_help_panel="Runs")(replay)
app.add_typer(dlq_app, name="dlq", rich_help_panel="Operators")
app.command("worker", rich_help_panel="Processes")(worker)
app.command("watchdog", rich_help_panel="Processes")(watchdog)
app.command("flower", rich_help_panel="Processes")(flower)
app.add_typer(redis_app, name="redis", rich_help_panel="Processes")


def main() -> None:
    """Entry point of the ``teamster`` console script."""
    app()
