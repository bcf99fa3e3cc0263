"""Worker start-up: load workflow modules, check model providers, start metrics and tracing.

A missing credential or provider extra stops the worker at start-up with one clear line (and the hint),
instead of failing every step later.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import redis
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_ready

from teamster.agents.loop import AgentLoop
from teamster.agents.providers import check_provider
from teamster.agents.spec import registered_agents
from teamster.config.settings import get_settings, unknown_variables
from teamster.errors import ConfigurationError, TeamsterError
from teamster.orchestrator import ids
from teamster.orchestrator.client import load_workflow_modules
from teamster.orchestrator.connection import redis_client
from teamster.orchestrator.journal import RedactingFilter, Redactor
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.metrics import serve_metrics
from teamster.orchestrator.store import RunStore
from teamster.orchestrator.tracing import configure_tracing

__all__: list[str] = []

log = logging.getLogger("teamster.worker")


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """Secrets never reach the worker's log: every handler redacts what it writes, as the journal does."""
    if logger is None:
        return
    redacting = RedactingFilter(Redactor(get_settings().redact_patterns))
    for handler in logger.handlers:
        handler.addFilter(redacting)


@worker_init.connect
def _check_configuration(sender: Any = None, **_: Any) -> None:
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        # the pools (Redis, model providers) are sized from the concurrency this worker really runs with
        os.environ["TEAMSTER_WORKER_CONCURRENCY"] = str(concurrency)
        get_settings.cache_clear()
    settings = get_settings()
    try:
        pool_cls = getattr(sender, "pool_cls", "")
        pool = str(getattr(pool_cls, "__module__", pool_cls)).rsplit(".", 1)[-1].split(":")[0]
        if pool in ("gevent", "eventlet"):
            raise ConfigurationError(
                f"the {pool} pool cannot run agent steps (they run on the worker's own asyncio event loop "
                "thread, which green threads cannot share)",
                hint="Use -P threads (the default of `teamster worker`): agent steps are I/O bound.")
        for name, suggestion in unknown_variables():
            log.warning("teamster: %s is not a teamster setting and is ignored%s", name,
                        f" (did you mean {suggestion}?)" if suggestion else "")
        load_workflow_modules(settings)
        providers = {settings.model} | {spec.model for spec in registered_agents().values() if spec.model}
        for provider in sorted(providers):
            check_provider(provider, settings)
        configure_tracing(settings.tracing, service_name="teamster-worker")
        app = getattr(sender, "app", None)
        if app is not None:  # build the process's one result backend now, before the pool's threads could race
            app.backend  # noqa: B018 - to build their own (result_backend_thread_safe, config/celeryconfig.py)
        _tune_gc(settings.worker_gc_threshold)
        if settings.worker_buffered_uuids:
            ids.install()
    except TeamsterError as exc:
        sys.stderr.write(f"teamster worker cannot start: {exc.code}: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        sys.stderr.flush()
        raise SystemExit(78) from None  # EX_CONFIG


def _tune_gc(threshold: int) -> None:
    """Garbage collection for a process with hundreds of steps in flight: what start-up imported (modules, classes,
    schemas; hundreds of thousands of objects that live as long as the process) is frozen out of the collector's
    reach, and the young generation is collected every ``threshold`` allocations instead of every 700.

    With Python's defaults, the objects of every step in flight survive a few young collections, reach the oldest
    generation and are traversed again in each full collection, each of them a pause of the whole process (the
    agent loop included). Frozen before the pool starts, the start-up objects are also shared copy-on-write by
    prefork children. Cyclic garbage waits a little longer; everything else is still freed at once.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(threshold, middle, oldest)


@worker_ready.connect
def _start_agent_loop(sender: Any = None, **_: Any) -> None:
    """Start the process's agent loop now: it measures its lag from the start, so the first steps of a worker
    starting on a backlog are already admitted by it (agents/loop.py, Admission). A prefork child starts its own on
    first use."""
    AgentLoop.shared()


@worker_ready.connect
def _say_gc(sender: Any = None, **_: Any) -> None:
    """Say how garbage collection and ids are set (worker_init is too early: logging is not set up yet)."""
    threshold = gc.get_threshold()[0]
    log.info("teamster: garbage collection every %d allocations (worker_gc_threshold), %d start-up objects frozen",
             threshold, gc.get_freeze_count())
    log.info("teamster: uuid4 ids from os.urandom %s (worker_buffered_uuids)",
             f"read {ids.BLOCK} bytes at a time" if ids.installed() else "16 bytes per id (the standard library's)")


@worker_ready.connect
def _check_store(sender: Any = None, **_: Any) -> None:
    """Mark the store (data-loss detection) and say at start-up when Redis can lose runs."""
    settings = get_settings()
    app = getattr(sender, "app", None)
    store = RunStore(redis_client(settings, app.conf.broker_url if app is not None else None),
                     Keys(settings.key_prefix))
    try:
        if store.epoch() is None and store.client.zcard(store.keys.runs):
            log.error("Redis holds runs under prefix %r but not teamster's epoch mark %s: its data was partly lost "
                      "(restarted without persistence, flushed, or evicted)", settings.key_prefix, store.keys.epoch)
        store.ensure_epoch()
        for problem in store.durability_problems():
            log.warning("teamster: %s", problem)
    except redis.RedisError as exc:
        log.warning("teamster: cannot check Redis at start-up: %s", exc)


@worker_ready.connect
def _start_metrics(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.metrics_port is None:
        return
    app = getattr(sender, "app", None)
    url = app.conf.broker_url if app is not None else None
    try:
        serve_metrics(settings.metrics_port, RunStore(redis_client(settings, url), Keys(settings.key_prefix)))
    except OSError as exc:  # another worker on this host has the port: one endpoint per host is enough
        log.warning("metrics port %s unavailable (%s); this worker serves no /metrics", settings.metrics_port, exc)
