"""What Flower sees: the Celery events a worker sends for teamster steps (Flower builds every page from them).

A step that ends without success is a FAILURE whose exception is its typed reason and names its dead-letter entry
(and is not redelivered); a retried step is a RETRY whose reason is its typed error; tasks carry the name
``workflow.step[:agent]`` (Celery's shadow name), so Flower can filter by workflow and agent; only workers send
events (a client that submits is not a worker in Flower).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.enqueue import producer_app
from tests.harness import Worker, wait_settled, wait_until

pytestmark = pytest.mark.integration

MODULES = "tests.workflows"


class EventLog:
    """Captures the worker events of the deployment in a thread, as Flower does."""

    def __init__(self, client: Client) -> None:
        self.app = producer_app(client.settings, client.redis_url)
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
            self.ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventLog:
        self._thread.start()
        self.ready.wait(10)
        time.sleep(0.5)  # the receiver subscribes right after it is built
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)

    def of(self, task_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("uuid") == task_id and e.get("type") == kind]


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(load_settings(workflow_modules=[MODULES]))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker("flowerview", concurrency=4, env={"workflow_modules": MODULES}) as w:
        yield w


def test_flower_sees_names_failures_and_retry_reasons(client: Client, worker: Worker) -> None:
    with EventLog(client) as log:
        ok = client.submit("t_linear", {"text": "all good"})
        retried = client.submit("t_linear", {"text": "throttle-once then fine"})
        failed = client.submit("t_linear", {"text": "unsure what to do"})
        for run_id in (ok, retried, failed):
            wait_settled(client, run_id)
        wait_until(lambda: log.of(f"{failed}:summarize", "task-failed")
                   and log.of(f"{ok}:report", "task-succeeded"), timeout=30)

    # every step task is named after its workflow, step and agent
    received = log.of(f"{ok}:summarize", "task-received")
    assert received and received[0]["name"] == "t_linear.summarize:t_summarize"
    assert log.of(f"{ok}:report", "task-received")[0]["name"] == "t_linear.report"  # a function step: no agent
    assert log.of(f"{ok}:summarize", "task-succeeded")

    # the dead-lettered step is a FAILURE with its typed reason and its entry; it is not redelivered
    entry = client.status(failed).error["dlq_entry"]
    failure = log.of(f"{failed}:summarize", "task-failed")
    assert len(failure) == 1
    assert "StepCannotComplete" in failure[0]["exception"] and "cannot_complete" in failure[0]["exception"]
    assert entry in failure[0]["exception"]
    assert not log.of(f"{failed}:summarize", "task-succeeded")
    assert len(log.of(f"{failed}:summarize", "task-received")) == 1

    # the retried attempt says why; the retry message keeps the step's name
    retry = log.of(f"{retried}:summarize", "task-retried")
    assert retry and "ModelThrottled" in retry[0]["exception"] and "model_throttled" in retry[0]["exception"]
    names = {e["name"] for e in log.of(f"{retried}:summarize", "task-received")}
    assert names == {"t_linear.summarize:t_summarize"} and len(log.of(f"{retried}:summarize", "task-received")) == 2

    # only workers send events: the submitting client is not a worker in Flower
    hostnames = {e.get("hostname") for e in log.events if e.get("type", "").startswith("task-")}
    assert hostnames and all(str(h).startswith("flowerview@") for h in hostnames), hostnames


def test_sending_a_step_subscribes_to_no_result_channel(client: Client) -> None:
    """Nobody waits on a step task's Celery result: sending one must not subscribe to its result channel (nor leave
    an unsubscribe for the AsyncResult's finalizer to send)."""
    from teamster.orchestrator.enqueue import CeleryEnqueuer  # noqa: PLC0415

    enqueuer = CeleryEnqueuer.for_settings(client.settings, client.redis_url)
    consumer = enqueuer.app.backend.result_consumer
    run_id = f"run_{'0' * 24}"  # no such run: a worker answers it as missing
    enqueuer.enqueue(run_id, "nothing")
    # Celery's Redis result consumer opens its pubsub on the first subscription; the AsyncResult send_task returned
    # is already gone, so a subscription would also have been undone by now (SUBSCRIBE, then UNSUBSCRIBE from __del__)
    assert consumer._pubsub is None  # noqa: SLF001 - no public way to ask whether it ever subscribed
