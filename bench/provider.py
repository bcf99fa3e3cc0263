"""The real provider path at production concurrency: teamster workers vs the bare SDK, same requests, same run.

    python -m bench.provider                       # 1 s latency at 500 in flight, 30 s latency at 1000
    python -m bench.provider --scenarios 1:256 --window 20

Every model call goes over real HTTP, through strands' ``OpenAIModel`` and the ``openai`` SDK, to the local
OpenAI-compatible server of :mod:`bench.model_server` (its own process; it answers after ``latency`` seconds with
the structured-output tool call strands asks for). For each scenario (``latency:concurrency``):

* **floor** -- one asyncio process, one shared ``AsyncOpenAI`` client, the very requests strands sends (built with
  strands' own ``OpenAIModel.format_request``), ``concurrency`` of them in flight, for the window;
* **strands floor** -- the floor's process making each call through a fresh strands ``Agent`` (the same model,
  prompt and structured output as a teamster step): what strands costs, with no Celery and no run store;
* **Celery floor** -- one worker process per core running teamster's Celery app and configuration on a backlog of
  raw Celery tasks, each making the floor's request with the worker's shared client on its agent loop and storing no
  result (a step stores none; the calls the server completed in the window are counted): what Celery as the unit of
  delivery costs, with no strands and no run store (the most any design that keeps Celery can do);
* **Celery + strands floor** -- the Celery floor's workers running a fresh strands ``Agent`` per task (the strands
  floor's call) instead of the bare request: the most any design that keeps both Celery as the unit of delivery and a
  fresh ``Agent`` per step can do. The teamster workers' ratio to it (same number of workers) is teamster's own cost:
  run store, journal, provider gate, leases, validation;
* **one worker** -- one ``teamster worker`` (threads pool, ``-c concurrency``) on a backlog of one-step runs;
* **one worker per core** -- ``cpu_count`` workers sharing the same total concurrency.

A backlog outlasts its window, so each row that uses Redis deletes its keys when it is done, and the private Redis
compacts its append-only file before the next row: no row runs beside the previous one's leftovers or an AOF rewrite
they set off (a fork and a full rewrite, on one of the host's cores).

Reported: steps (or requests) per second in the window and as a ratio of the floor (and, for the teamster row with
as many workers, of the Celery + strands floor); steps in flight (max and
time-average, from the step records) and model calls in flight (max and mean, from the server); worker CPU ms per
step; the workers' total RSS; p50/p99 of claim -> commit (floor: request -> last byte); Redis connection-pool errors
in the worker logs; steps left running after the backlog drained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import (
    REPO_ROOT,
    BenchEnv,
    BenchError,
    BenchWorker,
    Ticker,
    add_common_args,
    bench_env,
    console,
    cpu_count,
    cpu_seconds,
    fmt,
    machine_info,
    percentile,
    print_table,
    ratio,
    run_main,
    write_results,
)
from bench.bench_workflows import (
    AGENT_TASK,
    SDK_TASK,
    SINGLE_STEP,
    SINGLE_WORKFLOW,
    BenchInput,
    bench_agent,
    strands_step,
)
from bench.concurrency import sweep
from bench.model_server import ModelServerProcess
from teamster.agents.providers import aiohttp_available, provider_http_client
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.enqueue import producer_app
from teamster.orchestrator.models import StepStatus

__all__ = ["main", "build_parser", "floor_requests", "parse_scenarios"]

NAME = "provider"
POOL_ERRORS = re.compile(r"Too many connections|MaxConnectionsError|ConnectionError|No connection available")


def parse_scenarios(text: str) -> list[tuple[float, int]]:
    """``"1:500,30:1000"`` -> ``[(1.0, 500), (30.0, 1000)]`` (latency seconds, concurrency)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        latency, _, concurrency = part.partition(":")
        out.append((float(latency), int(concurrency or 256)))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


# --------------------------------------------------------------------------- the floor


def floor_requests(model_id: str) -> dict[str, Any]:
    """The request strands' ``OpenAIModel`` sends for one step of the benchmark agent (same tools, same prompt)."""
    from strands.models.openai import OpenAIModel  # noqa: PLC0415
    from strands.tools.structured_output.structured_output_utils import convert_pydantic_to_tool_spec  # noqa: PLC0415

    from teamster.agents.outcomes import outcome_envelope  # noqa: PLC0415

    model = OpenAIModel(client_args={"api_key": "unused"}, model_id=model_id, params={"max_tokens": 4096})
    spec = convert_pydantic_to_tool_spec(outcome_envelope(bench_agent.output_model))
    prompt = f"Input ({BenchInput.__name__}, JSON):\n{BenchInput(text='bench').model_dump_json()}"
    request = model.format_request([{"role": "user", "content": [{"text": prompt}]}], [spec],
                                   bench_agent.instructions)
    return dict(request)


