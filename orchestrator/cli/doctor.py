"""``teamster doctor``: check the deployment and say what to fix -- for offline development or for production.

Development (the default without ``TEAMSTER_REDIS_URL``): the embedded Redis and the offline scripted model are
enough; a provider without credentials is a warning (``teamster demo`` needs none). Production (the default with
``TEAMSTER_REDIS_URL``, or ``--for production``): the model providers' credentials, Redis persistence (AOF) and
``noeviction`` are required.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from teamster.config.settings import TeamsterSettings, load_settings, unknown_variables
from teamster.errors import ConfigurationError, InvalidSettings
from teamster.orchestrator.cli._common import console, handle_errors
from teamster.orchestrator.cli._support import mask_url, new_table

__all__ = ["doctor", "Check", "run_checks"]

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
Purpose = Literal["development", "production"]
_STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def _redis_checks(settings: TeamsterSettings, purpose: Purpose) -> tuple[list[Check], str | None]:
    import redis  # noqa: PLC0415 - commands import what they use: `teamster --help` stays fast

    from teamster.config.embedded import resolve_redis_url  # noqa: PLC0415

    checks: list[Check] = []
    try:
        url = resolve_redis_url(settings)
    except ConfigurationError as exc:
        return [Check("Redis", "FAIL", f"cannot start the embedded redis-server: {exc.message}", exc.hint)], None
    where = mask_url(url) if settings.redis_url else f"embedded redis-server {url} (TEAMSTER_REDIS_URL unset)"
    conn = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=3, decode_responses=True)
    try:
        conn.ping()
        info: dict[str, Any] = conn.info("server")
        version = str(info.get("redis_version", "?"))
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
        if major and major < 5:
            checks.append(Check("Redis", "FAIL", f"{where}: version {version}", "teamster needs Redis >= 5 (streams)."))
        else:
            checks.append(Check("Redis", "OK", f"{where}: reachable, version {version}"))
        try:
            policy = str(conn.config_get("maxmemory-policy").get("maxmemory-policy", "?"))
            aof = str(conn.config_get("appendonly").get("appendonly", "?"))
        except redis.ResponseError as exc:
            checks.append(Check("Redis configuration", "WARN", f"cannot read CONFIG ({exc})",
                                "Make sure maxmemory-policy is noeviction and AOF (appendonly yes) is on."))
            return checks, url
        if policy == "noeviction":
            checks.append(Check("Redis eviction", "OK", "maxmemory-policy noeviction"))
        else:
            checks.append(Check("Redis eviction", "FAIL" if purpose == "production" else "WARN",
                                f"maxmemory-policy is {policy}: under memory pressure Redis may evict run state "
                                "and queued steps", "Set maxmemory-policy noeviction (redis.conf or CONFIG SET)."))
        if aof == "yes":
            checks.append(Check("Redis persistence", "OK", "AOF on (appendonly yes)"))
        else:
            checks.append(Check("Redis persistence", "FAIL" if purpose == "production" else "WARN",
                                "AOF is off: a Redis restart can lose acknowledged commits and queued steps",
                                "Set appendonly yes (appendfsync everysec)."))
        return checks, url
    except redis.RedisError as exc:
        return [Check("Redis", "FAIL", f"cannot reach {where}: {exc}",
                      "Start Redis, or fix TEAMSTER_REDIS_URL (unset it to use the embedded development "
                      "server).")], None
    finally:
        conn.close()


def run_checks(purpose: Purpose | None = None) -> tuple[list[Check], TeamsterSettings | None, Purpose]:
    """Run every check for ``purpose`` (default: development without TEAMSTER_REDIS_URL, else production); returns
    the report, the settings (None when they are invalid) and the purpose checked."""
    import redis  # noqa: PLC0415 - commands import what they use: `teamster --help` stays fast

    from teamster.agents.providers import check_provider  # noqa: PLC0415
    from teamster.agents.spec import registered_agents  # noqa: PLC0415
    from teamster.orchestrator.cli.local import ping_workers  # noqa: PLC0415
    from teamster.orchestrator.client import Client, load_workflow_modules  # noqa: PLC0415
    from teamster.orchestrator.workflow import registered_workflows  # noqa: PLC0415

    checks: list[Check] = []
    try:
        settings = load_settings()
    except InvalidSettings as exc:
        checks.append(Check("settings", "FAIL", exc.message, exc.hint))
        rest = ("Redis", "workflow modules", "model providers", "workers", "dead-letter queue")
        return checks + [Check(name, "SKIP", "needs valid settings") for name in rest], None, \
            purpose or "development"
    purpose = purpose or ("production" if settings.redis_url else "development")
    checks.append(Check("settings", "OK", f"key prefix {settings.key_prefix!r}, model {settings.model}"))
    for name, suggestion in unknown_variables():
        checks.append(Check("settings", "WARN", f"{name} is not a teamster setting: it is ignored",
                            f"Did you mean {suggestion}?" if suggestion else
                            "Remove it, or see `teamster doctor --settings` for the settings there are."))
    redis_checks, url = _redis_checks(settings, purpose)
    checks += redis_checks
    modules = ", ".join(settings.workflow_modules) or "none"
    try:
        load_workflow_modules(settings)
        names = ", ".join(sorted(registered_workflows())) or "none registered"
        checks.append(Check("workflow modules", "OK", f"{modules} (workflows: {names})"))
    except ConfigurationError as exc:
        checks.append(Check("workflow modules", "FAIL", exc.message, exc.hint))
    providers = {settings.model} | {spec.model for spec in registered_agents().values() if spec.model}
    for provider in sorted(providers):
        try:
            ref = check_provider(provider, settings)
            note = " (offline scripted model: no real LLM)" if ref.kind == "scripted" else ""
            checks.append(Check("model provider", "OK", f"{provider}: extra and credentials found{note}"))
            if ref.kind == "scripted" and purpose == "production":
                checks[-1] = Check("model provider", "WARN", f"{provider}: the offline scripted model answers every "
                                   "step: no real LLM is called", "Set TEAMSTER_MODEL (e.g. bedrock:MODEL-ID).")
        except ConfigurationError as exc:
            if purpose == "development":
                checks.append(Check("model provider", "WARN", f"{provider}: {exc.message} -- fine offline: "
                                    "`teamster demo` and TEAMSTER_MODEL=scripted need no credentials", exc.hint))
            else:
                checks.append(Check("model provider", "FAIL", f"{provider}: {exc.message}", exc.hint))
    if url is None:
        checks.append(Check("workers", "SKIP", "needs Redis"))
        checks.append(Check("dead-letter queue", "SKIP", "needs Redis"))
        return checks, settings, purpose
    checks += _limit_checks(settings, url, providers, purpose)
    try:
        workers = ping_workers(settings, url, timeout=1.0)
    except Exception as exc:  # noqa: BLE001 - a broker error is a finding, not a crash
        workers = []
        checks.append(Check("workers", "WARN", f"ping failed: {exc}", "Check the broker connection."))
    else:
        if workers:
            checks.append(Check("workers", "OK", f"{len(workers)} alive: {', '.join(workers)}"))
        else:
            checks.append(Check("workers", "WARN", "no worker answered a ping within 1 s: runs will wait",
                                "Start one: `teamster worker` (or try everything offline: `teamster demo`)."))
    try:
        open_entries = Client(settings, redis_url=url, load_modules=False).dlq.count_open()
        if open_entries:
            checks.append(Check("dead-letter queue", "WARN", f"{open_entries} open entr"
                                f"{'y' if open_entries == 1 else 'ies'} waiting for an operator",
                                "See them: `teamster dlq list`."))
        else:
            checks.append(Check("dead-letter queue", "OK", "no open entries"))
    except redis.RedisError as exc:
        checks.append(Check("dead-letter queue", "FAIL", f"cannot read it: {exc}", "Check Redis."))
    return checks, settings, purpose


def _limit_checks(settings: TeamsterSettings, url: str, providers: set[str], purpose: Purpose) -> list[Check]:
    """Each real provider's shared limits (TEAMSTER_PROVIDER_LIMITS or an agent's own) and their state now."""
    import redis  # noqa: PLC0415

    from teamster.agents.spec import registered_agents  # noqa: PLC0415
    from teamster.orchestrator.limits import Limiter  # noqa: PLC0415

    limiter = Limiter(settings, url)
    own = {spec.model or settings.model: spec.limits for spec in registered_agents().values() if spec.limits}
    checks: list[Check] = []
    conn = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=3, decode_responses=True)
    try:
        for model in sorted((providers | set(settings.provider_limits) | set(own)) - {"scripted"}):
            limits = limiter.limits_for(model, own.get(model))
            price = limiter.price_of(model)
            cost = f"; price {price.input:g}/{price.output:g} per million tokens in/out" if price else ""
            if not limits.limited:
                checks.append(Check(
                    "provider limits", "WARN" if purpose == "production" else "OK",
                    f"{model}: none shared: every worker calls it as fast as it can (a 429 still makes all of "
                    f"them back off){cost}",
                    "Set the provider account's limits (the numbers are examples): TEAMSTER_PROVIDER_LIMITS='"
                    + json.dumps({model: {"rpm": 500, "tpm": 200000, "concurrency": 50}}) + "'"
                    if purpose == "production" else ""))
                continue
            period = "minute" if limits.period_seconds == 60 else f"{limits.period_seconds:g} s"
            parts = [f"{limits.rpm} requests" if limits.rpm else "", f"{limits.tpm} tokens" if limits.tpm else ""]
            shape = " and ".join(p for p in parts if p)
            described = ", ".join(x for x in (f"{shape} per {period}" if shape else "",
                                              f"{limits.concurrency} concurrent" if limits.concurrency else "") if x)
            if ":" not in model and model in settings.provider_limits and model not in own:
                checks.append(_provider_key_check(conn, settings, model, limits, f"{model}: {described}", period,
                                                  cost))
                continue
            state, tenants = _live_state(conn, settings, model, limits)
            now = (f"now {state['in_flight']} in flight, {state['requests']} requests and {state['tokens']} tokens "
                   f"this {period}, {state['waiting']} waiting")
            if tenants:
                now += f" (over {tenants} tenant{'s' if tenants != 1 else ''}, each with these limits)"
            source = "the agent's own limits" if model in own else "TEAMSTER_PROVIDER_LIMITS"
            detail = f"{model}: {described} ({source}); {now}{cost}"
            if state["breaker"] == "open":
                checks.append(Check("provider limits", "WARN", f"{detail}; circuit breaker OPEN for "
                                    f"{state['breaker_seconds']:.0f} s more after {state['errors']} errors in a row",
                                    "The provider is failing: calls wait, then one probe decides. Check the "
                                    "provider's status page and the worker logs."))
            elif state["cooldown_seconds"]:
                checks.append(Check("provider limits", "WARN", f"{detail}; cooling down for "
                                    f"{state['cooldown_seconds']:.1f} s after a 429",
                                    "If this recurs, lower the limits to what the provider really allows."))
            else:
                checks.append(Check("provider limits", "OK", f"{detail}; breaker {state['breaker']}"))
    except redis.RedisError as exc:
        checks.append(Check("provider limits", "WARN", f"cannot read their state: {exc}", "Check Redis."))
    finally:
        conn.close()
    return checks


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis SCAN pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _limit_names(conn: Any, prefix: str, pattern: str) -> dict[str, set[str]]:
    """The limit names with keys in Redis now (``{prefix}:limit:{name}:{part}`` matching
    ``{prefix}:limit:{pattern}``), by model.

    A limit name is a model, or ``model@tenant`` for a workflow with a tenant key (``limits.limit_name``); a model
    id has no ``@``, a tenant may.
    """
    from teamster.orchestrator.keys import Keys  # noqa: PLC0415
    from teamster.orchestrator.limits import LIMIT_KEY_PARTS  # noqa: PLC0415 - keeps `teamster --help` fast

    start = Keys(prefix).limit("")
    found: dict[str, set[str]] = {}
    for key in conn.scan_iter(match=f"{_glob_escape(start)}{pattern}", count=1000):
        name, _, part = key[len(start):].rpartition(":")
        if part in LIMIT_KEY_PARTS:
            found.setdefault(name.partition("@")[0], set()).add(name)
    return found


def _live_state(conn: Any, settings: TeamsterSettings, model: str, limits: Any,
                names: set[str] | None = None) -> tuple[dict[str, Any], int]:
    """One model's shared limits now and how many tenants have keys: its health (cool-down, breaker: per model) and
    its counters (in flight, requests, tokens, waiting) summed over the model's own keys and each tenant's."""
    from teamster.orchestrator.limits import provider_state  # noqa: PLC0415

    def read(name: str) -> dict[str, Any]:
        return provider_state(conn, settings.key_prefix, name, period_seconds=limits.period_seconds,
                              breaker_errors=settings.breaker_errors)

    if names is None:
        names = _limit_names(conn, settings.key_prefix, f"{_glob_escape(model)}@*").get(model, set())
    tenants = sorted(names - {model})
    state = read(model)
    for name in tenants:
        counted = read(name)
        for field in ("in_flight", "requests", "tokens", "waiting"):
            state[field] += counted[field]
    return state, len(tenants)


def _provider_key_check(conn: Any, settings: TeamsterSettings, provider: str, limits: Any, described: str,
                        period: str, cost: str) -> Check:
    """A provider's own key in TEAMSTER_PROVIDER_LIMITS: it limits each of the provider's models (without a key of
    its own) on its own, so its state now is each such model's that has keys in Redis."""
    found = _limit_names(conn, settings.key_prefix, f"{_glob_escape(provider)}[:@]*")
    models = sorted(m for m in found if m == provider or m not in settings.provider_limits)
    detail = f"{described} (TEAMSTER_PROVIDER_LIMITS, for each {provider} model on its own)"
    nows, warnings, fixes = [], [], []
    for model in models:
        state, tenants = _live_state(conn, settings, model, limits, found[model])
        over = f" over {tenants} tenant{'s' if tenants != 1 else ''}" if tenants else ""
        nows.append(f"{model} {state['in_flight']} in flight, {state['requests']} requests and {state['tokens']} "
                    f"tokens this {period}, {state['waiting']} waiting{over}, breaker {state['breaker']}")
        if state["breaker"] == "open":
            warnings.append(f"{model}: circuit breaker OPEN for {state['breaker_seconds']:.0f} s more after "
                            f"{state['errors']} errors in a row")
            fixes.append("The provider is failing: calls wait, then one probe decides. Check the provider's status "
                         "page and the worker logs.")
        elif state["cooldown_seconds"]:
            warnings.append(f"{model}: cooling down for {state['cooldown_seconds']:.1f} s after a 429")
            fixes.append("If this recurs, lower the limits to what the provider really allows.")
    now = f"now {'; '.join(nows)}" if nows else f"no {provider} model has calls now"
    detail = f"{detail}; {now}{cost}" + "".join(f"; {w}" for w in warnings)
    return Check("provider limits", "WARN" if warnings else "OK", detail, " ".join(dict.fromkeys(fixes)))


