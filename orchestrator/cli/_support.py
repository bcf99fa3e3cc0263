"""Helpers shared by the CLI commands: a fresh client per invocation, JSON arguments, formatting."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import BaseModel
from rich import box
from rich.cells import cell_len
from rich.json import JSON
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import InvalidInput
from teamster.orchestrator.cli._common import console
from teamster.orchestrator.models import RUN_TERMINAL, RUN_WAITING, DeadLetterEntry, RunRecord, RunStatus
from teamster.orchestrator.workflow import get_workflow

if TYPE_CHECKING:
    from teamster.orchestrator.client import Client
    from teamster.orchestrator.journal import Redactor

__all__ = [
    "AsJson",
    "make_client",
    "read_json_arg",
    "read_json_object",
    "fmt_time",
    "fmt_clock",
    "fmt_when",
    "new_table",
    "fmt_duration",
    "run_duration",
    "styled_status",
    "short_json",
    "example_output",
    "entry_example_output",
    "step_example_output",
    "resolve_command",
    "entry_next_steps",
    "run_next_steps",
    "is_settled",
    "print_commands",
    "print_run_outcome",
    "require_by",
    "STATUS_STYLE",
    "mask_url",
    "Column",
    "print_table",
    "print_json_block",
    "echo_json",
    "command_lines",
    "print_command",
    "print_note",
    "redactor",
    "redacted",
    "redacted_dump",
    "PLACEHOLDER",
    "placeholder_paths",
]

M = TypeVar("M", bound=BaseModel)

AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables "
                                      "(secrets redacted, like the tables).")]
"""The ``--json`` option of the commands that print tables."""

STATUS_STYLE: dict[str, str] = {
    "succeeded": "green",
    "running": "cyan",
    "pending": "cyan",
    "queued": "cyan",
    "retrying": "yellow",
    "waiting": "yellow",
    "parked": "blue",
    "skipped": "dim",
    "escalated": "magenta",
    "needs_human": "yellow",
    "cannot_complete": "magenta",
    "failed": "red",
    "cancelled": "dim",
    "open": "yellow",
    "resolved": "green",
    "retried": "cyan",
    "auto_retried": "cyan",
    "discarded": "dim",
}


def mask_url(url: str) -> str:
    """A Redis URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def make_client(settings: TeamsterSettings | None = None, *, load_modules: bool = True) -> Client:
    """A client built from fresh settings (the environment as it is now, not a cached copy).

    Args:
        settings: Settings to use instead of reading the environment.
        load_modules: Import ``TEAMSTER_WORKFLOW_MODULES`` (registers workflows and agents).

    Raises:
        InvalidSettings: a ``TEAMSTER_*`` variable is invalid.
        ConfigurationError: a workflow module cannot be imported.
    """
    from teamster.orchestrator.client import Client  # noqa: PLC0415 - keeps `teamster --help` fast

    return Client(settings or load_settings(), load_modules=load_modules)


def read_json_arg(value: str, option: str) -> Any:
    """Parse an option given as JSON text, ``@path`` (a JSON file) or ``@-`` (standard input).

    Raises:
        InvalidInput: the file cannot be read or the text is not JSON (the message names the option).
    """
    text = value
    source = option
    if value.startswith("@"):
        path = value[1:]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).expanduser().read_text()
        except OSError as exc:
            raise InvalidInput(f"cannot read {option} file {path!r}: {exc.strerror or exc}",
                               hint=f"Pass JSON text, or @PATH of an existing JSON file, to {option}.") from None
        source = f"{option} file {path!r}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        example = f"{option} '{{\"key\": \"value\"}}'"
        raise InvalidInput(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                           hint=f"Quote it for the shell, e.g. {example}, or use {option} @file.json.") from None


def read_json_object(value: str, option: str) -> dict[str, Any]:
    """Like :func:`read_json_arg`, but the value must be a JSON object."""
    data = read_json_arg(value, option)
    if not isinstance(data, dict):
        raise InvalidInput(f"{option} must be a JSON object, got {type(data).__name__}",
                           hint=f"Pass an object, e.g. {option} '{{\"key\": \"value\"}}'.")
    return data


