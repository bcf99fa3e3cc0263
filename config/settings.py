"""Typed settings for teamster, read from ``TEAMSTER_*`` environment variables.

Every field documents its default. ``teamster doctor`` prints the effective values.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from teamster.agents.limits import Price, ProviderLimits
from teamster.errors import InvalidSettings

__all__ = ["TeamsterSettings", "get_settings", "load_settings", "unknown_variables"]

DEFAULT_MODEL = "bedrock:global.anthropic.claude-sonnet-4-6"


class TeamsterSettings(BaseSettings):
    """All of teamster's configuration. Environment variables use the prefix ``TEAMSTER_``."""

    model_config = SettingsConfigDict(env_prefix="TEAMSTER_", extra="ignore", validate_default=True)

    # --- Redis (broker, result backend and run store) --------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis URL for broker, results and run store. Default: None, which starts (or reuses) "
        "an embedded redis-server for development.",
    )
    key_prefix: str = Field(
        default="teamster",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every Redis key teamster and its queues write (default 'teamster'); lets "
        "several deployments or test sessions share one Redis.",
    )
    embedded_dir: Path = Field(
        default=Path.home() / ".cache" / "teamster",
        description="Where the embedded development redis-server keeps its socket, pid file and data "
        "(default ~/.cache/teamster).",
    )

    # --- queues ----------------------------------------------------------------------------
    steps_queue: str = Field(
        default="teamster.steps", description="Queue of agent step tasks (default 'teamster.steps')."
    )
    control_queue: str = Field(
        default="teamster.control",
        description="Queue of control tasks: run starts from plain Celery clients, watchdog "
        "(default 'teamster.control').",
    )

    # --- leases and redelivery -------------------------------------------------------------
    lease_seconds: float = Field(
        default=30.0, gt=0,
        description="Step lease length (default 30 s). A worker renews it every lease_seconds/3 while the "
        "step runs; when it lapses (worker killed) the watchdog re-enqueues the step.",
    )
    visibility_timeout: int = Field(
        default=900, gt=0,
        description="Seconds before Redis redelivers an unacknowledged task (default 900). A backstop only: "
        "the watchdog recovers killed steps after lease_seconds. Must exceed the longest retry delay, or "
        "Celery on Redis delivers ETA tasks twice.",
    )
    result_expires: int = Field(
        default=86_400, gt=0,
        description="Seconds Celery keeps task results (default 1 day); the run store is the source of truth.",
    )
    max_lease_expiries: int = Field(
        default=3, ge=1,
        description="A step whose lease lapsed this many times (it keeps killing workers) is dead-lettered "
        "instead of re-enqueued again (default 3).",
    )
    stuck_queued_seconds: float = Field(
        default=120.0, gt=0,
        description="A step queued this long without being claimed is re-sent by the watchdog (default 120 s; "
        "duplicates are harmless).",
    )
    watchdog_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often the watchdog scans (default 10 s)."
    )
    run_deadline_seconds: float = Field(
        default=3600.0, gt=0,
        description="A run with no progress for this long is escalated by the watchdog (default 1 h).",
    )

    store_retry_seconds: float = Field(
        default=30.0, gt=0,
        description="How long a commit, dead-letter write or other store write retries in place through transient "
        "Redis errors (connection lost, timeouts, no free pooled connection) before it gives up (default 30 s); "
        "the model is never called again for it.",
    )

    # --- retries (defaults for steps that do not set their own policy) ----------------------
    retry_max_attempts: int = Field(default=3, ge=1, description="Attempts per step for retryable errors (default 3).")
    retry_backoff_base: float = Field(default=2.0, gt=0, description="First retry delay in seconds (default 2).")
    retry_backoff_max: float = Field(default=60.0, gt=0, description="Cap on one retry delay in seconds (default 60).")
    retry_jitter: bool = Field(default=True, description="Full jitter on retry delays (default on).")

    # --- models ----------------------------------------------------------------------------
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Model provider and id: 'bedrock:<model-id>' (default 'bedrock:global.anthropic."
        "claude-sonnet-4-6'), 'openai:<model>', 'anthropic:<model>', 'ollama:<model>' or 'scripted' "
        "(offline, deterministic).",
    )
    model_base_url: str | None = Field(
        default=None, description="Base URL for 'openai:' (any OpenAI-compatible server) or 'ollama:' (default None)."
    )
    model_max_tokens: int = Field(default=4096, gt=0, description="Max output tokens per model call (default 4096).")
    aws_region: str | None = Field(
        default=None, description="AWS region for Bedrock (default: boto3's own resolution)."
    )
    step_timeout_seconds: float = Field(
        default=300.0, gt=0, description="Default wall-clock budget of one agent step (default 300 s)."
    )

    # --- provider limits, prices, breaker ------------------------------------------------------
    provider_limits: Annotated[dict[str, ProviderLimits], NoDecode] = Field(
        default_factory=dict,
        description="Limits shared by every worker, per provider or provider:model, as JSON, e.g. "
        "'{\"openai:gpt-4o\": {\"rpm\": 500, \"tpm\": 200000, \"concurrency\": 50}}' (default none). An agent's "
        "own AgentSpec(limits=...) wins.")
    model_prices: Annotated[dict[str, Price], NoDecode] = Field(
        default_factory=dict,
        description="Prices per million tokens, per provider or provider:model, as JSON, e.g. "
        "'{\"openai:gpt-4o\": {\"input\": 2.5, \"output\": 10}}' (default none: cost 0). Run budgets and the "
        "spend in `teamster runs show` use them.")
    provider_coordination: bool = Field(
        default=True,
        description="Share what workers learn about providers through Redis (default on): the limits of "
        "TEAMSTER_PROVIDER_LIMITS, one cool-down for every worker after a 429/529, the circuit breaker. Off: each "
        "worker finds out on its own and each step's retry policy handles 429s (run budgets apply either way).")
    provider_wait_max_seconds: float = Field(
        default=300.0, gt=0,
        description="Longest a model call waits for provider capacity (limits, a cool-down, an open breaker) before "
        "the step ends as a retryable model_throttled (default 300 s). Waiting does not use the step's budget.")
    provider_cooldown_seconds: float = Field(
        default=2.0, gt=0,
        description="How long every worker backs off a provider after it answered 429/529 without a retry-after "
        "header (default 2 s); with the header, its value.")
    breaker_errors: int = Field(
        default=5, ge=1,
        description="Provider errors in a row (5xx, timeouts) that open the provider's circuit breaker for every "
        "worker (default 5).")
    breaker_open_seconds: float = Field(
        default=30.0, gt=0,
        description="How long an open breaker stops calls before one probe is let through (default 30 s).")

    # --- application -------------------------------------------------------------------------
    workflow_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated modules imported by workers and the CLI to register agents and workflows, "
        "found like `celery -A` finds an app (the current directory first). Default: none (`teamster demo` loads "
        "its example itself).",
    )
    max_payload_bytes: int = Field(
        default=256 * 1024, gt=0, description="Largest accepted run input, in bytes of JSON (default 256 KiB)."
    )
    max_input_depth: int = Field(
        default=64, ge=1, le=1000,
        description="Deepest nesting of objects and lists accepted in a run input (default 64); deeper input is "
        "refused with InvalidInput naming the field.")

    # --- journal and retention ---------------------------------------------------------------
    journal_payload_cap: int = Field(
        default=16 * 1024, gt=256,
        description="Largest journaled payload in bytes; longer ones are cut and marked truncated (default 16 KiB).",
    )
    journal_model_response_cap: int = Field(
        default=256 * 1024, gt=1024,
        description="Largest recorded model response kept for replay, in bytes (default 256 KiB).",
    )
    finished_run_ttl_seconds: int = Field(
        default=7 * 86_400, gt=0,
        description="How long succeeded/cancelled runs and their journals are kept (default 7 days). Runs with "
        "an unresolved dead-letter entry never expire.",
    )
    redact_patterns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra comma-separated regular expressions whose matches are redacted before journaling "
        "(default none; AWS keys, bearer tokens and sk- API keys are always redacted).",
    )

    # --- workers and observability ------------------------------------------------------------
    worker_pool: Literal["threads", "prefork", "solo"] = Field(
        default="threads",
        description="Celery pool for `teamster worker` (default 'threads': agent steps are I/O bound). gevent and "
        "eventlet are refused: agent steps run on the worker's own asyncio event loop thread, which green threads "
        "cannot share.",
    )
    worker_concurrency: int = Field(
        default=8, ge=1,
        description="Concurrent steps per worker process (default 8; `teamster worker -c` sets it). Agent steps "
        "wait on the model almost all the time: raise it to the number of model calls one process should keep in "
        "flight (hundreds are fine; see the README). Redis and model-provider connection pools are sized from it.")
    worker_max_loop_lag: float = Field(
        default=0.05, ge=0,
        description="Lag of a worker process's agent loop, in seconds, above which the process claims fewer steps "
        "at once (default 0.05): past what its one loop and core serve, more steps in flight only wait their turn, "
        "slower and dearer. 0 turns this off (the concurrency alone bounds the steps in flight).")
    tool_threads: int = Field(
        default=64, ge=1,
        description="Threads running synchronous tools (and Bedrock's streaming calls) per worker process "
        "(default 64). A tool still running when its step's deadline passes is abandoned and keeps its thread "
        "until it returns.")
    worker_gc_threshold: int = Field(
        default=50_000, ge=0,
        description="Object allocations between two young-generation garbage collections in a worker process "
        "(default 50000; Python's own is 700). With hundreds of steps in flight, Python's default re-scans their "
        "live objects over and over and costs a worker a large share of its CPU. At start-up the worker also moves "
        "what it has imported out of the collector's reach (gc.freeze). 0 leaves Python's settings alone.")
    worker_buffered_uuids: bool = Field(
        default=True,
        description="Whether a worker process makes uuid.uuid4() ids from os.urandom read 4 KB at a time (default "
        "true). The standard one reads 16 bytes per id, and CPython releases the GIL around each read: in a worker's "
        "many threads, every id then costs two thread switches. Same ids, same source (the kernel's CSPRNG); a "
        "forked child starts with an empty block. Off: the standard library's uuid4.")
    redis_max_connections: int | None = Field(
        default=None, ge=2,
        description="Redis connections per process (default: worker_concurrency + 16). When all are busy, a "
        "command waits for a free one (up to redis_pool_timeout) instead of failing.")
    redis_pool_timeout: float = Field(
        default=20.0, gt=0, description="Seconds a Redis command waits for a free pooled connection (default 20).")
    model_max_connections: int | None = Field(
        default=None, ge=1,
        description="HTTP connections per model provider client and process (default: worker_concurrency).")
    model_http_client: Literal["auto", "aiohttp", "httpx"] = Field(
        default="auto",
        description="HTTP client under the shared OpenAI, Anthropic and Ollama connection pools on a worker's agent "
                    "loop: 'aiohttp' (keeps streamed connections alive, cheaper per request; in the provider extras), "
                    "'httpx' (the SDKs' default) or 'auto' (default: aiohttp when installed).")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Port of the Prometheus endpoint on workers (default None: off).",
    )
    tracing: Literal["off", "console", "otlp"] = Field(
        default="off", description="OpenTelemetry export: 'off' (default), 'console' or 'otlp' (needs teamster[otlp])."
    )

    @field_validator("provider_limits", "model_prices", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"must be a JSON object: {exc}") from None
        return value

    @field_validator("workflow_modules", "redact_patterns", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redact_patterns")
    @classmethod
    def _compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not value.startswith(("redis://", "rediss://", "unix://", "redis+socket://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TeamsterSettings:
        if self.retry_backoff_max * 2 >= self.visibility_timeout:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed twice retry_backoff_max "
                f"({self.retry_backoff_max}s): Celery on Redis redelivers ETA tasks that wait longer "
                "than the visibility timeout"
            )
        if self.lease_seconds * 2 >= self.visibility_timeout:
            raise ValueError("visibility_timeout must exceed twice lease_seconds")
        return self

    @property
    def redis_pool_size(self) -> int:
        """Redis connections per process (``redis_max_connections`` or worker concurrency + 16)."""
        return self.redis_max_connections or self.worker_concurrency + 16

    @property
    def model_pool_size(self) -> int:
        """HTTP connections per model provider client (``model_max_connections`` or worker concurrency)."""
        return self.model_max_connections or self.worker_concurrency

    @property
    def lease_renew_seconds(self) -> float:
        """Interval between lease renewals (a third of the lease)."""
        return self.lease_seconds / 3.0


def load_settings(**overrides: object) -> TeamsterSettings:
    """Build settings from the environment plus explicit overrides, with a typed error on bad values.

    Raises:
        InvalidSettings: when a value is invalid; the message names the variable.
    """
    try:
        return TeamsterSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"TEAMSTER_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidSettings(f"invalid settings: {problems}") from exc


@functools.lru_cache(maxsize=1)
def get_settings() -> TeamsterSettings:
    """The process-wide settings (read once from the environment; ``get_settings.cache_clear()`` to reload)."""
    return load_settings()


# Variables read elsewhere: the scripted model's settings, and those of the test suite and the benchmarks.
_OTHER_PREFIXES = ("TEAMSTER_SCRIPTED_", "TEAMSTER_TEST_", "TEAMSTER_CHAOS_", "TEAMSTER_BENCH_")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``TEAMSTER_*`` variables that no setting reads (a typo is otherwise silently ignored), each with the closest
    known name, if any."""
    env = os.environ if environ is None else environ
    known = [f"TEAMSTER_{name.upper()}" for name in TeamsterSettings.model_fields]
    out = []
    for name in sorted(env):
        if not name.startswith("TEAMSTER_") or name in known or name.startswith(_OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        out.append((name, close[0] if close else None))
    return out
