"""Shared CLI plumbing: one-line errors with a hint (``--debug`` shows the traceback), consoles."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import typer
from rich.console import Console

from config.errors import TeamsterError

__all__ = ["console", "err_console", "handle_errors", "state"]

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug: bool = False


state = _State()


def handle_errors(func: F) -> F:
    """Turn teamster, Redis and validation errors into one red line plus a hint, exit code 1 (2 for usage)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except TeamsterError as exc:
            _fail(f"{exc.code}: {exc.message}", exc.hint, exc)
        except redis.ConnectionError as exc:
            _fail(f"store_unavailable: cannot reach Redis ({exc})",
                  "Is Redis running and TEAMSTER_REDIS_URL right? `teamster doctor` checks it.", exc)
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, traceback with --debug
            _fail(f"{type(exc).__name__}: {exc}", "Re-run with --debug for the traceback.", exc)

    return wrapper  # type: ignore[return-value]


def _fail(line: str, hint: str, exc: BaseException) -> None:
    if state.debug:
        err_console.print_exception(show_locals=False)
    err_console.print(f"[bold red]error[/] {line}", highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint:[/] {hint}", highlight=False, soft_wrap=True)
    sys.exit(1)