def require_by(by: str | None) -> str:
    """The operator name for ``--by`` (defaults to $USER).

    Raises:
        InvalidInput: neither ``--by`` nor $USER is set.
    """
    name = (by or os.environ.get("USER") or os.environ.get("USERNAME") or "").strip()
    if not name:
        raise InvalidInput("--by is required: who performs this action (recorded in the journal)",
                           hint="Pass --by YOUR_NAME (it defaults to $USER, which is not set).")
    return name


# --------------------------------------------------------------------------- formatting


def fmt_time(ts: float | None) -> str:
    """A timestamp as local ``YYYY-MM-DD HH:MM:SS`` (``-`` when missing)."""
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_clock(ts: float) -> str:
    """The time of day of a timestamp with milliseconds, ``HH:MM:SS.mmm`` (a journal event's)."""
    return fmt_time(ts)[11:] + f".{int(ts * 1000) % 1000:03d}"


def fmt_when(ts: float | None) -> str:
    """A compact timestamp: ``HH:MM:SS`` today, ``MM-DD HH:MM`` before."""
    if not ts:
        return "-"
    moment = datetime.fromtimestamp(ts)
    return moment.strftime("%H:%M:%S" if moment.date() == datetime.now().date() else "%m-%d %H:%M")


def new_table(title: str | None = None) -> Table:
    """A light table (header rule only) that stays readable in an 80-column terminal."""
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)


def fmt_duration(seconds: float | None) -> str:
    """A duration as ``850ms``, ``12.3s``, ``4m05s`` or ``2h03m`` (``-`` when missing)."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def run_duration(run: RunRecord) -> str:
    """How long the run took (or has been going, marked with ``+``)."""
    if run.finished_at:
        return fmt_duration(run.finished_at - run.created_at)
    if run.status in RUN_WAITING:
        return fmt_duration(run.updated_at - run.created_at)
    return "+" + fmt_duration(max(0.0, datetime.now().timestamp() - run.created_at))


def styled_status(status: str) -> str:
    """Rich markup for a status value."""
    style = STATUS_STYLE.get(status, "white")
    return f"[{style}]{escape(status)}[/]"


def short_json(value: Any, limit: int = 80) -> str:
    """Compact one-line JSON (or text). Longer than ``limit`` characters (by more than a few), it is cut at about
    ``limit`` and says so: ``... [+N chars]`` (``--json`` outputs print the whole)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str,
                                                            ensure_ascii=False)
    text = " ".join(text.split())
    if len(text) <= limit + 16:  # cutting less than the marker adds would only hide text
        return text
    space = text.rfind(" ", limit - 15, limit + 1)
    cut = space if space > 0 else limit
    return f"{text[:cut]} [+{len(text) - cut} chars]"


def is_settled(run: RunRecord) -> bool:
    """True when the run is final or waits for an operator."""
    return run.status in RUN_TERMINAL or run.status in RUN_WAITING


# --------------------------------------------------------------------------- tables, JSON and commands

_GAP = 2
"""Columns of :func:`print_table` are this many spaces apart."""


@dataclass(frozen=True)
class Column:
    """One column of :func:`print_table`.

    Attributes:
        header: The header.
        short: A shorter header, used when the table is tight.
        justify: Cell alignment.
        whole: Never wrapped or cut (ids, times, numbers): the column is as wide as its widest cell.
        min_width: The narrowest a wrapping column may get (when it cannot, a ``below`` column moves out).
        below: When the table does not fit the console, the column leaves it and its values follow the table,
            one line per row (``ROW-KEY HEADER: value``), instead of squeezing the other columns.
    """

    header: str
    short: str | None = None
    justify: Literal["left", "right"] = "left"
    whole: bool = False
    min_width: int = 10
    below: bool = False


def _cell_width(plain: str) -> int:
    return max((cell_len(line) for line in plain.split("\n")), default=0)


def _longest_word(plain: str) -> int:
    return max((cell_len(word) for word in plain.split()), default=0)


@dataclass(frozen=True)
class _Layout:
    kept: list[int]
    headers: list[str]
    widths: list[int] | None  # None: nothing fits, every column wraps


