"""Shared plumbing of the benchmarks: a private Redis, real worker processes, counters, tables, results.

Every benchmark run gets its own ``redis-server`` (:class:`config.embedded.EmbeddedRedis` in a temporary
directory, AOF on as in production) unless ``--redis-url`` is given, and its own ``TEAMSTER_KEY_PREFIX``, so
runs never see each other's queues or records. Workers are real ``celery -A teamster.tasks.app worker`` processes,
started the way ``tests/harness.py`` starts them (own session, log file, wait for ``ready.``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from rich.console import Console
from rich.table import Table

from teamster.config.embedded import EmbeddedRedis
from teamster.orchestrator.client import Client
from teamster.orchestrator.processes import WorkerProcess, WorkerStartError, raise_terminated
from teamster.orchestrator.store import decode_fields

__all__ = [
    "run_main",
    "REPO_ROOT",
    "RESULTS_DIR",
    "BenchError",
    "BenchEnv",
    "BenchWorker",
    "Ticker",
    "console",
    "add_common_args",
    "bench_env",
    "cpu_count",
    "cpu_seconds",
    "context_switches",
    "delete_prefix",
    "fmt",
    "machine_info",
    "percentile",
    "print_table",
    "ratio",
    "redis_counters",
    "counter_delta",
    "wait_until",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WORKFLOW_MODULE = "bench.bench_workflows"

# Plain output (pipes, files) is 160 columns wide so the tables do not wrap.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark could not run (a worker did not start, a run failed...); the message says why."""


# --------------------------------------------------------------------------- small helpers


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware), falling back to ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """A table cell: numbers rounded, None/NaN as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return f"{value}{suffix}"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); :class:`BenchError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Ticker:
    """Progress lines for long phases: ``label: done/total (rate/s)`` at most every ``every`` seconds."""

    def __init__(self, label: str, total: int | None = None, every: float = 2.0) -> None:
        self.label = label
        self.total = total
        self.every = every
        self.started = time.monotonic()
        self._last = self.started

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self._last < self.every:
            return
        self._last = t
        elapsed = t - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total is not None else ""
        console.print(f"  [dim]{self.label}: {done}{total} in {elapsed:.1f}s ({rate:.1f}/s){extra}[/]")


# --------------------------------------------------------------------------- machine and process facts


def _redis_version(client: redis.Redis | None) -> str | None:
    if client is None:
        return None
    try:
        return str(client.info("server").get("redis_version"))
    except redis.RedisError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(client: redis.Redis | None = None) -> dict[str, Any]:
    """What the numbers were measured on (CPU count, load, versions); goes into every results file."""
    import celery  # noqa: PLC0415 - only for its version

    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_count": cpu_count(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "redis_server": _redis_version(client),
        "loadavg_1_5_15": load,
        "git_commit": _git_commit(),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _sum_over_tree(pid: int, read: Callable[[Path], float]) -> float:
    """``read(/proc/<pid>)`` summed over ``pid`` and its live descendants (a process gone meanwhile counts nothing, nor
    do the ones it started; 0 without ``/proc``)."""
    if not Path("/proc").is_dir():
        return 0.0
    tree = _proc_children()
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            total += read(Path("/proc") / str(current))
        except OSError:
            continue
        stack.extend(tree.get(current, []))
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its live descendants (Linux ``/proc``; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if Path("/proc").is_dir() else 1

    def read(proc: Path) -> float:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    return _sum_over_tree(pid, read)


def context_switches(pid: int) -> int:
    """Context switches so far (voluntary and not) of every live thread of ``pid`` and of its live descendants
    (Linux ``/proc``; 0 elsewhere). Each time a thread gives up the GIL and waits to get it back costs two."""

    def read(proc: Path) -> float:
        total = 0
        for task in list((proc / "task").iterdir()):
            try:
                status = (task / "status").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            total += sum(int(line.split()[1]) for line in status.splitlines()
                         if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")))
        return total

    return int(_sum_over_tree(pid, read))


# --------------------------------------------------------------------------- Redis counters


def redis_counters(client: redis.Redis) -> dict[str, int]:
    """Cumulative server counters: calls per command (``cmd:<name>``, commands run inside Lua scripts included),
    ``total_commands`` and bytes in/out."""
    stats = client.info("stats")
    out = {
        "total_commands": int(stats["total_commands_processed"]),
        "net_input_bytes": int(stats["total_net_input_bytes"]),
        "net_output_bytes": int(stats["total_net_output_bytes"]),
    }
    for name, value in client.info("commandstats").items():
        out["cmd:" + str(name).removeprefix("cmdstat_")] = int(value["calls"])
    return out


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """``after - before`` per counter (counters absent before count from 0)."""
    return {key: value - before.get(key, 0) for key, value in after.items() if value - before.get(key, 0)}


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix:`` (used when benchmarking against a shared ``--redis-url``)."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


# --------------------------------------------------------------------------- workers


class BenchWorker(WorkerProcess):
    """One real ``celery -A teamster.tasks.app worker`` process (:class:`orchestrator.processes.WorkerProcess`).

    Start-up failures are raised as :class:`BenchError` with the worker's log tail.

    Args:
        name: Node name prefix (``name@host``); also the log file name.
        env: The full environment of the process (see :meth:`BenchEnv.worker_env`).
        log_dir: Where the log goes.
        pool: Celery pool (``threads``, ``prefork``, ``solo``).
        concurrency: Pool size.
        queues: Comma-separated queues to consume.
        loglevel: Celery log level (INFO by default, as in production).
    """

    def __init__(self, name: str, *, env: dict[str, str], log_dir: Path, pool: str = "threads",
                 concurrency: int = 8, queues: str, loglevel: str = "INFO") -> None:
        super().__init__(name, env=env, log_path=log_dir / f"{name}.log", queues=queues, pool=pool,
                         concurrency=concurrency, loglevel=loglevel, cwd=REPO_ROOT)

    def start(self, wait: bool = True, timeout: float = 90.0) -> BenchWorker:
        """Start the process (and by default wait until it consumes)."""
        super().start(wait, timeout)
        return self

    def is_ready(self) -> bool:
        """True once the worker logged ``ready.``; :class:`BenchError` (with the log tail) if it exited."""
        try:
            return super().is_ready()
        except WorkerStartError as exc:
            raise BenchError(f"{exc.message} (log {self.log_path})") from None

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until :meth:`is_ready`, or raise :class:`BenchError` with the log tail."""
        try:
            super().wait_ready(timeout)
        except WorkerStartError as exc:
            raise BenchError(f"{exc.message} (log {self.log_path})") from None


