"""The embedded development Redis: started when no URL is configured, reused, stopped by its owner."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import redis

from teamster.config.embedded import EmbeddedRedis, resolve_redis_url
from teamster.config.settings import load_settings


def test_explicit_url_wins(tmp_path: Path) -> None:
    s = load_settings(redis_url="redis://10.0.0.1:6379/0", embedded_dir=tmp_path)
    assert resolve_redis_url(s) == "redis://10.0.0.1:6379/0"
    assert not (tmp_path / "embedded.json").exists()


def test_embedded_server_is_real_and_persists_with_aof(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    url = server.start()
    client = redis.Redis.from_url(url)
    try:
        client.set("k", "v")
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.execute_command("CONFIG", "SET", "appendfsync", "always")
        client.set("k2", "v2")
        server.restart()  # SIGKILL + start: what AOF acknowledged survives
        assert client.get("k2") == b"v2"
    finally:
        client.close()
        server.stop()


def test_unset_url_starts_then_reuses_then_owner_stops(tmp_path: Path) -> None:
    # A child process with no URL starts the embedded server, records it, and reports the URL.
    code = textwrap.dedent(
        f"""
        import sys, time
        from teamster.config.settings import load_settings
        from teamster.config.embedded import resolve_redis_url
        s = load_settings(redis_url=None, embedded_dir={str(tmp_path)!r})
        print(resolve_redis_url(s), flush=True)
        sys.stdin.readline()
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TEAMSTER_REDIS_URL"}
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert owner.stdout is not None and owner.stdin is not None
        url = owner.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        assert json.loads((tmp_path / "embedded.json").read_text())["url"] == url
        # Another process (here: this one) reuses it instead of starting a second server.
        assert resolve_redis_url(load_settings(redis_url=None, embedded_dir=tmp_path)) == url
        assert redis.Redis.from_url(url).ping()
        owner.stdin.write("\n")
        owner.stdin.flush()
        owner.wait(15)
    finally:
        owner.kill()
    # The owner stopped it at exit.
    try:
        alive = redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        alive = False
    assert not alive