def _layout(columns: Sequence[Column], plain_rows: Sequence[Sequence[str]], width: int) -> _Layout:
    """Which columns stay, under which headers, how wide: ids and other whole columns are never cut."""
    movable = [i for i in reversed(range(len(columns))) if columns[i].below]  # the rightmost moves out first
    # first every column as wide as its content under its full header; then short headers with wrapping columns;
    # then without the `below` columns, one after the other
    for short in (False, True):
        for moved in range(len(movable) + 1 if short else 1):
            kept = [i for i in range(len(columns)) if i not in movable[:moved]]
            headers = [(columns[i].short or columns[i].header) if short else columns[i].header for i in kept]
            natural = [max([cell_len(h)] + [_cell_width(row[i]) for row in plain_rows])
                       for i, h in zip(kept, headers, strict=True)]
            least = [n if columns[i].whole or not short else min(n, max(columns[i].min_width, _longest_word(h)))
                     for i, h, n in zip(kept, headers, natural, strict=True)]
            room = width - _GAP * (len(kept) - 1)
            if sum(least) > room:
                continue
            widths, extra = list(least), room - sum(least)
            while extra > 0:
                growing = [k for k in range(len(kept)) if widths[k] < natural[k]]
                if not growing:
                    break
                share = max(1, extra // len(growing))
                for k in growing:
                    add = min(share, natural[k] - widths[k], extra)
                    widths[k] += add
                    extra -= add
            return _Layout(kept, headers, widths)
    kept = [i for i in range(len(columns)) if not columns[i].below]
    return _Layout(kept, [columns[i].short or columns[i].header for i in kept], None)


def print_table(title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]], *, key: int = 0,
                every: str = "every row") -> None:
    """Print a table that fits the console without cutting a character.

    Whole columns (ids) keep their values on one line; other columns wrap, folding a word only when it is longer
    than the column; when even that does not fit, shorter headers are used, then ``below`` columns leave the table
    and their values follow it, one line per row, named by the row's ``key`` cell.

    Args:
        title: A line printed before the table (rich markup), or None.
        columns: The columns.
        rows: Cells as rich markup, one list per row.
        key: The column that names a row in the lines under the table.
        every: How the lines under the table name all rows when a moved column holds one value for all of them
            (e.g. ``"every step"``).
    """
    plain_rows = [[Text.from_markup(cell).plain for cell in row] for row in rows]
    empty = [i for i, column in enumerate(columns)  # an optional column with nothing to show is left out
             if column.below and all(row[i].strip() in ("", "-") for row in plain_rows)]
    if empty:
        columns = [column for i, column in enumerate(columns) if i not in empty]
        rows = [[cell for i, cell in enumerate(row) if i not in empty] for row in rows]
        plain_rows = [[cell for i, cell in enumerate(row) if i not in empty] for row in plain_rows]
        key -= sum(1 for i in empty if i < key)
    layout = _layout(columns, plain_rows, console.width)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for n, (i, header) in enumerate(zip(layout.kept, layout.headers, strict=True)):
        column = columns[i]
        if layout.widths is None:
            table.add_column(header, justify=column.justify, overflow="fold")
        else:
            table.add_column(header, justify=column.justify, width=layout.widths[n], no_wrap=column.whole,
                             overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in layout.kept))
    if title:
        console.print(title, highlight=False)
    console.print(table)
    for i, column in enumerate(columns):
        if i in layout.kept:
            continue
        filled = [(row, plain) for row, plain in zip(rows, plain_rows, strict=True)
                  if plain[i].strip() and plain[i].strip() != "-"]
        if len(rows) > 1 and len(filled) == len(rows) and len({plain[i] for _, plain in filled}) == 1:
            print_note(f"{escape(column.header)} ({escape(every)}): {filled[0][0][i]}")
            continue
        for row, _ in filled:
            print_note(f"[bold]{row[key]}[/] {escape(column.header)}: {row[i].replace(chr(10), ' ')}")


def print_note(markup: str, indent: int = 2) -> None:
    """Print a line of rich markup indented, its wrapped continuation lines too."""
    console.print(Padding(Text.from_markup(markup), (0, 0, 0, indent), expand=False))


