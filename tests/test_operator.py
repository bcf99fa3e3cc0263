"""What operators meet outside Flower: the Flower and worker commands, the plain Celery entry point, the demo's
shutdown, `teamster doctor`'s two purposes, unknown settings, and secrets kept out of logs and results."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from teamster.config.embedded import free_port, stop_embedded
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from tests.harness import Worker, child_env, wait_settled, wait_until

pytestmark = pytest.mark.integration

SECRET = "sk-" + "Q" * 8 + "z9" * 10  # an OpenAI-style key


def teamster(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teamster.orchestrator.cli", *args], env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A shell with no TEAMSTER_REDIS_URL: the embedded Redis of its own directory, the default (Bedrock) model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEAMSTER_", "AWS_"))}
    env.update(TEAMSTER_EMBEDDED_DIR=str(tmp_path / "embedded"), HOME=str(tmp_path), PYTHONUNBUFFERED="1",
               COLUMNS="200", **extra)
    return env


# --------------------------------------------------------------------------- processes


def test_flower_refuses_every_interface_without_auth_and_a_busy_port_in_one_line() -> None:
    exposed = teamster("flower", "--address", "0.0.0.0", "--port", str(free_port()))
    assert exposed.returncode == 1 and exposed.stderr.count("\n") == 2, exposed.stderr
    assert "without --basic-auth" in exposed.stderr and "FLOWER_BASIC_AUTH" in exposed.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = teamster("flower", "--port", str(taken.getsockname()[1]), "--basic-auth", "ops:pw")
    assert busy.returncode == 1 and busy.stderr.count("\n") == 2, busy.stderr
    assert "cannot serve Flower" in busy.stderr and "--port" in busy.stderr


def test_worker_with_redis_down_says_so_in_one_line() -> None:
    env = child_env(redis_url="redis://127.0.0.1:1/0", model="scripted")
    result = teamster("worker", "--redis-wait", "1", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[0].startswith("error store_unavailable: cannot reach Redis")
    assert "Traceback" not in result.stderr + result.stdout


def test_a_plain_celery_worker_serves_run_starts_from_plain_clients(tmp_path: Path) -> None:
    client = Client(load_settings(workflow_modules=["tests.workflows"]))
    env = child_env(workflow_modules="tests.workflows")
    log = tmp_path / "plain.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "teamster.tasks.app", "worker", "-P", "threads",
                             "-c", "2", "-n", "plain@%h", "-l", "INFO"], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: " ready." in log.read_text(errors="replace"), timeout=60)
        plain = Celery(broker=client.redis_url, backend=client.redis_url)
        prefix = f"{client.settings.key_prefix}:celery:"
        plain.conf.update(broker_transport_options={"global_keyprefix": prefix},
                          result_backend_transport_options={"global_keyprefix": prefix})
        reply = plain.send_task("teamster.start_run", queue="teamster.control", kwargs={"message": {
            "workflow": "t_linear", "input": {"text": "plain worker, no -Q"}}}).get(timeout=30)
        assert wait_settled(client, reply["run_id"]).status.value == "succeeded"
        assert "teamster.control" in log.read_text() and "teamster.steps" in log.read_text()  # both queues
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _running(node: str) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if node.encode() in (entry / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_demo_stops_its_worker_on_termination_signals(tmp_path: Path, signum: int) -> None:
    env = offline_env(tmp_path, TEAMSTER_SCRIPTED_LATENCY="0.5")
    demo = subprocess.Popen([sys.executable, "-m", "teamster.orchestrator.cli", "demo", "--tickets", "40"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert demo.stdout is not None
        node = ""
        for line in demo.stdout:
            if "local worker" in line and "started" in line:
                node = line.split("local worker ", 1)[1].split("@", 1)[0]
                break
        assert node.startswith("teamster-local-"), "the demo's worker did not start"
        assert _running(node)
        demo.send_signal(signum)
        out, _ = demo.communicate(timeout=60)
        assert demo.returncode == 130, out
        assert "the local worker and watchdog were stopped" in out
        wait_until(lambda: not _running(node), timeout=10, message=f"the demo's worker {node} outlived it")
    finally:
        if demo.poll() is None:
            demo.kill()
        stop_embedded(load_settings(redis_url=None, embedded_dir=tmp_path / "embedded"))


_EXEC_CHILD = """
import signal, sys
from teamster.orchestrator.processes import raise_terminated  # the demo's handler
signal.signal(signal.SIGTERM, raise_terminated)
signal.signal(signal.SIGHUP, raise_terminated)
try:  # the signal can come as soon as "ready" is out
    print("ready", flush=True)
    while True:  # code compiled from a string, the way namedtuple, dataclasses and pydantic build methods
        exec("x = 0\\nfor i in range(200): x += i")
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_landing_in_exec_code_still_exits_130(tmp_path: Path, signum: int) -> None:
    """The demo's signal handler raises a KeyboardInterrupt subclass: a bare one raised inside code run by ``exec``
    made CPython end the process by SIGINT (-2) after the demo had caught it and asked for 130."""
    (tmp_path / "exec_child.py").write_text(_EXEC_CHILD)
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-m", "exec_child"], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signum)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 130, out


