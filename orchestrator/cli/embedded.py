"""``teamster redis start|stop|status``: the embedded development Redis, a server with its own lifecycle."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape

from teamster.config.settings import load_settings
from teamster.orchestrator.cli._common import console, handle_errors

__all__ = ["redis_app"]

redis_app = typer.Typer(
    help="The embedded development Redis (used when TEAMSTER_REDIS_URL is not set): start, stop, status. It keeps "
    "running after the command that started it exits, so workers, Flower and every shell find it at the same "
    "address; its data (AOF) survive a stop.",
    no_args_is_help=True, rich_markup_mode="markdown")


@redis_app.command("status")
@handle_errors
def status(as_json: Annotated[bool, typer.Option("--json", help="Print the status as one JSON object.")] = False,
           ) -> None:
    """Say whether the embedded development Redis runs: its URL, pid, data directory and log.

    Exit code 0 when it runs, 1 when it does not.
    """
    from teamster.config.embedded import embedded_status  # noqa: PLC0415 - keeps `teamster --help` fast

    settings = load_settings()
    info = embedded_status(settings)
    if as_json:
        typer.echo(json.dumps({"running": info is not None, "embedded_dir": str(settings.embedded_dir),
                               **(info or {})}))
    elif info is None:
        console.print(f"the embedded Redis is not running (directory {escape(str(settings.embedded_dir))}); "
                      "`teamster redis start` starts it (any command that needs it does too)", highlight=False,
                      soft_wrap=True)
    else:
        since = info.get("since")
        console.print(f"the embedded Redis runs at {escape(str(info['url']))} (pid {info.get('pid')}"
                      + (f", since {datetime.fromtimestamp(float(str(since))):%Y-%m-%d %H:%M:%S}" if since else "")
                      + f")\n  data: {escape(str(info['data']))}\n  log:  {escape(str(info['log']))}",
                      highlight=False, soft_wrap=True)
    if info is None:
        raise typer.Exit(1)


@redis_app.command("start")
@handle_errors
def start() -> None:
    """Start the embedded development Redis (AOF on, noeviction) if it is not running, and print its URL."""
    from teamster.config.embedded import start_embedded  # noqa: PLC0415

    settings = load_settings()
    url, started = start_embedded(settings)
    console.print(f"{'started' if started else 'already running:'} the embedded Redis at {escape(url)} (data in "
                  f"{escape(str(settings.embedded_dir / 'data'))})", highlight=False, soft_wrap=True)


@redis_app.command("stop")
@handle_errors
def stop() -> None:
    """Stop the embedded development Redis. Its data stay (AOF): the next start finds them again."""
    from teamster.config.embedded import stop_embedded  # noqa: PLC0415

    settings = load_settings()
    if stop_embedded(settings):
        console.print("stopped the embedded Redis (its data stay in "
                      f"{escape(str(settings.embedded_dir / 'data'))})", highlight=False, soft_wrap=True)
    else:
        console.print("the embedded Redis was not running", highlight=False)
