"""The production path with real parts: real worker processes, strands' OpenAIModel and the openai SDK over real
HTTP to a local OpenAI-compatible server (``bench/model_server.py``), a real Redis.

* a model call that never answers ends its step by the deadline (+5 s at most) as a typed, retryable
  ``step_timeout``, retried per policy, then dead-lettered; the worker stays healthy and keeps serving;
* a tool that blocks far past the budget is abandoned at the deadline (journaled), the step ends typed;
* a deliberately tiny Redis pool under many concurrent steps: every step ends with exactly one outcome, none is
  left running, no connection-pool error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.model_server import ModelServer
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.models import STEP_TERMINAL, StepStatus
from tests.harness import Worker, wait_settled, wait_until

pytestmark = pytest.mark.integration

MODULES = "tests.production_flows"  # imported by the workers only (its agents name real providers)
BUDGET_SECONDS = 2.0  # the budget of prod_hang and prod_blocking (tests/production_flows.py)
GRACE = 5.0  # the guarantee: no attempt runs past its budget plus 5 s


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer(latency=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def client(model_server: ModelServer) -> Client:
    return Client(load_settings(workflow_modules=[MODULES], model_base_url=model_server.url))


@pytest.fixture(scope="module")
def worker(model_server: ModelServer) -> Iterator[Worker]:
    env = {"workflow_modules": MODULES, "model": "openai:default", "model_base_url": model_server.url}
    with Worker("prod", concurrency=8, env=env) as w:
        yield w


def test_real_provider_path_answers_over_http(client: Client, worker: Worker, model_server: ModelServer) -> None:
    before = model_server.stats()["completed"]
    run = wait_settled(client, client.submit("prod_http", {"text": "hello"}))
    assert run.status.value == "succeeded", run.error
    assert run.output["ask"]["answer"]  # a schema-valid structured output, parsed by strands from a tool call
    calls = client.journal(run.run_id, types=["model_call"])
    assert calls and calls[0].data["stop_reason"] == "tool_use" and not calls[0].data.get("error")
    assert model_server.stats()["completed"] > before


def test_a_model_call_that_never_answers_ends_by_the_deadline_typed_and_retried(
        client: Client, worker: Worker, model_server: ModelServer) -> None:
    run = wait_settled(client, client.submit("prod_hang", {"text": "anyone there? [hang]"}), timeout=90)
    assert run.status.value == "escalated"
    assert run.error["error_type"] == "step_timeout"
    step = client.steps(run.run_id)[0]
    assert step.status == StepStatus.FAILED and step.attempts == 2  # the agent's RetryPolicy(max_attempts=2)
    outcomes = client.journal(run.run_id, types=["outcome"])
    assert [o.data["outcome"]["error_type"] for o in outcomes] == ["step_timeout", "step_timeout"]
    for outcome in outcomes:  # each attempt ended by its deadline, not the SDK's 10-minute read timeout
        assert outcome.data["duration_seconds"] < BUDGET_SECONDS + GRACE, outcome.data
    assert [r.data["error_type"] for r in client.journal(run.run_id, types=["retry"])] == ["step_timeout"]
    entry = client.dlq.get(run.error["dlq_entry"])
    assert entry.error_type == "step_timeout" and entry.retryable and entry.attempts == 2
    assert model_server.stats()["hung"] >= 2
    # the worker is healthy: it serves the next run at once
    assert worker.alive()
    assert wait_settled(client, client.submit("prod_http", {"text": "still there"})).status.value == "succeeded"


def test_a_tool_that_blocks_past_the_budget_is_abandoned_at_the_deadline(client: Client, worker: Worker) -> None:
    run = wait_settled(client, client.submit("prod_blocking", {"text": "where is A1?"}), timeout=60)
    assert run.status.value == "escalated" and run.error["error_type"] == "step_timeout"
    abandoned = client.journal(run.run_id, types=["tool_abandoned"])
    assert [a.data["tool"] for a in abandoned] == ["wait_for_warehouse"]
    outcome = client.journal(run.run_id, types=["outcome"])[-1]
    assert outcome.data["duration_seconds"] < BUDGET_SECONDS + GRACE
    assert not client.journal(run.run_id, types=["tool_result"])  # the late result is never seen
    assert worker.alive()


def test_a_tiny_redis_pool_under_many_concurrent_steps_strands_nothing(model_server: ModelServer) -> None:
    """32 threads share 4 Redis connections: commands wait for a connection instead of failing. (Admission is off:
    all 32 threads run steps at once however late the loop is on a loaded machine.)"""
    env = {"workflow_modules": MODULES, "redis_max_connections": 4, "redis_pool_timeout": 60,
           "steps_queue": "tinypool", "model_base_url": model_server.url, "worker_max_loop_lag": 0}
    tiny = Client(load_settings(workflow_modules=[MODULES], steps_queue="tinypool"))
    with Worker("tinypool", concurrency=32, queues="tinypool", env=env) as w:
        run_ids = [tiny.submit("prod_pair", {"text": f"pool {i}"}) for i in range(120)]
        for run_id in run_ids:
            assert wait_settled(tiny, run_id, timeout=180).status.value == "succeeded"
        log = w.log()
    assert "Too many connections" not in log and "ConnectionError" not in log
    for run_id in run_ids:
        steps = tiny.steps(run_id)
        assert [s.status for s in steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
        assert all(s.status in STEP_TERMINAL for s in steps)
        assert len(tiny.journal(run_id, types=["commit"])) == 2  # exactly one outcome per step
    wait_until(lambda: not [m for m in tiny.runtime.client.zrange(tiny.runtime.keys.inflight, 0, -1)
                            if m.split("|")[0] in set(run_ids)], timeout=10)
