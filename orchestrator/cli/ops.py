"""Process commands: ``worker``, ``flower`` and ``watchdog``."""

from __future__ import annotations

import os
import signal
import threading
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.markup import escape

from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import InvalidInput
from teamster.orchestrator.cli._common import console, handle_errors
from teamster.orchestrator.cli._support import make_client

if TYPE_CHECKING:
    from teamster.orchestrator.watchdog import WatchdogReport

__all__ = ["worker", "flower", "watchdog", "worker_argv", "flower_argv"]

Pool = Literal["threads", "prefork", "solo"]


def worker_argv(settings: TeamsterSettings, *, concurrency: int | None = None, pool: str | None = None,
                queues: str | None = None, loglevel: str = "INFO", hostname: str | None = None,
                beat: bool = False, schedule: Path | None = None) -> list[str]:
    """The ``celery worker`` arguments ``teamster worker`` runs (teamster's queues, events on)."""
    argv = ["worker",
            "-P", pool or settings.worker_pool,
            "-c", str(concurrency or settings.worker_concurrency),
            "-Q", queues or f"{settings.steps_queue},{settings.control_queue}",
            "-n", hostname or f"teamster-{os.getpid()}@%h",
            "-E", "--without-mingle", "--without-gossip",
            "-l", loglevel]
    if beat:
        path = schedule or Path(settings.embedded_dir) / f"celerybeat-schedule-{settings.key_prefix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        argv += ["-B", "-s", str(path)]
    return argv


@handle_errors
def worker(
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c", min=1, help="Concurrent steps "
                                                    "(default TEAMSTER_WORKER_CONCURRENCY, 8).")] = None,
    pool: Annotated[Pool | None, typer.Option("--pool", "-P", help="Celery pool (default TEAMSTER_WORKER_POOL, "
                                              "threads: agent steps wait on I/O).")] = None,
    queues: Annotated[str | None, typer.Option("--queues", "-Q", help="Comma-separated queues (default: teamster's "
                                               "steps and control queues).")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="Log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Node name (default "
                                                 "`teamster-PID@HOST`).")] = None,
    beat: Annotated[bool, typer.Option("--beat", "-B", help="Embed celery beat: runs the watchdog schedule "
                                       "(run exactly one beat per deployment).")] = False,
    redis_wait: Annotated[float, typer.Option("--redis-wait", min=0, help="Seconds to wait for Redis at start-up "
                                              "before giving up with one line (compose starts both together).")]
    = 60.0,
) -> None:
    """Run a worker: a Celery worker on teamster's queues (threads pool, events on for Flower).

    The worker imports `TEAMSTER_WORKFLOW_MODULES` and checks every model provider's credentials at
    start-up; a missing credential stops it with one clear line. Stop it with Ctrl-C (warm shutdown:
    running steps finish; a killed worker's steps are taken over by the watchdog).

    Examples:

    ```
    teamster worker
    teamster worker --concurrency 16 --beat
    TEAMSTER_MODEL=scripted teamster worker --pool solo
    ```
    """
    settings = load_settings()
    argv = worker_argv(settings, concurrency=concurrency, pool=pool, queues=queues, loglevel=loglevel,
                       hostname=hostname, beat=beat)
    from teamster.config.embedded import resolve_redis_url  # noqa: PLC0415 - keeps `teamster --help` fast
    from teamster.orchestrator.client import load_workflow_modules  # noqa: PLC0415

    load_workflow_modules(settings)  # a bad TEAMSTER_WORKFLOW_MODULES is one line here, not a Celery traceback
    wait_for_redis(resolve_redis_url(settings), redis_wait)
    from teamster.tasks.app import app as celery_app  # noqa: PLC0415

    celery_app.worker_main(argv)


def wait_for_redis(url: str, seconds: float) -> None:
    """Return once Redis at ``url`` answers; say that we wait, and fail with one line after ``seconds``.

    Raises:
        StoreUnavailable: Redis did not answer in time.
    """
    import time  # noqa: PLC0415

    import redis  # noqa: PLC0415

    from teamster.errors import StoreUnavailable  # noqa: PLC0415
    from teamster.orchestrator.cli._support import mask_url  # noqa: PLC0415

    deadline = time.monotonic() + seconds
    said = False
    while True:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
            return
        except redis.RedisError as exc:
            if time.monotonic() >= deadline:
                raise StoreUnavailable(f"cannot reach Redis at {mask_url(url)}: {exc}",
                                       hint="Start Redis (or fix TEAMSTER_REDIS_URL); `teamster doctor` checks it. "
                                            "--redis-wait sets how long the worker waits.") from None
            if not said:
                console.print(f"waiting for Redis at {escape(mask_url(url))} (up to {seconds:g}s) ...",
                              highlight=False)
                said = True
            time.sleep(1.0)
        finally:
            client.close()


