"""Horizontal scaling on one host: 1, 2, 4 worker processes (threads pool, concurrency 8 each).

    python -m bench.scaling

A fixed batch of ``--runs`` runs of ``bench_linear5`` (five agent steps each; every step one scripted model
call of ``--latency`` seconds, default 0.2 s) is submitted at once; the time until every run succeeded gives
steps/s, reported with the speed-up vs one worker. Each worker count gets fresh workers and its own key prefix.
The host's CPU count is part of the output: on a 2-core machine, four workers compete for two cores, so the
speed-up says where one host stops scaling, not how a cluster scales.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from bench._common import (
    BenchEnv,
    BenchError,
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
from bench.bench_workflows import LINEAR_STEPS, LINEAR_WORKFLOW, SINGLE_WORKFLOW
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.keys import Keys
from teamster.testing import model_calls_key

__all__ = ["main", "build_parser"]

NAME = "scaling"


def _wait_all(env: BenchEnv, keys: Keys, runs: int, timeout: float, workers: list[Any], label: str,
              steps: int) -> None:
    """Wait until no run is active; progress counts steps whose model call started."""
    ticker = Ticker(label, steps)
    deadline = time.monotonic() + timeout
    calls_before = int(env.client.hlen(model_calls_key(keys.prefix)))
    while True:
        left = int(env.client.zcard(keys.active_runs))
        if left == 0:
            return
        for worker in workers:
            if not worker.alive():
                raise BenchError(f"worker {worker.name} died (log {worker.log_path}):\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{left} runs not done after {timeout:.0f}s; worker log {workers[0].log_path}:\n"
                             f"{workers[0].log_tail(15)}")
        started = int(env.client.hlen(model_calls_key(keys.prefix))) - calls_before
        ticker.update(started, extra=f", {runs - left}/{runs} runs done")
        time.sleep(0.05)


def measure(env: BenchEnv, count: int, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    """One worker count: start the workers, warm up, run the batch, read the store."""
    prefix = env.prefix(f"w{count}r{repeat}")
    settings = load_settings(key_prefix=prefix)
    keys = Keys(prefix)
    client = Client(settings, redis_url=env.redis_url)
    workers = [env.worker(f"scale{count}-{i}-r{repeat}", prefix=prefix, pool="threads",
                          concurrency=args.concurrency,
                          env={"scripted_latency": args.latency, "bench_count_model_calls": 1})
               for i in range(count)]
    console.print(f"[bold]{count} worker(s)[/] (repeat {repeat + 1}/{args.repeats}): starting ...")
    env.start_workers(workers)
    warm = [client.submit(SINGLE_WORKFLOW, {"text": "warm"}) for _ in range(2 * count * args.concurrency)]
    _wait_all(env, keys, len(warm), args.timeout, workers, "warm-up steps started", len(warm))
    cpu0 = sum(cpu_seconds(w.pid) for w in workers)
    t0 = time.monotonic()
    run_ids = [client.submit(LINEAR_WORKFLOW, {"text": f"scale {i}"}) for i in range(args.runs)]
    submitted = time.monotonic() - t0
    _wait_all(env, keys, args.runs, args.timeout, workers, "steps started", args.runs * len(LINEAR_STEPS))
    seconds = time.monotonic() - t0
    cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu0
    pipe = env.client.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(keys.run(run_id), "status")
        for step in LINEAR_STEPS:
            pipe.hmget(keys.step(run_id, step), ["queued_at", "finished_at", "worker"])
    raw = pipe.execute()
    latencies: list[float] = []
    per_worker: dict[str, int] = {}
    per = 1 + len(LINEAR_STEPS)
    for index in range(len(run_ids)):
        status = raw[index * per]
        if status != '"succeeded"':
            raise BenchError(f"run {run_ids[index]} ended {status}; see {workers[0].log_path}")
        for queued, finished, worker in raw[index * per + 1:(index + 1) * per]:
            latencies.append(float(json.loads(finished)) - float(json.loads(queued)))
            per_worker[json.loads(worker)] = per_worker.get(json.loads(worker), 0) + 1
    for worker in workers:
        worker.stop(timeout=10)
    env.discard(prefix)
    steps = args.runs * len(LINEAR_STEPS)
    result = {
        "workers": count,
        "repeat": repeat,
        "seconds": seconds,
        "submit_seconds": submitted,
        "steps": steps,
        "steps_per_second": steps / seconds,
        "ideal_steps_per_second": count * args.concurrency / args.latency,
        "step_latency_p50_ms": 1000 * percentile(latencies, 50),
        "step_latency_p99_ms": 1000 * percentile(latencies, 99),
        "cpu_percent": 100 * cpu / seconds,
        "steps_per_worker": sorted(per_worker.values(), reverse=True),
    }
    console.print(f"  {steps} steps in {seconds:.2f}s: {steps / seconds:.1f} steps/s, worker CPU "
                  f"{result['cpu_percent']:.0f}% (all workers), steps per worker {result['steps_per_worker']}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description="Steps/s of a fixed batch with 1, 2, 4 worker processes on this host, and the speed-up vs one "
                    "worker. Nothing is asserted; the CPU count is reported with the numbers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workers", default="1,2,4", help="Worker counts to measure.")
    parser.add_argument("--runs", type=int, default=150, help="Runs of bench_linear5 (5 steps each) per batch.")
    parser.add_argument("--latency", type=float, default=0.2, help="Seconds per scripted model call.")
    parser.add_argument("--concurrency", type=int, default=8, help="Threads per worker.")
    parser.add_argument("--repeats", type=int, default=2, help="Batches per worker count (median reported).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up on a batch after this many seconds.")
    add_common_args(parser)
    return parser


def report(results: dict[str, Any]) -> None:
    s = results["settings"]
    rows = []
    for r in results["summary"]:
        rows.append([str(r["workers"]), fmt(r["steps_per_second"], 1), fmt(r["ideal_steps_per_second"], 0),
                     fmt(r["speedup"], 2), fmt(r["efficiency"], 2), fmt(r["step_latency_p50_ms"], 0),
                     fmt(r["cpu_percent"], 0), ", ".join(f"{x:.1f}" for x in r["all_steps_per_second"])])
    print_table(
        f"scaling: {s['runs']} runs x {len(LINEAR_STEPS)} steps, threads x{s['concurrency']} per worker, "
        f"{s['latency']:.2f}s model latency, on {results['machine']['cpu_count']} CPUs",
        ["workers", "steps/s", "ideal", "speed-up", "efficiency", "queued->commit p50 ms", "CPU %", "each repeat"],
        rows,
        caption=f"speed-up = steps/s / steps/s with 1 worker (median of {s['repeats']} repeats); efficiency = "
                "speed-up / workers; ideal = workers x concurrency / latency. CPU % = all workers' CPU "
                f"(100% = one core). This host has {results['machine']['cpu_count']} CPUs: beyond that, workers "
                "compete for the same cores.",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write bench/results/scaling.json; return the results."""
    args = build_parser().parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    if not counts or min(counts) < 1 or args.runs < 1 or args.repeats < 1:
        raise SystemExit("--workers, --runs and --repeats need positive values")
    console.print(f"[bold]bench.scaling[/]: workers {counts}, {args.runs} runs, {cpu_count()} CPUs on this machine")
    started = time.monotonic()
    measured: list[dict[str, Any]] = []
    with bench_env(NAME, args) as env:
        for repeat in range(args.repeats):
            order = counts if repeat % 2 == 0 else list(reversed(counts))
            for count in order:
                measured.append(measure(env, count, repeat, args))
        machine = machine_info(env.client)
    summary = []
    for count in counts:
        mine = [m for m in measured if m["workers"] == count]
        summary.append({
            "workers": count,
            "steps_per_second": statistics.median(m["steps_per_second"] for m in mine),
            "all_steps_per_second": [m["steps_per_second"] for m in mine],
            "ideal_steps_per_second": mine[0]["ideal_steps_per_second"],
            "step_latency_p50_ms": statistics.median(m["step_latency_p50_ms"] for m in mine),
            "cpu_percent": statistics.median(m["cpu_percent"] for m in mine),
        })
    base = next((s for s in summary if s["workers"] == 1), summary[0])
    for s in summary:
        s["speedup"] = ratio(s["steps_per_second"], base["steps_per_second"])
        s["efficiency"] = (s["speedup"] or 0.0) * base["workers"] / s["workers"]
    results: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {"workers": counts, "runs": args.runs, "latency": args.latency,
                     "concurrency": args.concurrency, "pool": "threads", "repeats": args.repeats,
                     "worker_loglevel": args.loglevel, "redis": "external" if args.redis_url else "private"},
        "baseline": f"{base['workers']} worker(s)",
        "summary": summary,
        "measurements": measured,
        "notes": [f"This machine has {machine['cpu_count']} CPUs; worker processes beyond that share cores."],
        "wall_seconds": time.monotonic() - started,
    }
    report(results)
    write_results(NAME, results, args.output)
    return results


if __name__ == "__main__":
    run_main(main)