# --------------------------------------------------------------------------- the environment of one run


@dataclass
class BenchEnv:
    """One benchmark run's Redis, key prefix, temporary directory and workers.

    Attributes:
        name: Benchmark name (used in the key prefix).
        redis_url: The Redis every process uses.
        key_prefix: The run's base ``TEAMSTER_KEY_PREFIX`` (phases may derive sub-prefixes from it).
        tmp: Temporary directory (Redis data, worker logs).
        embedded: The private Redis, when this run started one.
        loglevel: Celery log level of the workers.
    """

    name: str
    redis_url: str
    key_prefix: str
    tmp: Path
    embedded: EmbeddedRedis | None
    loglevel: str = "INFO"
    workers: list[BenchWorker] = field(default_factory=list)
    prefixes: set[str] = field(default_factory=set)
    _client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        """A plain Redis client (``decode_responses=True``) for counters and reads."""
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=30)
        return self._client

    def clear(self, prefix: str) -> None:
        """Delete a finished phase's keys, so that the next phase does not start on its leftovers (the provider
        benchmark queues more work than a window takes); on the run's own Redis, also compact the AOF and wait for
        it: a file that grew by a phase's backlog would otherwise be rewritten -- a fork and a full rewrite, on one of
        the host's cores -- during the next phase's window."""
        delete_prefix(self.client, prefix)
        if self.embedded is None:
            return
        with contextlib.suppress(redis.ResponseError):  # a rewrite already running: wait for that one
            self.client.bgrewriteaof()

        def compacted() -> bool:
            info = self.client.info("persistence")
            return not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled")

        wait_until(compacted, timeout=300, what="Redis to finish rewriting its AOF")

    def prefix(self, suffix: str = "") -> str:
        """The base key prefix, or a sub-prefix ``<base>-<suffix>`` (isolated queues and records)."""
        value = f"{self.key_prefix}-{suffix}" if suffix else self.key_prefix
        self.prefixes.add(value)
        return value

    def settings_env(self, prefix: str | None = None, **overrides: Any) -> dict[str, str]:
        """``TEAMSTER_*`` variables of a process of this run (overrides without the prefix, lower case)."""
        values: dict[str, Any] = {
            "redis_url": self.redis_url,
            "key_prefix": prefix or self.key_prefix,
            "model": "scripted",
            "workflow_modules": WORKFLOW_MODULE,
            "embedded_dir": self.tmp / "embedded",
            **overrides,
        }
        return {f"TEAMSTER_{key.upper()}": str(value) for key, value in values.items()}

    def worker_env(self, prefix: str | None = None, **overrides: Any) -> dict[str, str]:
        """The full environment of a worker process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEAMSTER_")}
        env.update(self.settings_env(prefix, **overrides))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def worker(self, name: str, *, prefix: str | None = None, pool: str = "threads", concurrency: int = 8,
               env: Mapping[str, Any] | None = None) -> BenchWorker:
        """A (not yet started) worker of this run consuming the prefix's steps and control queues."""
        worker_env = self.worker_env(prefix, **dict(env or {}))
        queues = f"{worker_env.get('TEAMSTER_STEPS_QUEUE', 'teamster.steps')}," \
                 f"{worker_env.get('TEAMSTER_CONTROL_QUEUE', 'teamster.control')}"
        worker = BenchWorker(name, env=worker_env, log_dir=self.tmp, pool=pool, concurrency=concurrency,
                             queues=queues, loglevel=self.loglevel)
        self.workers.append(worker)
        return worker

    def start_workers(self, workers: Iterable[BenchWorker], timeout: float = 120.0) -> None:
        """Start several workers at once and wait until all are ready."""
        started = [w.start(wait=False) for w in workers]
        deadline = time.monotonic() + timeout
        for worker in started:
            worker.wait_ready(max(1.0, deadline - time.monotonic()))

    def stop_workers(self) -> None:
        """Stop every worker this run started (warm shutdown, then SIGKILL)."""
        for worker in self.workers:
            try:
                worker.stop(timeout=10)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                console.print(f"[yellow]could not stop worker {worker.name}: {exc}[/]")
        self.workers.clear()

    def step_records(self, client: Client, run_ids: Sequence[str], step_id: str) -> list[dict[str, Any]]:
        """The decoded records of step ``step_id`` of ``run_ids`` (pipelined, 500 at a time; missing ones left out)."""
        keys = client.runtime.keys
        out: list[dict[str, Any]] = []
        for i in range(0, len(run_ids), 500):
            pipe = self.client.pipeline(transaction=False)
            for run_id in run_ids[i:i + 500]:
                pipe.hgetall(keys.step(run_id, step_id))
            out += [decode_fields(raw) for raw in pipe.execute() if raw]
        return out

    def discard(self, prefix: str) -> None:
        """Delete a phase's keys (only needed on a shared ``--redis-url``; a private Redis is thrown away)."""
        if self.embedded is None:
            delete_prefix(self.client, prefix)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark has."""
    parser.add_argument("--redis-url", default=None,
                        help="Use this Redis instead of starting a private redis-server (AOF on) in a temp dir. "
                             "Keys go under a unique prefix and are deleted afterwards.")
    parser.add_argument("--loglevel", default="INFO",
                        help="Celery log level of the worker processes (default INFO, as in production).")
    parser.add_argument("--output", type=Path, default=None,
                        help="Where to write the JSON results (default bench/results/<benchmark>.json).")
    parser.add_argument("--keep-logs", action="store_true",
                        help="Keep the temporary directory (worker logs, Redis log) and print its path.")


@contextlib.contextmanager
def bench_env(name: str, args: argparse.Namespace) -> Iterator[BenchEnv]:
    """Set up one benchmark run (private Redis unless ``--redis-url``, unique prefix) and always tear it down.

    Also points this process's ``TEAMSTER_*`` environment at the run, so clients built from settings use it.
    SIGTERM is turned into KeyboardInterrupt, so workers and Redis are stopped on Ctrl-C and on ``kill``.
    """
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    # Ctrl-C must stop the run cleanly even when SIGINT was inherited as ignored (e.g. a background job).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix=f"teamster-bench-{name}-"))
    embedded: EmbeddedRedis | None = None
    env: BenchEnv | None = None
    failed = True
    saved_environ = {k: v for k, v in os.environ.items() if k.startswith("TEAMSTER_")}
    try:
        if args.redis_url:
            url = str(args.redis_url)
            console.print(f"[dim]Redis: {url} (given with --redis-url)[/]")
        else:
            embedded = EmbeddedRedis(tmp / "redis", appendonly=True)
            url = embedded.start()
            console.print(f"[dim]Redis: private redis-server at {url} (AOF on, appendfsync everysec), "
                          f"data in {tmp / 'redis'}[/]")
        env = BenchEnv(name=name, redis_url=url, key_prefix=f"bench-{name}-{uuid.uuid4().hex[:8]}", tmp=tmp,
                       embedded=embedded, loglevel=str(args.loglevel))
        env.prefixes.add(env.key_prefix)
        for key in [k for k in os.environ if k.startswith("TEAMSTER_")]:
            del os.environ[key]
        os.environ.update(env.settings_env())
        from teamster.config.settings import get_settings  # noqa: PLC0415

        get_settings.cache_clear()
        env.client.ping()
        yield env
        failed = False
    finally:
        if env is not None:
            env.stop_workers()
            if embedded is None:
                for prefix in env.prefixes:
                    with contextlib.suppress(redis.RedisError):
                        delete_prefix(env.client, prefix)
            if env._client is not None:
                env._client.close()
        if embedded is not None:
            embedded.stop()
        for key in [k for k in os.environ if k.startswith("TEAMSTER_")]:
            del os.environ[key]
        os.environ.update(saved_environ)
        signal.signal(signal.SIGTERM, previous_handler)
        signal.signal(signal.SIGINT, previous_int)
        if failed or getattr(args, "keep_logs", False):
            console.print(f"[dim]worker logs and Redis data kept in {tmp}[/]")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- output


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                caption: str | None = None) -> None:
    """Print a rich table (plain text when not on a terminal)."""
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*[cell if isinstance(cell, str) else fmt(cell) for cell in row])
    console.print(table)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(name: str, results: dict[str, Any], output: Path | None = None) -> Path:
    """Write ``results`` as JSON to ``output`` or ``bench/results/<name>.json``; returns the path."""
    path = output or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    console.print(f"results written to {path}")
    return path


def run_main(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main`` as a command: one red line on failure, exit 130 on Ctrl-C."""
    try:
        main()
    except BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; workers and Redis stopped[/]")
        raise SystemExit(130) from None
