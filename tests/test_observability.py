"""Observability: Prometheus metrics on a real worker, OpenTelemetry spans in the run's trace, Flower.

Also the foundation's promise: `celery -A teamster.tasks.app worker` and Flower start against the embedded Redis when
no URL is configured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from teamster.config.embedded import free_port, stop_embedded
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from tests.harness import Worker, child_env, http_get, metric_total, wait_settled, wait_until

pytestmark = pytest.mark.integration

MODULES = "tests.workflows,teamster.examples.triage"


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=MODULES.split(",")))


def test_worker_serves_prometheus_metrics(client: Client) -> None:
    port = free_port()
    with Worker("metrics", concurrency=4, env={"workflow_modules": MODULES, "metrics_port": port}):
        ok = client.submit("t_linear", {"text": "metrics please"})
        bad = client.submit("t_linear", {"text": "unsure metrics"})
        retried = client.submit("t_linear", {"text": "throttle-once metrics"})
        for run_id in (ok, bad, retried):
            wait_settled(client, run_id)
        status, text = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(
            http_get(f"http://127.0.0.1:{port}/metrics")), timeout=10)
    assert metric_total(text, "teamster_steps_total", workflow="t_linear", step="summarize", outcome="succeeded") >= 2
    assert metric_total(text, "teamster_steps_total", workflow="t_linear", outcome="cannot_complete") >= 1
    assert metric_total(text, "teamster_retries_total", error_type="model_throttled") >= 1
    assert metric_total(text, "teamster_dead_letters_total", error_type="cannot_complete") >= 1
    assert metric_total(text, "teamster_step_duration_seconds_count", workflow="t_linear") >= 6
    assert metric_total(text, "teamster_model_call_duration_seconds_count", agent="t_summarize") >= 3
    assert metric_total(text, "teamster_tokens_total", agent="t_summarize", kind="inputTokens") > 0
    assert metric_total(text, "teamster_dlq_depth") >= 1  # read from Redis at scrape time
    assert metric_total(text, "teamster_runs", status="succeeded") >= 2
    assert "teamster_lease_expiries_total" in text and "teamster_steps_in_flight" in text


def test_spans_of_a_run_share_its_trace_and_strands_spans_nest_under_them(client: Client) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from teamster.testing import WorkflowEnvironment

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the global provider: strands' tracer uses it too

    with WorkflowEnvironment(MODULES.split(",")) as env:
        run = env.run("t_linear", {"text": "traced"})
    assert run.status.value == "succeeded"
    provider.force_flush()
    spans = exporter.get_finished_spans()
    trace_id = int(run.trace_id, 16)
    step_spans = [s for s in spans if s.name.startswith("step ")]
    assert {s.name for s in step_spans} == {"step summarize", "step label", "step report"}
    assert {s.context.trace_id for s in step_spans} == {trace_id}
    agent_spans = [s for s in spans if s.context.trace_id == trace_id and not s.name.startswith("step ")]
    assert agent_spans, "strands' own spans should land in the run's trace"
    step_ids = {s.context.span_id for s in step_spans}
    assert any(s.parent is not None and s.parent.span_id in step_ids for s in agent_spans)


@pytest.fixture()
def embedded_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = child_env(embedded_dir=tmp_path / "embedded", key_prefix="flowertest", workflow_modules=MODULES)
    env.pop("TEAMSTER_REDIS_URL", None)  # the development default: embedded Redis
    yield env


def test_worker_and_flower_start_against_the_embedded_redis(embedded_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    auth = "ops:s3cret"
    logs = tmp_path / "logs"
    logs.mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "teamster.tasks.app", "worker", "-P", "threads", "-c", "2",
         "-n", "emb@%h", "-Q", "teamster.steps,teamster.control", "-E", "--without-mingle", "--without-gossip",
         "-l", "INFO"],
        env=embedded_env, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    flower: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: " ready." in (logs / "worker.log").read_text(errors="replace"), timeout=60)
        record = json.loads((tmp_path / "embedded" / "embedded.json").read_text())
        assert record["pid"] != worker.pid  # the worker started the embedded server: a daemon of its own
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "teamster.tasks.app", "flower", f"--port={port}",
             f"--basic-auth={auth}"],
            env=embedded_env, stdout=open(logs / "flower.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthcheck")[0] == 200, timeout=30)
        # the flower process reused the same embedded server (no second one was recorded)
        assert json.loads((tmp_path / "embedded" / "embedded.json").read_text()) == record

        # Flower sees tasks only through live events: submit once its event receiver has heard the worker (its
        # healthcheck answers before that; a run sent earlier would be missed, as it was once in a full run)
        wait_until(lambda: re.search(r'flower_worker_online\{worker="emb@[^"]*"\} 1', http_get(
            f"http://127.0.0.1:{port}/metrics")[1]), timeout=30, interval=0.5)
        settings = load_settings(redis_url=record["url"], key_prefix="flowertest", workflow_modules=MODULES.split(","))
        run_id = Client(settings).submit("t_linear", {"text": "seen by flower"})
        wait_settled(Client(settings), run_id)

        def task_listed() -> Any:
            status, body = http_get(f"http://127.0.0.1:{port}/api/tasks?limit=50", auth=auth)
            if status != 200:
                return None
            tasks = json.loads(body)
            return [t for t in tasks.values() if str(t.get("name")).startswith("t_linear.")] or None

        tasks = wait_until(task_listed, timeout=30, interval=0.5)
        assert any(f"'run_id': '{run_id}'" in str(t.get("kwargs")) for t in tasks)  # readable JSON args
        assert http_get(f"http://127.0.0.1:{port}/api/tasks")[0] == 401  # the API needs the basic auth ...
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # ... but /metrics does not: keep it private
        assert {t["name"] for t in tasks} <= {"t_linear.summarize:t_summarize", "t_linear.label:t_label",
                                             "t_linear.report"}  # findable by workflow, step and agent
        os.killpg(worker.pid, 15)  # the worker that started the embedded Redis stops ...
        worker.wait(30)
        assert redis.Redis.from_url(record["url"]).ping()  # ... and Flower's Redis is still there
        assert http_get(f"http://127.0.0.1:{port}/healthcheck")[0] == 200
    finally:
        for proc in (flower, worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        stop_embedded(load_settings(redis_url=None, embedded_dir=tmp_path / "embedded"))
