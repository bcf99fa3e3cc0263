"""A worker process claims no more steps at once than its agent loop keeps up with (agents/loop.py, Admission)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid

import pytest

from teamster.agents.loop import Admission, AgentLoop
from teamster.config.embedded import free_port
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from tests.harness import Worker, http_get, metric_total, wait_settled, wait_until

MODULES = "tests.workflows"


def lag(admission: Admission, seconds: float, times: int = 40) -> None:
    for _ in range(times):
        admission.observe(seconds)


def waiting_step(admission: Admission) -> tuple[threading.Thread, threading.Event]:
    """A step's thread that asks for a slot, once it waits for one; the event is set when it has the slot."""
    entered = threading.Event()

    def step() -> None:
        with admission.slot():
            entered.set()

    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    wait_until(lambda: admission.waiting == 1, timeout=10)
    return thread, entered


def test_a_lagging_loop_lowers_the_limit_and_steps_wait_unclaimed_for_a_slot() -> None:
    admission = Admission(ceiling=10, max_lag=0.05, floor=2)
    held = [contextlib.ExitStack() for _ in range(6)]
    for stack in held:
        stack.enter_context(admission.slot())
    assert admission.in_flight == 6 and admission.limit == 8  # it starts at four times the floor
    lag(admission, 1.0)
    assert admission.limit == 2  # shrunk from the steps in flight down to the floor, not below
    thread, entered = waiting_step(admission)
    for stack in held[:4]:  # 6 -> 2 in flight: still at the limit
        stack.close()
    assert admission.in_flight == 2 and admission.waiting == 1 and not entered.is_set()  # its step is unclaimed
    held[4].close()  # 1 in flight: below the limit, the waiting step goes on
    wait_until(entered.is_set, timeout=10)
    thread.join(timeout=10)
    held[5].close()
    assert admission.in_flight == 0 and admission.waiting == 0


def test_the_limit_grows_back_while_steps_wait_and_the_loop_keeps_up() -> None:
    assert Admission(ceiling=500, max_lag=0.05).limit == 32  # 4 x the floor of 8 at start-up
    assert Admission(ceiling=500, max_lag=0.0).limit == 500  # off: the concurrency is the only bound
    admission = Admission(ceiling=40, max_lag=0.05, floor=4)
    with contextlib.ExitStack() as held:
        for _ in range(4):
            held.enter_context(admission.slot())
        lag(admission, 1.0)
        assert admission.limit == 4
        thread, entered = waiting_step(admission)
        lag(admission, 0.0, times=20)  # the lag decays below half of max_lag: the limit grows, a slot opens
        wait_until(entered.is_set, timeout=10)
        thread.join(timeout=10)
        grown = admission.limit
        assert 4 < grown <= 40
        lag(admission, 0.0, times=200)
        assert admission.limit == grown  # it grows only while steps wait for a slot: none does now
    assert admission.in_flight == 0


def test_a_step_always_runs_when_none_is_in_flight_and_zero_max_lag_never_limits() -> None:
    admission = Admission(ceiling=3, max_lag=0.05, floor=1)
    lag(admission, 5.0)
    assert admission.limit == 1
    with admission.slot() as waited:
        assert waited < 5  # nothing in flight: no wait for a slot
    off = Admission(ceiling=3, max_lag=0.0)
    lag(off, 5.0)
    assert off.limit == 3 and off.lag > 1  # measured, but it does not limit


def test_the_agent_loop_measures_its_own_lag() -> None:
    """A loop blocked for 0.3 s at a time (a synchronous call on the loop: what hundreds of steps' CPU amounts to)
    shows as lag, and the limit of the process falls; once the loop is free again, the lag decays."""
    admission = Admission(ceiling=100, max_lag=0.02, floor=3)
    loop = AgentLoop(tool_threads=2, name="teamster-test-lag", admission=admission)

    async def block() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
        await asyncio.sleep(0)

    for _ in range(5):
        loop.submit(block()).result(timeout=10)
    wait_until(lambda: admission.lag > 0.02 and admission.limit < 100, timeout=10)
    wait_until(lambda: admission.lag < 0.01, timeout=30)
    loop.loop.call_soon_threadsafe(loop.loop.stop)


def test_the_shared_loop_admits_by_the_worker_settings() -> None:
    settings = load_settings(worker_concurrency=250, worker_max_loop_lag=0.2)
    admission = Admission(ceiling=settings.worker_concurrency, max_lag=settings.worker_max_loop_lag)
    assert (admission.ceiling, admission.max_lag, admission.floor) == (250, 0.2, 8)
    assert load_settings().worker_max_loop_lag == 0.05
    shared = AgentLoop.shared().admission
    assert shared.ceiling == load_settings().worker_concurrency


def _metric(port: int, name: str) -> float:
    return metric_total(http_get(f"http://127.0.0.1:{port}/metrics")[1], name)


@pytest.mark.integration
def test_a_real_worker_runs_no_more_steps_at_once_than_its_limit_and_every_step_succeeds() -> None:
    """16 threads, a lag limit of 1 us (any loop is later than that): the worker's limit stays at its floor of 8, so
    at most 8 steps are claimed at once while the others wait for a slot, and every run still succeeds."""
    queue, port = f"admission-{uuid.uuid4().hex[:6]}", free_port()
    env = {"workflow_modules": MODULES, "worker_max_loop_lag": 0.000001, "scripted_latency": 0.3,
           "steps_queue": queue, "metrics_port": port}
    client = Client(load_settings(workflow_modules=[MODULES], steps_queue=queue))
    with Worker("admission", concurrency=16, queues=queue, env=env):
        wait_until(lambda: _metric(port, "teamster_worker_step_limit") == 8, timeout=30)
        run_ids = [client.submit("t_linear", {"text": f"admitted {i}"}) for i in range(24)]
        for run_id in run_ids:
            assert wait_settled(client, run_id, timeout=180).status.value == "succeeded"
        waited = _metric(port, "teamster_worker_admission_wait_seconds_total")
    claimed = [(s.started_at, s.finished_at) for run_id in run_ids for s in client.steps(run_id)]
    assert all(start is not None and end is not None for start, end in claimed)
    edges = sorted([(start, 1) for start, _ in claimed] + [(end, -1) for _, end in claimed])
    running = peak = 0
    for _, change in edges:  # an end sorts before a start at the same instant
        running += change
        peak = max(peak, running)
    assert 2 <= peak <= 8  # steps ran side by side, never more than the limit
    assert waited > 0  # steps waited for a slot, unclaimed