def print_json_block(value: Any) -> None:
    """Indented JSON for people, a line longer than the console wrapped under its own indentation (``--json``
    outputs print JSON for programs)."""
    text = JSON(json.dumps(value, default=str, ensure_ascii=False)).text
    for line in text.split("\n"):
        indent = len(line.plain) - len(line.plain.lstrip(" "))
        body = line[indent:]
        body.no_wrap, body.overflow = False, "fold"
        console.print(Padding(body, (0, 0, 0, indent), expand=False))


def echo_json(value: Any) -> None:
    """Print ``value`` as one JSON document on standard output (nothing else goes there)."""
    typer.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _arg(token: str) -> str:
    return token if shlex.quote(token) == token else _quote(token)


def command_lines(command: str, width: int, indent: str = "  ") -> list[str]:
    """``command`` as lines of at most ``width`` columns that still run when pasted into a shell.

    Arguments a shell would change (``[``, spaces, quotes) are quoted. A command that fits stays one line. A
    longer one is split between its arguments with ``\\`` line continuations (an option stays with its value),
    and a JSON argument too long for a line is spread over several lines inside its quotes (JSON allows the line
    breaks).
    """
    try:
        tokens = shlex.split(command)
    except ValueError:
        return [indent + command]
    quoted = " ".join(_arg(token) for token in tokens)  # ids like step[3] quoted: zsh would glob them
    if cell_len(indent + quoted) <= width:
        return [indent + quoted]
    more = indent + "    "
    out: list[str] = []
    line = indent

    def add(piece: str) -> None:
        nonlocal line
        fresh = not line.strip()
        candidate = line + ("" if fresh else " ") + piece
        if fresh or cell_len(candidate) + 2 <= width:
            line = candidate
        else:
            out.append(line + " \\")
            line = more + piece

    i = 0
    while i < len(tokens):
        token = tokens[i]
        value = tokens[i + 1] if token.startswith("-") and i + 1 < len(tokens) and \
            not tokens[i + 1].startswith("-") else None
        i += 1 if value is None else 2
        if value is None:
            add(_arg(token))
            continue
        piece = f"{_arg(token)} {_arg(value)}"
        parsed = _json_container(value)
        if parsed is None or cell_len(more + piece) <= width:
            add(piece)
            continue
        first, *rest = json.dumps(parsed, indent=2, ensure_ascii=False).splitlines()
        spread = _quote("\n".join([first, *(more + part for part in rest)])).split("\n")
        add(f"{_arg(token)} {spread[0]}")
        for part in spread[1:]:  # inside the quotes: no continuation backslash
            out.append(line)
            line = part
    out.append(line)
    return out


def _json_container(text: str) -> dict[str, Any] | list[Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict | list) and value else None


def print_command(command: str, indent: str = "  ") -> None:
    """Print a command to copy: it fits the console, and pasted into a shell it runs as given."""
    for line in command_lines(command, console.width, indent):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- redaction


def redactor(settings: TeamsterSettings | None = None) -> Redactor:
    """The journal's redaction (built-in patterns, ``TEAMSTER_REDACT_PATTERNS``, registered hooks) for CLI
    output: secrets in step data are never printed."""
    from teamster.orchestrator.journal import Redactor  # noqa: PLC0415 - keeps `teamster --help` fast

    return Redactor((settings or load_settings()).redact_patterns)


def redacted_dump(model: BaseModel, redact: Redactor) -> dict[str, Any]:
    """``model`` as JSON-ready data with secrets replaced by ``[REDACTED]``."""
    data: dict[str, Any] = redact(model.model_dump(mode="json"))
    return data


def redacted(model: M, redact: Redactor) -> M:
    """A copy of ``model`` with secrets replaced by ``[REDACTED]``, for printing."""
    return type(model).model_validate(redacted_dump(model, redact))


# --------------------------------------------------------------------------- examples and next steps


PLACEHOLDER = "<fill in:"
"""How every leaf of an output skeleton begins: ``teamster dlq resolve`` refuses an output that still holds one."""

_TYPE_WORDS = {"string": "string", "integer": "integer", "number": "number", "boolean": "true or false",
               "object": "JSON object", "array": "list"}


def _placeholder(what: str) -> str:
    return f"{PLACEHOLDER} {what}>"


def _placeholder_words(value: Any) -> str | None:
    if isinstance(value, str) and value.startswith(PLACEHOLDER) and value.endswith(">"):
        return value[len(PLACEHOLDER):-1].strip()
    return None


