"""Helpers shared by the CLI commands: a fresh client per invocation, JSON arguments, formatting."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel
from rich import box
from rich.markup import escape
from rich.table import Table

from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import InvalidInput
from teamster.orchestrator.cli._common import console
from teamster.orchestrator.models import RUN_TERMINAL, RUN_WAITING, DeadLetterEntry, RunRecord, RunStatus
from teamster.orchestrator.workflow import get_workflow

if TYPE_CHECKING:
    from teamster.orchestrator.client import Client

__all__ = [
    "make_client",
    "read_json_arg",
    "read_json_object",
    "fmt_time",
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
]

STATUS_STYLE: dict[str, str] = {
    "succeeded": "green",
    "running": "cyan",
    "pending": "cyan",
    "queued": "cyan",
    "retrying": "yellow",
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
    """Compact one-line JSON, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_settled(run: RunRecord) -> bool:
    """True when the run is final or waits for an operator."""
    return run.status in RUN_TERMINAL or run.status in RUN_WAITING


# --------------------------------------------------------------------------- examples and next steps


def _example_value(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    if depth > 6:
        return None
    if "$ref" in schema:
        return _example_value(defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"]
            return _example_value(options[0], defs, depth + 1) if options else None
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: _example_value(sub, defs, depth + 1) for name, sub in props.items()}
    return {"boolean": True, "string": "...", "integer": 0, "number": 0, "array": [], "null": None}.get(
        str(kind), None)


def example_output(model: type[BaseModel]) -> str:
    """A JSON skeleton of ``model`` (every field, with placeholder values) for ``dlq resolve --output``."""
    schema = model.model_json_schema()
    value = _example_value(schema, schema.get("$defs", {}))
    return json.dumps(value)


def step_example_output(workflow: str, step_id: str, module: str | None = None) -> str | None:
    """The ``--output`` skeleton of an agent step of ``workflow``, or None (unknown, or not an agent step)."""
    try:
        step = get_workflow(workflow, module).steps[step_id.split("[", 1)[0]]
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
    if kind == "agent" or (kind == "fan_out" and "[" in entry.step_key):
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
    if entry.kind == "needs_human" and example:
        steps.append(("answer it: supply the step's output (the run resumes)",
                      resolve_command(entry.entry_id, example)))
    steps.append(("run the step again from attempt 1 (optionally --state-patch JSON)",
                  f"teamster dlq retry {entry.entry_id} --by you --wait"))
    if entry.kind != "needs_human" and example:
        steps.append(("supply the step's output by hand (the run resumes)",
                      resolve_command(entry.entry_id, example)))
    steps.append(("give up: the run fails with your reason",
                  f"teamster dlq discard {entry.entry_id} --by you --reason 'why'"))
    return steps


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
    """Print commands one per line (never wrapped, so they can be copied)."""
    console.print(f"[bold]{escape(title)}:[/]")
    for command in commands:
        console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)


def print_run_outcome(run: RunRecord) -> bool:
    """Print a settled run's status with its output, or its typed reason and next commands.

    Returns:
        True when the run succeeded.
    """
    if run.status == RunStatus.SUCCEEDED:
        console.print(f"run {escape(run.run_id)} {styled_status('succeeded')} "
                      f"in {run_duration(run)}", highlight=False)
        console.print_json(json.dumps(run.output or {}, default=str))
        return True
    error = run.error or {}
    reason = (f": {escape(str(error.get('error_type', '?')))}: {escape(str(error.get('message', '')))}"
              if error else "")
    console.print(f"run {escape(run.run_id)} is {styled_status(run.status.value)}{reason}", highlight=False,
                  soft_wrap=True)
    if error.get("step"):
        console.print(f"  step: {escape(str(error['step']))}", highlight=False)
    if error.get("dlq_entry"):
        console.print(f"  dead-letter entry: {escape(str(error['dlq_entry']))}", highlight=False, soft_wrap=True)
    print_commands(run_next_steps(run))
    return False