# --------------------------------------------------------------------------- doctor and settings


def test_doctor_after_the_offline_demo_is_ready_for_development_not_production(tmp_path: Path) -> None:
    env = offline_env(tmp_path, TEAMSTER_WORKR_CONCURRENCY="4")  # a typo
    try:
        dev = teamster("doctor", env=env)
        assert dev.returncode == 0, dev.stdout + dev.stderr
        assert "checking: ready for offline development" in dev.stdout
        assert "ready for development" in dev.stdout
        assert "fine offline" in dev.stdout  # no AWS credentials: a warning here
        assert "TEAMSTER_WORKR_CONCURRENCY is not a teamster setting" in dev.stdout
        assert "TEAMSTER_WORKER_CONCURRENCY" in dev.stdout  # the suggestion
        prod = teamster("doctor", "--for", "production", "--json", env=env)
        assert prod.returncode == 1
        report = json.loads(prod.stdout)
        assert report["checked_for"] == "production" and report["ready"] is False
        assert any(c["name"] == "model provider" and c["status"] == "FAIL" for c in report["checks"])
    finally:
        stop_embedded(load_settings(redis_url=None, embedded_dir=tmp_path / "embedded"))


def test_a_worker_reports_unknown_teamster_variables_at_start_up() -> None:
    with Worker("typo", concurrency=1, env={"workflow_modules": "tests.workflows",
                                            "leese_seconds": "5"}) as worker:
        wait_until(lambda: "TEAMSTER_LEESE_SECONDS is not a teamster setting" in worker.log(), timeout=30)
        assert "did you mean TEAMSTER_LEASE_SECONDS?" in worker.log()


# --------------------------------------------------------------------------- redaction


@pytest.fixture(scope="module")
def hostile_worker() -> Iterator[Worker]:
    with Worker("redact", concurrency=2, env={"workflow_modules": "tests.workflows,tests.hostile_flows"}) as w:
        yield w


def test_secrets_in_step_data_reach_no_log_no_result_and_no_dead_letter_entry(hostile_worker: Worker) -> None:
    client = Client(load_settings(workflow_modules=["tests.workflows", "tests.hostile_flows"]))
    run = wait_settled(client, client.submit("h_crash", {"text": f"my key is {SECRET}"}), timeout=60)
    assert run.status.value == "escalated"
    entry = client.dlq.get(run.error["dlq_entry"])
    assert SECRET not in json.dumps(entry.model_dump(mode="json"))
    assert "[REDACTED]" in entry.message and "[REDACTED]" in json.dumps(entry.input)
    wait_until(lambda: "[REDACTED]" in hostile_worker.log(), timeout=30)
    assert SECRET not in hostile_worker.log()
    stored = client.runtime.client.get(f"{client.settings.key_prefix}:celery:celery-task-meta-{run.run_id}:work")
    assert stored is not None and SECRET not in stored and "[REDACTED]" in stored  # the FAILURE result
    ok = wait_settled(client, client.submit("t_linear", {"text": f"fine, {SECRET}"}))
    assert ok.status.value == "succeeded"
    wait_until(lambda: f"[{ok.run_id}:report] succeeded" in hostile_worker.log(), timeout=30)  # all logged
    assert SECRET not in hostile_worker.log()