async def _floor(url: str, model_id: str, concurrency: int, duration: float, http: str,
                 agent: bool = False) -> dict[str, Any]:
    import openai  # noqa: PLC0415

    # the very HTTP client teamster's workers build (aiohttp), or the SDK's default (httpx)
    client = openai.AsyncOpenAI(api_key="unused", base_url=url, max_retries=0,
                                http_client=provider_http_client(concurrency, aiohttp=http == "aiohttp"))
    request = floor_requests(model_id)
    call = strands_step(client, model_id) if agent else None
    latencies: list[float] = []
    done_at: list[float] = []
    errors = 0
    stop = time.monotonic() + duration

    async def one() -> None:
        nonlocal errors
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                if call is not None:
                    await call()
                else:
                    stream = await client.chat.completions.create(**request)
                    async for _chunk in stream:
                        pass
            except Exception:  # noqa: BLE001 - counted; the floor keeps going
                errors += 1
                continue
            latencies.append(time.monotonic() - started)
            done_at.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    await client.close()
    return {"latencies": latencies, "done_at": [t - started for t in done_at], "errors": errors}


def _floor_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provider floor")
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--http", choices=("httpx", "aiohttp"), default="httpx")
    parser.add_argument("--agent", action="store_true", help="a fresh strands Agent per call (the strands floor)")
    args = parser.parse_args(argv)
    result = asyncio.run(_floor(args.url, args.model, args.concurrency, args.duration, args.http, args.agent))
    print(json.dumps(result))


FLOOR_LABELS = {"aiohttp": "floor (1 asyncio process, shared AsyncOpenAI on aiohttp, as the workers)",
                "httpx": "floor, SDK default (shared AsyncOpenAI on httpx)"}
STRANDS_FLOOR_LABEL = "strands floor (the floor's process, a fresh strands Agent per call)"


