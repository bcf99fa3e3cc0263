"""Settings and Celery configuration (unit tests: no broker)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads, prepare_accept_content

from teamster.config.celeryconfig import STEP_TASK, build_celery_config
from teamster.config.settings import DEFAULT_MODEL, TeamsterSettings, load_settings
from teamster.errors import InvalidSettings


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("TEAMSTER_REDIS_URL", "TEAMSTER_KEY_PREFIX", "TEAMSTER_MODEL", "TEAMSTER_EMBEDDED_DIR"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_are_documented_and_sane(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.redis_url is None  # embedded default
    assert s.model == DEFAULT_MODEL and s.model.startswith("bedrock:")
    assert s.key_prefix == "teamster"
    assert s.worker_pool == "threads"
    assert s.visibility_timeout > 2 * s.retry_backoff_max
    assert s.lease_renew_seconds == pytest.approx(s.lease_seconds / 3)
    for name, field in TeamsterSettings.model_fields.items():
        assert field.description and "default" in field.description.lower(), f"{name} lacks a documented default"


def test_env_overrides(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TEAMSTER_REDIS_URL", "redis://example:6380/2")
    clean_env.setenv("TEAMSTER_LEASE_SECONDS", "12.5")
    clean_env.setenv("TEAMSTER_WORKFLOW_MODULES", "a.b, c.d")
    clean_env.setenv("TEAMSTER_MODEL", "openai:gpt-4o-mini")
    clean_env.setenv("TEAMSTER_METRICS_PORT", "9808")
    s = load_settings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.lease_seconds == 12.5
    assert s.workflow_modules == ["a.b", "c.d"]
    assert s.model == "openai:gpt-4o-mini"
    assert s.metrics_port == 9808
    # explicit overrides win over the environment
    assert load_settings(lease_seconds=3).lease_seconds == 3


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("TEAMSTER_LEASE_SECONDS", "-1", "TEAMSTER_LEASE_SECONDS"),
        ("TEAMSTER_REDIS_URL", "http://nope", "TEAMSTER_REDIS_URL"),
        ("TEAMSTER_VISIBILITY_TIMEOUT", "60", "visibility_timeout"),
        ("TEAMSTER_WORKER_POOL", "bogus", "TEAMSTER_WORKER_POOL"),
    ],
)
def test_invalid_settings_are_a_typed_error_naming_the_variable(
    clean_env: pytest.MonkeyPatch, var: str, value: str, fragment: str
) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(InvalidSettings) as info:
        load_settings()
    assert fragment in str(info.value)


def test_celery_config_is_reliable_and_json_only() -> None:
    s = load_settings(redis_url="redis://h:1/0", key_prefix="p")
    conf = build_celery_config(s, "redis://h:1/0")
    assert conf["accept_content"] == ["json"] and conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1 and conf["worker_disable_prefetch"] is True
    assert conf["task_track_started"] is True and conf["worker_send_task_events"] is True
    assert conf["broker_transport_options"]["visibility_timeout"] == s.visibility_timeout
    assert conf["broker_transport_options"]["global_keyprefix"].startswith("p:")
    assert conf["result_expires"] == s.result_expires
    assert conf["task_routes"][STEP_TASK]["queue"] == s.steps_queue


def test_pool_threads_share_one_result_backend() -> None:
    """With the threads pool, Celery builds a result backend per thread unless the backend is thread-safe: with
    -c 500 that is 500 Redis clients (and pools), each built in the middle of a step."""
    import threading

    from celery import Celery

    conf = build_celery_config(load_settings(redis_url="redis://h:1/0", key_prefix="p"), "redis://h:1/0")
    assert conf["result_backend_thread_safe"] is True
    app = Celery("t", set_as_current=False)
    app.config_from_object(conf)
    first = app.backend  # as a worker builds it at start-up (worker_init, tasks/signals.py), before its pool
    seen: list[int] = []
    threads = [threading.Thread(target=lambda: seen.append(id(app.backend))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [id(first)] * 8


def test_worker_garbage_collection_is_tuned_at_start_up() -> None:
    """With Python's default (700), a worker with hundreds of steps in flight re-scans their objects again and
    again; the worker freezes its start-up objects and collects the young generation every worker_gc_threshold
    allocations (0: Python's settings are left alone)."""
    import gc

    from teamster.tasks.signals import _tune_gc

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        _tune_gc(0)
        assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
        _tune_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > frozen  # this process's imports, at least
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert load_settings().worker_gc_threshold == 50_000
    with pytest.raises(InvalidSettings, match="TEAMSTER_WORKER_GC_THRESHOLD"):
        load_settings(worker_gc_threshold=-1)


def test_celery_app_refuses_pickle() -> None:
    from teamster.tasks.app import app

    content_type, encoding, body = dumps({"x": 1}, serializer="pickle")
    assert content_type == "application/x-python-serialize"
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=prepare_accept_content(app.conf.accept_content))
    # JSON passes through the same gate
    content_type, encoding, body = dumps({"x": 1}, serializer="json")
    assert loads(body, content_type, encoding, accept=prepare_accept_content(app.conf.accept_content)) == {"x": 1}
    assert pickle.dumps(1)  # (pickle itself works; it is the app that refuses it)


def test_embedded_dir_default_is_under_home(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().embedded_dir == Path.home() / ".cache" / "teamster"