def _settings_table(settings: TeamsterSettings) -> Table:
    table = new_table("effective settings (TEAMSTER_*)")
    table.add_column("variable", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in settings.model_dump().items():
        if name == "redis_url" and value:
            value = mask_url(str(value))
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        table.add_row(f"TEAMSTER_{name.upper()}", escape("" if value is None else str(value)))
    return table


@handle_errors
def doctor(
    show_settings: Annotated[bool, typer.Option("--settings/--no-settings", help="Also print every effective "
                                                "TEAMSTER_* setting.")] = False,
    purpose: Annotated[Purpose | None, typer.Option(
        "--for", help="What to check for: `development` (offline: embedded Redis, scripted model) or `production` "
        "(credentials, persistence and noeviction required). Default: development without TEAMSTER_REDIS_URL, "
        "production with it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Check the deployment and say what to fix: settings (and unknown TEAMSTER_* variables), Redis (reachable,
    version, `noeviction`, AOF), workflow modules, model provider extras and credentials, each provider's shared
    limits and their state now (in flight, waiting, cool-down, circuit breaker), live workers, open dead-letter
    entries -- for offline development or for production, and says which it checked.

    Exit code 1 when any check FAILs (warnings do not fail).

    Examples:

    ```
    teamster doctor
    teamster doctor --for production --settings
    ```
    """
    checks, settings, checked = run_checks(purpose)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if as_json:
        typer.echo(json.dumps({"checked_for": checked, "ready": not failed,
                               "checks": [asdict(c) for c in checks]}))
        if failed:
            raise typer.Exit(1)
        return
    what = ("offline development (embedded Redis, scripted model)" if checked == "development"
            else "production (real model credentials, Redis persistence and noeviction required)")
    console.print(f"checking: ready for {what}", highlight=False)
    if show_settings and settings is not None:
        console.print(_settings_table(settings))
    table = new_table("teamster doctor")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail and what to fix", overflow="fold")
    for check in checks:
        detail = escape(check.detail) + (f"\n[bold]fix:[/] {escape(check.fix)}" if check.fix else "")
        table.add_row(escape(check.name), f"[{_STYLE[check.status]}]{check.status}[/]", detail)
    console.print(table)
    if failed:
        console.print(f"[bold red]not ready for {checked}: {len(failed)} check(s) failed:[/] "
                      f"{escape(', '.join(failed))}", highlight=False)
        raise typer.Exit(1)
    warned = sum(1 for c in checks if c.status == "WARN")
    console.print(f"[green]all checks passed: ready for {checked}[/]" + (f" ({warned} warning(s))" if warned else ""),
                  highlight=False)
    if checked == "development":
        console.print("[dim]for a deployment: `teamster doctor --for production`[/]", highlight=False)