def _example_value(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    if depth > 8:
        return _placeholder("any JSON value")
    if "$ref" in schema:
        return _example_value(defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in schema:
        return schema["const"]  # the only value allowed: nothing to fill in
    if schema.get("enum"):
        choices = [v if isinstance(v, str) else json.dumps(v) for v in schema["enum"]]
        return _placeholder("one of " + "|".join(choices))
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if isinstance(s, dict)]
            nullable = any(s.get("type") == "null" for s in options)
            values = [_example_value(s, defs, depth + 1) for s in options if s.get("type") != "null"]
            if not values:
                return None
            containers = [v for v in values if _placeholder_words(v) is None]
            if containers:
                return containers[0]  # an object or a list: its skeleton
            words = [str(_placeholder_words(v)) for v in values] + (["null"] if nullable else [])
            return _placeholder(" or ".join(dict.fromkeys(words)))  # scalars: one placeholder naming every choice
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [str(k) for k in kind if k != "null"]
        return _placeholder(" or ".join(_TYPE_WORDS.get(k, k) for k in kinds) + (" or null" if "null" in kind else ""))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if props:
            return {name: _example_value(sub, defs, depth + 1) for name, sub in props.items()}
        extra = schema.get("additionalProperties")
        value = _example_value(extra, defs, depth + 1) if isinstance(extra, dict) else _placeholder("any JSON value")
        return {_placeholder("key"): value}
    if kind == "array":
        if isinstance(schema.get("prefixItems"), list):
            return [_example_value(sub, defs, depth + 1) for sub in schema["prefixItems"]]
        items = schema.get("items")
        return [_example_value(items, defs, depth + 1) if isinstance(items, dict) else _placeholder("any JSON value")]
    if kind == "null":
        return None
    return _placeholder(_TYPE_WORDS.get(str(kind), "any JSON value"))


def example_output(model: type[BaseModel]) -> str:
    """A JSON skeleton of ``model`` for ``dlq resolve --output``: every field, each leaf a placeholder such as
    ``"<fill in: string>"``, ``"<fill in: true or false>"`` or ``"<fill in: one of low|normal|high>"`` (a list
    holds one placeholder item). It cannot be submitted unchanged: ``dlq resolve`` refuses placeholders."""
    schema = model.model_json_schema()
    value = _example_value(schema, schema.get("$defs", {}))
    return json.dumps(value, ensure_ascii=False)


def placeholder_paths(value: Any, path: str = "") -> list[str]:
    """Where ``value`` still holds a ``<fill in: ...>`` placeholder (in a string or a key), as paths like
    ``issues[0]`` or ``classify.urgency`` (``$`` is the value itself)."""
    if isinstance(value, str):
        return [path or "$"] if PLACEHOLDER in value else []
    out: list[str] = []
    if isinstance(value, dict):
        for name, item in value.items():
            sub = f"{path}.{name}" if path else str(name)
            found = placeholder_paths(item, sub)
            out += found if found or PLACEHOLDER not in str(name) else [sub]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += placeholder_paths(item, f"{path}[{index}]")
    return out


def step_example_output(workflow: str, step_id: str, module: str | None = None) -> str | None:
    """The ``--output`` skeleton of an agent or child step of ``workflow``, or None (unknown, or another kind)."""
    try:
        step = get_workflow(workflow, module).steps[step_id.split("[", 1)[0]]
        if step.kind == "child":
            return example_output(step.child_workflow.result_model)
        if step.kind not in ("agent", "fan_out"):
            return None
        return example_output(step.spec.output_model)
    except Exception:  # noqa: BLE001 - an unknown workflow or step only loses the example
        return None


def entry_example_output(entry: DeadLetterEntry) -> str | None:
    """The ``--output`` skeleton for resolving ``entry`` by hand, or None when it cannot be resolved so."""
    if entry.kind == "deadline":
        return None
    kind = _step_kind(entry.workflow, entry.step_id, entry.workflow_module)
    if kind in ("agent", "child") or (kind == "fan_out" and "[" in entry.step_key):
        return step_example_output(entry.workflow, entry.step_id, entry.workflow_module)
    return None


def _step_kind(workflow: str, step_id: str, module: str | None = None) -> str | None:
    try:
        return get_workflow(workflow, module).steps[step_id].kind
    except Exception:  # noqa: BLE001
        return None


def resolve_command(entry_id: str, example: str) -> str:
    """The exact ``teamster dlq resolve`` command for an entry, with an example output."""
    return f"teamster dlq resolve {entry_id} --output {_quote(example)} --by you"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def entry_next_steps(entry: DeadLetterEntry) -> list[tuple[str, str]]:
    """What an operator can do about an open entry: (explanation, exact command) pairs."""
    steps: list[tuple[str, str]] = []
    example = entry_example_output(entry)
    child_run, child_entry = entry.details.get("child_run"), entry.details.get("child_entry")
    if entry.error_type == "child_run_failed" and child_entry:
        steps.append(("the child run failed: see its entry and fix it first (then retry this entry below: it takes "
                      "the child's output, the child is not started again)", f"teamster dlq show {child_entry}"))
    if entry.error_type == "child_run_failed" and child_run:
        steps.append(("the child run", f"teamster runs show {child_run}"))
    if entry.kind == "needs_human" and example:
        steps.append(("answer it: supply the step's output (the run resumes)",
                      resolve_command(entry.entry_id, example)))
    if entry.error_type == "run_budget_exceeded":
        budget = entry.details.get("budget") or {}
        flags = " ".join(f"--{name.replace('_', '-')} {_raised(value)}" for name, value in budget.items()
                         if isinstance(value, int | float)) or "--max-model-calls N"
        steps.append(("the run spent its budget: raise it first (then retry below)",
                      f"teamster runs budget {entry.run_id} {flags} --by you --reason 'why'"))
    steps.append(("run the step again from attempt 1 (optionally --state-patch JSON)",
                  f"teamster dlq retry {entry.entry_id} --by you --wait"))
    if entry.kind != "needs_human" and example:
        steps.append(("supply the step's output by hand (the run resumes)",
                      resolve_command(entry.entry_id, example)))
    steps.append(("give up: the run fails with your reason",
                  f"teamster dlq discard {entry.entry_id} --by you --reason 'why'"))
    return steps


def _raised(value: float) -> str:
    """A suggested new budget limit: twice the old one."""
    return str(int(value) * 2) if float(value).is_integer() else f"{value * 2:g}"


def run_next_steps(run: RunRecord) -> list[str]:
    """Commands worth running next for a run, by its status."""
    error = run.error or {}
    entry = error.get("dlq_entry")
    out = [f"teamster runs show {run.run_id}"]
    if entry:
        out.append(f"teamster dlq show {entry}")
        example = step_example_output(run.workflow, str(error.get("step") or ""), run.workflow_module)
        if run.status == RunStatus.NEEDS_HUMAN and example:
            out.append(resolve_command(str(entry), example))
    out.append(f"teamster journal {run.run_id}")
    if run.status in RUN_TERMINAL:
        out.append(f"teamster replay {run.run_id}")
    return out


def print_commands(commands: list[str], *, title: str = "Next") -> None:
    """Print commands to copy, one after the other (see :func:`print_command`)."""
    console.print(f"[bold]{escape(title)}:[/]")
    for command in commands:
        print_command(command)


def print_run_outcome(run: RunRecord) -> bool:
    """Print a settled run's status with its output, or its typed reason and next commands.

    Returns:
        True when the run succeeded.
    """
    run = redacted(run, redactor())
    if run.status == RunStatus.SUCCEEDED:
        console.print(f"run {escape(run.run_id)} {styled_status('succeeded')} "
                      f"in {run_duration(run)}", highlight=False)
        print_json_block(run.output or {})
        return True
    error = run.error or {}
    reason = (f": {escape(str(error.get('error_type', '?')))}: {escape(str(error.get('message', '')))}"
              if error else "")
    console.print(f"run {escape(run.run_id)} is {styled_status(run.status.value)}{reason}", highlight=False)
    if error.get("step"):
        print_note(f"step: {escape(str(error['step']))}")
    if error.get("dlq_entry"):
        print_note(f"dead-letter entry: {escape(str(error['dlq_entry']))}")
    print_commands(run_next_steps(run))
    return False
