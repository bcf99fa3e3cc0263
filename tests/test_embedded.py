"""The embedded development Redis: started when no URL is configured, shared, with its own lifecycle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from teamster.config.embedded import (
    EmbeddedRedis,
    embedded_status,
    resolve_redis_url,
    start_embedded,
    stop_embedded,
)
from teamster.config.settings import load_settings
from teamster.errors import ConfigurationError


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


def test_unset_url_starts_a_shared_server_that_outlives_its_starter_until_stopped(tmp_path: Path) -> None:
    # A child process with no URL starts the embedded server, records it, reports the URL and exits.
    code = textwrap.dedent(
        f"""
        from teamster.config.settings import load_settings
        from teamster.config.embedded import resolve_redis_url
        print(resolve_redis_url(load_settings(redis_url=None, embedded_dir={str(tmp_path)!r})), flush=True)
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TEAMSTER_REDIS_URL"}
    settings = load_settings(redis_url=None, embedded_dir=tmp_path)
    try:
        starter = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, text=True, timeout=60)
        url = starter.stdout.strip()
        assert starter.returncode == 0 and url.startswith("redis://127.0.0.1:"), starter.stderr
        assert json.loads((tmp_path / "embedded.json").read_text())["url"] == url
        # the starter is gone; the server is not: another process reuses it instead of starting a second one
        assert redis.Redis.from_url(url).ping()
        assert resolve_redis_url(settings) == url
        status = embedded_status(settings)
        assert status is not None and status["url"] == url and isinstance(status["pid"], int)
        redis.Redis.from_url(url).set("kept", "yes")
    finally:
        assert stop_embedded(settings)
    assert embedded_status(settings) is None and not stop_embedded(settings)
    # started again, at the same address, with its data (AOF)
    assert start_embedded(settings) == (url, True)
    try:
        assert redis.Redis.from_url(url).get("kept") == b"yes"
    finally:
        stop_embedded(settings)


def test_an_unusable_embedded_dir_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigurationError) as info:
        resolve_redis_url(load_settings(redis_url=None, embedded_dir=tmp_path / "file" / "sub"))
    assert "cannot use" in info.value.message and "TEAMSTER_EMBEDDED_DIR" in info.value.hint