def measure_floor(server: ModelServerProcess, latency: float, concurrency: int, warmup: float,
                  window: float, http: str = "httpx", agent: bool = False) -> dict[str, Any]:
    """The bare SDK in its own process (``agent``: a fresh strands Agent per call): requests/s in the window, CPU per
    request, latencies."""
    server.reset()
    duration = warmup + window
    proc = subprocess.Popen([sys.executable, "-m", "bench.provider", "floor", "--url", server.url,
                             "--model", f"latency-{latency:g}", "--concurrency", str(concurrency),
                             "--duration", str(duration), "--http", http, *(["--agent"] if agent else [])],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(warmup)
    cpu_start = cpu_seconds(proc.pid)
    server_start = server.cpu_seconds()
    time.sleep(window)
    cpu_end = cpu_seconds(proc.pid)
    server_end = server.cpu_seconds()
    rss = rss_mb(proc.pid)
    out, _ = proc.communicate(timeout=duration + latency * 3 + 120)
    if proc.returncode:
        raise BenchError(f"the floor process failed (exit {proc.returncode})")
    data = json.loads(out.strip().splitlines()[-1])
    in_window = [t for t in data["done_at"] if warmup <= t <= warmup + window]
    per_second = len(in_window) / window
    stats = server.stats()
    label = STRANDS_FLOOR_LABEL if agent else FLOOR_LABELS[http]
    return {"label": label, "http_client": None if agent else http, "steps_per_second": per_second,
            "connections_per_call": stats["connections"] / max(1, stats["requests"]),
            "in_flight_max": stats["in_flight_max"], "in_flight_mean": stats["in_flight_mean"],
            "model_calls_in_flight_max": stats["in_flight_max"], "model_calls_in_flight_mean": stats["in_flight_mean"],
            "cpu_ms_per_step": (cpu_end - cpu_start) * 1000 / max(1, len(in_window)), "rss_mb": rss,
            "latency_p50_ms": percentile(data["latencies"], 50) * 1000,
            "latency_p99_ms": percentile(data["latencies"], 99) * 1000, "errors": data["errors"],
            "pool_errors": 0, "left_running": 0, "server_cpu_ms_per_call": (server_end - server_start) * 1000
            / max(1, len(in_window))}


# --------------------------------------------------------------------------- teamster


def _backlog(latency: float, concurrency: int, span: float) -> int:
    """Enough work queued that the workers never run dry before the window ends."""
    return math.ceil(concurrency * span / latency * 1.25) + 2 * concurrency


@dataclass
class _Window:
    """What the workers and the server did in the measurement window."""

    start: float
    end: float
    cpu_seconds: float
    server_cpu_seconds: float
    rss_mb: float
    server_stats: dict[str, Any]
    server_stats_start: dict[str, Any]
    logs: str

    def row(self, done: int, seconds: float) -> dict[str, Any]:
        """The fields every worker row shares, for ``done`` steps (or tasks) finished in the window."""
        return {"steps_per_second": done / seconds,
                "model_calls_in_flight_max": self.server_stats["in_flight_max"],
                "model_calls_in_flight_mean": self.server_stats["in_flight_mean"],
                "cpu_ms_per_step": self.cpu_seconds * 1000 / max(1, done), "rss_mb": self.rss_mb,
                "pool_errors": len(POOL_ERRORS.findall(self.logs)),
                "server_cpu_ms_per_call": self.server_cpu_seconds * 1000 / max(1, done),
                "connections_per_call": self.server_stats["connections"] / max(1, self.server_stats["requests"])}


def _measure_window(env: BenchEnv, server: ModelServerProcess, procs: list[BenchWorker], latency: float,
                    warmup: float, window: float, progress: Callable[[], None] | None = None) -> _Window:
    """Start ``procs``, read their CPU and the server's over ``window`` seconds after ``warmup`` (a worker that dies
    fails the benchmark; ``progress`` is called as it goes), then stop them warm: what is in flight finishes."""
    env.start_workers(procs)
    t_ready = time.time()
    w_start, w_end = t_ready + warmup, t_ready + warmup + window
    cpu_start = server_start = 0.0
    stats_start: dict[str, Any] = {}
    while time.time() < w_end:
        if not cpu_start and time.time() >= w_start:
            cpu_start = sum(cpu_seconds(w.pid) for w in procs)
            server_start = server.cpu_seconds()
            stats_start = server.stats()
        for w in procs:
            if not w.alive():
                raise BenchError(f"worker {w.name} died (log {w.log_path}):\n{w.log_tail()}")
        if progress is not None:
            progress()
        time.sleep(0.25)
    measured = _Window(w_start, w_end, sum(cpu_seconds(w.pid) for w in procs) - cpu_start,
                       server.cpu_seconds() - server_start, sum(rss_mb(w.pid) for w in procs), server.stats(),
                       stats_start, "".join(w.log() for w in procs))
    for w in procs:
        w.stop(timeout=latency + 60)
    return measured


def measure_workers(env: BenchEnv, server: ModelServerProcess, latency: float, concurrency: int, workers: int,
                    warmup: float, window: float, label: str) -> dict[str, Any]:
    """``workers`` teamster workers sharing ``concurrency`` on a backlog of one-step runs over real HTTP."""
    prefix = env.prefix(f"l{latency:g}-w{workers}")
    model = f"openai:latency-{latency:g}"
    settings = load_settings(key_prefix=prefix, stuck_queued_seconds=86_400, model=model,
                             model_base_url=server.url)
    client = Client(settings, redis_url=env.redis_url)
    backlog = _backlog(latency, concurrency, warmup + window)
    console.print(f"[bold]{label}[/]: submitting a backlog of {backlog} runs ...")
    ticker = Ticker("submitted", backlog)
    run_ids = []
    for i in range(backlog):
        run_ids.append(client.submit(SINGLE_WORKFLOW, {"text": f"p{i}"}))
        ticker.update(i + 1)
    per_worker = math.ceil(concurrency / workers)
    server.reset()
    procs: list[BenchWorker] = [
        env.worker(f"{prefix}-{i}", prefix=prefix, concurrency=per_worker,
                   env={"model": model, "model_base_url": server.url, "stuck_queued_seconds": 86_400})
        for i in range(workers)]
    done = Ticker("runs done", backlog)
    measured = _measure_window(  # the warm stop at its end: running steps finish and commit (nothing left running)
        env, server, procs, latency, warmup, window,
        lambda: done.update(backlog - int(env.client.zcard(client.runtime.keys.active_runs))))
    steps = env.step_records(client, run_ids, SINGLE_STEP)
    in_window = [s for s in steps if s.get("finished_at") and measured.start <= s["finished_at"] <= measured.end
                 and s["status"] == StepStatus.SUCCEEDED]
    intervals = [(s["started_at"], s["finished_at"] or measured.end) for s in steps if s.get("started_at")]
    peak, mean = sweep(intervals, measured.start, measured.end)
    durations = [s["finished_at"] - s["started_at"] for s in in_window]
    left_running = sum(1 for s in steps if s["status"] == StepStatus.RUNNING)
    failed = sum(1 for s in steps if s["status"] == StepStatus.FAILED)
    env.clear(prefix)  # the rest of the backlog and every record: the next row starts on a clean Redis
    return {"label": label, "workers": workers, "concurrency_per_worker": per_worker,
            **measured.row(len(in_window), window), "in_flight_max": peak, "in_flight_mean": mean,
            "latency_p50_ms": percentile(durations, 50) * 1000, "latency_p99_ms": percentile(durations, 99) * 1000,
            "errors": failed, "left_running": left_running}


CELERY_FLOOR_LABELS = {False: "Celery floor ({n}: raw Celery tasks, the bare SDK call)",
                       True: "Celery + strands floor ({n}: raw Celery tasks, a fresh strands Agent each)"}


def measure_celery_floor(env: BenchEnv, server: ModelServerProcess, latency: float, concurrency: int, workers: int,
                         warmup: float, window: float, agent: bool = False) -> dict[str, Any]:
    """The ceiling of any design that keeps Celery as the unit of delivery: ``workers`` teamster worker processes
    (teamster's Celery app and configuration, threads pool, sharing ``concurrency``) on a backlog of raw Celery tasks,
    each sending the floor's request with the worker's shared ``AsyncOpenAI`` on its agent loop -- no strands, no run
    store, no journal (:func:`bench.bench_workflows.sdk_call`). With ``agent``, each task runs a fresh strands
    ``Agent`` instead (:func:`bench.bench_workflows.agent_call`): the ceiling of a design that also keeps a fresh
    ``Agent`` per step, as #11 asks -- what is left between it and a teamster worker is teamster's own cost."""
    prefix = env.prefix(f"l{latency:g}-celery{'-strands' if agent else ''}{workers}")
    model = f"openai:latency-{latency:g}"
    settings = load_settings(key_prefix=prefix, model=model, model_base_url=server.url)
    app = producer_app(settings, env.redis_url)
    request = floor_requests(f"latency-{latency:g}")
    task, args = (AGENT_TASK, [f"latency-{latency:g}"]) if agent else (SDK_TASK, [request])
    backlog = _backlog(latency, concurrency, warmup + window)
    label = CELERY_FLOOR_LABELS[agent].format(n=f"{workers} worker{'s' if workers > 1 else ''}")
    console.print(f"[bold]{label}[/]: sending a backlog of {backlog} tasks ...")
    ticker = Ticker("sent", backlog)
    for i in range(backlog):
        app.send_task(task, args=args)
        ticker.update(i + 1)
    per_worker = math.ceil(concurrency / workers)
    server.reset()
    procs = [env.worker(f"{prefix}-{i}", prefix=prefix, concurrency=per_worker,
                        env={"model": model, "model_base_url": server.url}) for i in range(workers)]
    measured = _measure_window(env, server, procs, latency, warmup, window)
    # the tasks store no result (a step stores none): the calls the server completed in the window count instead --
    # each task ends with its call (the benchmark agent answers in one) -- and a task that failed is in its worker's log
    done = measured.server_stats["completed"] - measured.server_stats_start["completed"]
    failed = len(re.findall(rf"Task {re.escape(task)}\[[^\]]*\] raised unexpected", measured.logs))
    env.clear(prefix)  # the rest of the backlog: the next row starts on a clean Redis
    return {"label": label, "workers": workers, "concurrency_per_worker": per_worker, "celery_floor": True,
            "strands": agent, **measured.row(done, window), "in_flight_max": None, "in_flight_mean": None,
            "latency_p50_ms": None, "latency_p99_ms": None, "errors": failed,
            "left_running": None}  # raw tasks have no step records


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.provider", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="1:500,30:1000",
                        help="latency:concurrency pairs (default 1:500,30:1000).")
    parser.add_argument("--warmup", type=float, default=None,
                        help="Seconds before the window starts (default: 2 x latency + 5).")
    parser.add_argument("--window", type=float, default=None,
                        help="Measurement window in seconds (default: max(20, 3 x latency)).")
    parser.add_argument("--skip-per-core", action="store_true", help="Only the floor and one worker.")
    parser.add_argument("--skip-strands-floor", action="store_true",
                        help="Leave out the strands floor (the floor's process with a fresh strands Agent per call).")
    parser.add_argument("--skip-celery-floor", action="store_true",
                        help="Leave out the Celery floor (raw Celery tasks making the bare SDK call).")
    parser.add_argument("--skip-celery-strands-floor", action="store_true",
                        help="Leave out the Celery + strands floor (raw Celery tasks, a fresh strands Agent each).")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["floor"]:
        _floor_main(argv[1:])
        return {}
    args = build_parser().parse_args(argv)
    scenarios = parse_scenarios(args.scenarios)
    worker_http = "aiohttp" if aiohttp_available() else "httpx"  # TEAMSTER_MODEL_HTTP_CLIENT=auto on the workers
    results: dict[str, Any] = {"benchmark": NAME, "scenarios": []}
    with bench_env(NAME, args) as env, ModelServerProcess(latency=1.0) as server:
        results["machine"] = machine_info(env.client)
        for latency, concurrency in scenarios:
            warmup = args.warmup if args.warmup is not None else 2 * latency + 5
            window = args.window if args.window is not None else max(20.0, 3 * latency)
            console.print(f"\n[bold]latency {latency:g}s, {concurrency} in flight[/]: warm-up {warmup:g}s, "
                          f"window {window:g}s")
            # the ratio is like for like: against the floor on the HTTP client the workers use; the SDK's default
            # client (httpx, a new connection per streamed call) is measured too when that is not it
            per_core = 1 if args.skip_per_core else cpu_count()
            rows = [measure_floor(server, latency, concurrency, warmup, window, worker_http)]
            if worker_http != "httpx":
                rows.append(measure_floor(server, latency, concurrency, warmup, window, "httpx"))
            if not args.skip_strands_floor:
                rows.append(measure_floor(server, latency, concurrency, warmup, window, worker_http, agent=True))
            if not args.skip_celery_floor:
                rows.append(measure_celery_floor(env, server, latency, concurrency, per_core, warmup, window))
            if not args.skip_celery_strands_floor:
                rows.append(measure_celery_floor(env, server, latency, concurrency, per_core, warmup, window,
                                                 agent=True))
            rows.append(measure_workers(env, server, latency, concurrency, 1, warmup, window, "1 teamster worker"))
            if not args.skip_per_core and cpu_count() > 1:
                rows.append(measure_workers(env, server, latency, concurrency, cpu_count(), warmup, window,
                                            f"{cpu_count()} teamster workers (one per core)"))
            base = rows[0]["steps_per_second"]
            sdk_default = next(r["steps_per_second"] for r in rows if r.get("http_client") == "httpx")
            ceiling = next((r for r in rows if r.get("celery_floor") and r.get("strands")), None)
            for row in rows:
                row["vs_floor"] = ratio(row["steps_per_second"], base)
                row["vs_sdk_default_floor"] = ratio(row["steps_per_second"], sdk_default)
                if ceiling is not None and row.get("workers") == ceiling["workers"] and "celery_floor" not in row:
                    # like for like: as many teamster workers as the ceiling's
                    row["vs_celery_strands_floor"] = ratio(row["steps_per_second"], ceiling["steps_per_second"])
            results["scenarios"].append({"latency_seconds": latency, "concurrency": concurrency,
                                         "warmup_seconds": warmup, "window_seconds": window, "rows": rows})
            print_table(f"real provider path: {latency:g} s model latency, {concurrency} in flight",
                        ["", "steps/s", "vs floor", "vs SDK-default floor", "steps in flight max/mean",
                         "model calls in flight max/mean", "CPU ms/step", "connections per call", "RSS MB",
                         "p50 / p99 ms", "pool errors", "left running", "failed"],
                        [[r["label"], fmt(r["steps_per_second"], 1), fmt(r["vs_floor"], 2, "x"),
                          fmt(r["vs_sdk_default_floor"], 2, "x"),
                          f"{fmt(r['in_flight_max'], 0)} / {fmt(r['in_flight_mean'], 0)}",
                          f"{fmt(r['model_calls_in_flight_max'], 0)} / {fmt(r['model_calls_in_flight_mean'], 0)}",
                          fmt(r["cpu_ms_per_step"], 2), fmt(r["connections_per_call"], 2), fmt(r["rss_mb"], 0),
                          f"{fmt(r['latency_p50_ms'], 0)} / {fmt(r['latency_p99_ms'], 0)}",
                          fmt(r["pool_errors"]), fmt(r["left_running"]), fmt(r["errors"])] for r in rows])
            for row in rows:
                if row.get("vs_celery_strands_floor") is not None:
                    console.print(f"{row['label']}: {fmt(row['vs_celery_strands_floor'], 2, 'x')} of the "
                                  f"{ceiling['label'] if ceiling else ''} -- what is left is teamster's own cost "
                                  f"({fmt(row['cpu_ms_per_step'], 2)} against "
                                  f"{fmt(ceiling['cpu_ms_per_step'] if ceiling else None, 2)} ms of CPU per step)")
    write_results(NAME, results, args.output)
    return results


if __name__ == "__main__":
    run_main(main)