def flower_argv(port: int, address: str, basic_auth: str | None, url_prefix: str | None = None) -> list[str]:
    """The ``celery flower`` arguments of ``teamster flower``.

    Raises:
        InvalidInput: ``basic_auth`` is not ``user:password[,user2:password2]``.
    """
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if basic_auth:
        pairs = [p for p in basic_auth.split(",") if p]
        if not pairs or any(":" not in p or p.startswith(":") for p in pairs):
            raise InvalidInput("--basic-auth must look like user:password (comma-separate several)",
                               hint="e.g. --basic-auth admin:s3cret, or set FLOWER_BASIC_AUTH.")
        argv.append(f"--basic-auth={basic_auth}")
    if url_prefix:
        argv.append(f"--url-prefix={url_prefix}")
    return argv


@handle_errors
def flower(
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="HTTP port.")] = 5555,
    address: Annotated[str, typer.Option("--address", help="Interface to listen on (use 0.0.0.0 inside a "
                                         "container and publish the port privately).")] = "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option("--basic-auth", envvar="FLOWER_BASIC_AUTH", show_envvar=True,
                                                   help="user:password for the web UI and API.")] = None,
    url_prefix: Annotated[str | None, typer.Option("--url-prefix", help="Serve under this path "
                                                   "(behind a reverse proxy).")] = None,
) -> None:
    """Run Flower, the Celery monitoring web UI, against teamster's broker (workers send events).

    **Security:** Flower's `/metrics` endpoint (Prometheus) is unauthenticated even with `--basic-auth`, and
    Flower can revoke tasks and shut workers down: keep its port private (bind to localhost or an internal
    network; never expose it to the internet).

    Examples:

    ```
    teamster flower
    FLOWER_BASIC_AUTH=admin:s3cret teamster flower --port 5555
    ```
    """
    load_settings()
    if not basic_auth and address not in ("127.0.0.1", "localhost", "::1"):
        raise InvalidInput(f"refusing to serve Flower on {address} without --basic-auth: anyone who reaches the port "
                           "could revoke tasks and shut workers down",
                           hint="Set FLOWER_BASIC_AUTH=user:password (or --basic-auth), or keep --address 127.0.0.1.")
    _check_port(address, port)
    argv = flower_argv(port, address, basic_auth, url_prefix)
    from teamster.tasks.app import app as celery_app  # noqa: PLC0415 - importing it resolves (may start) Redis

    celery_app.start(argv=argv)


def _check_port(address: str, port: int) -> None:
    """Fail with one line when the port is taken (instead of Flower's traceback after start-up)."""
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise InvalidInput(f"cannot serve Flower on {address}:{port}: {exc.strerror or exc}",
                               hint=f"Another process (another Flower?) uses port {port}: stop it, or pick another "
                                    "with --port.") from None


def _report_line(report: WatchdogReport) -> str:
    parts = [f"{k.replace('_', ' ')}={v}" for k, v in report.as_dict().items() if v]
    return f"{datetime.now():%H:%M:%S} watchdog: " + (", ".join(parts) if parts else "nothing to do")


@handle_errors
def watchdog(
    interval: Annotated[float | None, typer.Option("--interval", min=0.1, help="Seconds between scans (default "
                                                   "TEAMSTER_WATCHDOG_INTERVAL_SECONDS, 10).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Scan once, print what it did, and exit.")] = False,
) -> None:
    """Run the watchdog: re-enqueue steps whose worker died (lease expired) or that sat queued too long,
    and escalate runs that made no progress past their deadline.

    A line is printed for every scan that did something. Several watchdogs at once are safe (every action
    is idempotent); `teamster worker --beat` runs the same scan on a schedule.

    Examples:

    ```
    teamster watchdog
    teamster watchdog --once
    ```
    """
    client = make_client()
    dog = client.watchdog()
    if once:
        console.print(escape(_report_line(dog.scan())), highlight=False)
        return
    period = interval or client.settings.watchdog_interval_seconds
    stop = threading.Event()

    def _terminate(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _terminate)
    console.print(f"watchdog scanning every {period:g}s (Ctrl-C stops it)", highlight=False)
    try:
        client.ping()
        dog.run_forever(stop, period, lambda r: console.print(escape(_report_line(r)), highlight=False)
                        if r.total() else None)
    except KeyboardInterrupt:
        stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print("watchdog stopped")
