"""Shared CLI plumbing: one-line errors with a hint (``--debug`` shows the traceback), consoles."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape

from teamster.errors import TeamsterError

__all__ = ["console", "err_console", "handle_errors", "state"]

_TRAILING_SPACES = re.compile(r" +((?:\x1b\[[0-9;]*m)*)(?=\n)")


class _StdStream:
    """Writes to ``sys.stdout`` / ``sys.stderr`` as they are at write time; to a pipe or a file, without spaces at
    the end of lines (rich pads table cells, and the lines it wraps, to the console width)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._held = ""  # spaces ending the last write to _held_for: dropped if a newline follows, else written
        self._held_for: object = None

    @property
    def target(self) -> IO[str]:
        stream: IO[str] = getattr(sys, self.name)
        return getattr(stream, "rich_proxied_file", stream)  # a rich Live display redirects sys.stdout

    def isatty(self) -> bool:
        isatty = getattr(self.target, "isatty", None)
        return bool(isatty()) if isatty is not None else False

    def write(self, text: str) -> int:
        target = self.target
        if self.isatty():
            return target.write(text)
        held = self._held if self._held_for is target else ""
        text = _TRAILING_SPACES.sub(r"\1", held + text)
        body = text.rstrip(" ")
        self._held, self._held_for = text[len(body):], target
        target.write(body)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:
        return str(getattr(self.target, "encoding", None) or "utf-8")


class _Console(Console):
    """The CLI's console. Its width follows the terminal and ``$COLUMNS`` each time it prints (rich reads
    ``$COLUMNS`` once, when a console is created, and these two are created at import); written to a pipe or a
    file, no line ends in spaces."""

    def __init__(self, *, stderr: bool = False) -> None:
        super().__init__(file=cast("IO[str]", _StdStream("stderr" if stderr else "stdout")), stderr=stderr)
        self._width = None  # not frozen: `size` reads the terminal and $COLUMNS at call time


console: Console = _Console()
err_console: Console = _Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

_FALLBACK_HINTS: dict[str, str] = {
    "invalid_input": "Fix the value named above; nothing was changed.",
    "invalid_operation": "Check the current state first (`teamster runs show` / `teamster dlq show`).",
    "payload_rejected": "Send a smaller JSON object; nothing was changed.",
    "run_timeout": "The run goes on: follow it with `teamster runs show RUN_ID`.",
}
_DEFAULT_HINT = "Re-run with --debug for the traceback."


class _State:
    debug: bool = False


state = _State()


def handle_errors(func: F) -> F:
    """Turn teamster, Redis and validation errors into one red line plus a hint, exit code 1 (2 for usage)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt, SystemExit):
            raise
        except TeamsterError as exc:
            _fail(f"{exc.code}: {exc.message}", exc.hint or _FALLBACK_HINTS.get(exc.code, _DEFAULT_HINT), exc)
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, traceback with --debug
            if _redis_unreachable(exc):
                _fail(f"store_unavailable: cannot reach Redis ({exc})",
                      "Is Redis running and TEAMSTER_REDIS_URL right? `teamster doctor` checks it.", exc)
            _fail(f"{type(exc).__name__}: {exc}", "Re-run with --debug for the traceback.", exc)

    return wrapper  # type: ignore[return-value]


def _redis_unreachable(exc: BaseException) -> bool:
    redis = sys.modules.get("redis")  # not imported: then it cannot be a Redis error (and --help stays fast)
    kombu = sys.modules.get("kombu.exceptions")  # the broker connection (a Celery ping, a send) fails like this
    return (redis is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError))) or \
        (kombu is not None and isinstance(exc, kombu.OperationalError))


def _fail(line: str, hint: str, exc: BaseException) -> None:
    if state.debug:
        err_console.print_exception(show_locals=False)
    err_console.print(f"[bold red]error[/] {escape(line)}", highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    sys.exit(1)
