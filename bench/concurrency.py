"""I/O-bound steps on one worker host: Celery pools and concurrency vs the prefork default.

    python -m bench.concurrency

Every step is one scripted model call that waits ``--latency`` seconds (``TEAMSTER_SCRIPTED_LATENCY``, default
1 s), i.e. an I/O-bound LLM call. For each configuration -- Celery's default prefork pool with concurrency =
CPU count, the threads pool at 8, 32 and 64 -- one worker process
is started on a backlog of ``bench_single`` runs that is large enough to keep it busy for the whole
measurement window. Reported per configuration:

* steps/s sustained: steps committed inside the window (after ``--warmup`` seconds) / window length;
* steps in flight: the exact maximum and the time-average number of steps between claim and commit inside
  the window (a sweep over the step records' ``started_at``/``finished_at``), plus the maximum sampled live
  from the in-flight set every 0.2 s;
* the step duration (claim -> commit; 1 s would be the model latency alone) and the worker's CPU use;
* ratios vs prefork.

Each configuration uses its own key prefix (own queues), so nothing leaks from one to the next.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
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
from bench.bench_workflows import SINGLE_STEP, SINGLE_WORKFLOW
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.keys import Keys

__all__ = ["main", "build_parser", "Config", "parse_configs", "sweep"]

NAME = "concurrency"


@dataclass(frozen=True)
class Config:
    """One worker configuration."""

    pool: str
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.pool} x{self.concurrency}"


def parse_configs(text: str) -> list[Config]:
    """``"prefork:2,threads:8"`` -> configs; ``prefork:cpu`` means the CPU count (Celery's default)."""
    configs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pool, _, size = part.partition(":")
        if pool not in ("prefork", "threads", "solo"):
            raise SystemExit(f"unknown pool {pool!r} in --configs")
        configs.append(Config(pool, cpu_count() if size in ("", "cpu") else int(size)))
    return configs


def sweep(intervals: list[tuple[float, float]], start: float, end: float) -> tuple[int, float]:
    """Max and time-average number of open intervals within ``[start, end]``."""
    events: list[tuple[float, int]] = []
    busy = 0.0
    for a, b in intervals:
        lo, hi = max(a, start), min(b, end)
        if hi <= lo:
            continue
        busy += hi - lo
        events += [(lo, 1), (hi, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # closings first at equal times
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak, busy / (end - start) if end > start else math.nan


def measure(env: BenchEnv, config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration: backlog, one worker, a measurement window, exact numbers from the run store."""
    prefix = env.prefix(f"{config.pool}{config.concurrency}")
    # Queued steps get an in-flight score far in the future, so the live sample (ZCOUNT) sees running steps only.
    settings = load_settings(key_prefix=prefix, stuck_queued_seconds=86_400)
    keys = Keys(prefix)
    client = Client(settings, redis_url=env.redis_url)
    span = args.warmup + args.window
    backlog = min(args.max_backlog, math.ceil(config.concurrency * span / args.latency * args.backlog_factor)
                  + 2 * config.concurrency)
    console.print(f"[bold]{config.label}[/]: submitting a backlog of {backlog} runs ...")
    ticker = Ticker("submitted", backlog)
    run_ids = []
    for i in range(backlog):
        run_ids.append(client.submit(SINGLE_WORKFLOW, {"text": f"io {i}"}))
        ticker.update(i + 1)
    worker = env.worker(f"{config.pool}{config.concurrency}", prefix=prefix, pool=config.pool,
                        concurrency=config.concurrency, env={"scripted_latency": args.latency})
    worker.start(wait=False)
    worker.wait_ready(120)
    t_ready = time.time()
    w_start, w_end = t_ready + args.warmup, t_ready + span
    console.print(f"  worker ready in {worker.ready_seconds:.1f}s; warm-up {args.warmup:.0f}s, "
                  f"window {args.window:.0f}s ...")
    sampled_max = 0
    cpu_start = cpu_end = None
    progress = Ticker("runs done", backlog)
    while time.time() < w_end:
        now = time.time()
        if cpu_start is None and now >= w_start:
            cpu_start = (now, cpu_seconds(worker.pid))
        running = int(env.client.zcount(keys.inflight, "-inf", now + settings.lease_seconds + 5))
        if now >= w_start:
            sampled_max = max(sampled_max, running)
        if not worker.alive():
            raise BenchError(f"worker {worker.name} died (log {worker.log_path}):\n{worker.log_tail()}")
        left = int(env.client.zcard(keys.active_runs))
        progress.update(backlog - left, extra=f", {running} in flight")
        time.sleep(0.2)
    cpu_end = (time.time(), cpu_seconds(worker.pid))
    worker.kill()  # steps still running have no finished_at and are ignored
    pipe = env.client.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hmget(keys.step(run_id, SINGLE_STEP), ["started_at", "finished_at", "status"])
    intervals: list[tuple[float, float]] = []
    durations: list[float] = []
    finished_in_window = 0
    queued_left = 0
    failed: dict[str, int] = {}
    first_error: str | None = None
    for run_id, (started, finished, status) in zip(run_ids, pipe.execute(), strict=True):
        if started in (None, "null"):
            queued_left += 1
            continue
        a = float(json.loads(started))
        if finished in (None, "null"):
            intervals.append((a, math.inf))
            continue
        b = float(json.loads(finished))
        if json.loads(status) != "succeeded":
            failed[json.loads(status)] = failed.get(json.loads(status), 0) + 1
            if first_error is None:
                outcome = json.loads(env.client.hget(keys.step(run_id, SINGLE_STEP), "outcome") or "{}") or {}
                first_error = f"{outcome.get('error_type', '?')}: {outcome.get('message', '')}"[:300]
            continue
        intervals.append((a, b))
        if w_start <= b <= w_end:
            finished_in_window += 1
            durations.append(b - a)
    peak, mean = sweep(intervals, w_start, w_end)
    drained = queued_left == 0
    if drained and not failed:
        console.print(f"[yellow]  warning: the backlog drained before the window ended; raise --backlog-factor "
                      f"(or --max-backlog, now {args.max_backlog})[/]")
    if failed:
        console.print(f"[red]  {sum(failed.values())} steps did not succeed ({failed}) in {config.label}: "
                      f"{first_error}[/] (worker log {worker.log_path})")
    cpu_pct = None
    if cpu_start is not None:
        cpu_pct = 100 * (cpu_end[1] - cpu_start[1]) / (cpu_end[0] - cpu_start[0])
    env.discard(prefix)
    result = {
        "pool": config.pool,
        "concurrency": config.concurrency,
        "backlog": backlog,
        "steps_in_window": finished_in_window,
        "steps_per_second": finished_in_window / args.window,
        "ideal_steps_per_second": config.concurrency / args.latency,
        "max_in_flight": peak,
        "mean_in_flight": mean,
        "max_in_flight_sampled": sampled_max,
        "step_seconds_p50": percentile(durations, 50),
        "step_seconds_p99": percentile(durations, 99),
        "worker_cpu_percent": cpu_pct,
        "worker_ready_seconds": worker.ready_seconds,
        "backlog_drained": drained,
        "failed_steps": failed,
        "first_error": first_error,
    }
    console.print(f"  {finished_in_window / args.window:.1f} steps/s, max in flight {peak} "
                  f"(mean {mean:.1f}), step p50 {result['step_seconds_p50']:.2f}s, worker CPU "
                  f"{fmt(cpu_pct, 0)}%")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.concurrency",
        description="I/O-bound steps (scripted model latency) on one worker: steps in flight and steps/s for "
                    "Celery pools and concurrency levels, with ratios vs the prefork default. Nothing is "
                    "asserted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--latency", type=float, default=1.0,
                        help="Seconds per model call (TEAMSTER_SCRIPTED_LATENCY of the worker).")
    parser.add_argument("--configs", default="prefork:cpu,threads:8,threads:32,threads:64",
                        help="pool:concurrency list; 'prefork:cpu' is Celery's default (concurrency = CPUs). "
                             "gevent/eventlet are not offered: teamster workers refuse them (strands runs each "
                             "agent call with asyncio.run, which fails under green threads).")
    parser.add_argument("--warmup", type=float, default=3.0, help="Seconds after the worker is ready before the "
                        "measurement window opens.")
    parser.add_argument("--window", type=float, default=10.0, help="Length of the measurement window, seconds.")
    parser.add_argument("--backlog-factor", type=float, default=1.3,
                        help="Backlog = concurrency x (warmup + window) / latency x this, plus 2 x concurrency.")
    parser.add_argument("--max-backlog", type=int, default=4000, help="Upper bound on the backlog per config.")
    add_common_args(parser)
    return parser


def report(results: dict[str, Any]) -> None:
    rows = []
    for r in results["configs"]:
        rows.append([
            r["label"], fmt(r["steps_per_second"], 1), fmt(r["ideal_steps_per_second"], 0),
            fmt(r["ratio_steps_per_second"], 2), str(r["max_in_flight"]), fmt(r["mean_in_flight"], 1),
            str(r["max_in_flight_sampled"]), fmt(r["step_seconds_p50"], 2), fmt(r["step_seconds_p99"], 2),
            fmt(r["worker_cpu_percent"], 0), str(sum(r["failed_steps"].values())),
        ])
    s = results["settings"]
    print_table(
        f"concurrency: one worker host, {results['machine']['cpu_count']} CPUs, I/O-bound steps "
        f"({s['latency']:.1f}s scripted model latency), window {s['window']:.0f}s",
        ["config", "steps/s", "ideal", "vs prefork", "max in flight", "mean in flight", "max sampled",
         "step p50 s", "step p99 s", "CPU %", "failed"],
        rows,
        caption="ideal = concurrency / latency. In flight = steps between claim and commit (exact sweep over "
                "the step records inside the window; 'sampled' = live ZCOUNT of the in-flight set every 0.2 s). "
                "Step time = claim -> commit. Worker CPU % counts the worker and its children (100% = one core).",
    )
    for r in results["configs"]:
        if r["failed_steps"]:
            console.print(f"[red]{r['label']}:[/] {sum(r['failed_steps'].values())} steps did not succeed "
                          f"({r['failed_steps']}), e.g. {r['first_error']}")
    for note in results["notes"]:
        console.print(f"[dim]note:[/] {note}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write bench/results/concurrency.json; return the results."""
    args = build_parser().parse_args(argv)
    configs = parse_configs(args.configs)
    notes = [f"{cpu_count()} CPUs on this machine: prefork's default concurrency is {cpu_count()}."]
    notes.append("gevent was tried and is refused: under -P gevent every step failed with 'asyncio.run() cannot be "
                 "called from a running event loop' (strands' sync Agent call), so workers now exit at start-up.")
    console.print(f"[bold]bench.concurrency[/]: {', '.join(c.label for c in configs)}; "
                  f"model latency {args.latency}s")
    started = time.monotonic()
    measured: list[dict[str, Any]] = []
    with bench_env(NAME, args) as env:
        for config in configs:
            measured.append({"label": config.label, **measure(env, config, args)})
        machine = machine_info(env.client)
    base = next((m for m in measured if m["pool"] == "prefork"), measured[0] if measured else None)
    for m in measured:
        m["ratio_steps_per_second"] = ratio(m["steps_per_second"], base["steps_per_second"] if base else None)
        m["ratio_max_in_flight"] = ratio(float(m["max_in_flight"]), float(base["max_in_flight"]) if base else None)
    if base is not None and base["pool"] != "prefork":
        notes.append(f"no prefork configuration: ratios are vs {base['label']}.")
    results: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {"latency": args.latency, "warmup": args.warmup, "window": args.window,
                     "backlog_factor": args.backlog_factor, "workers": 1, "worker_loglevel": args.loglevel,
                     "redis": "external" if args.redis_url else "private"},
        "baseline": base["label"] if base else None,
        "configs": measured,
        "notes": notes,
        "wall_seconds": time.monotonic() - started,
    }
    report(results)
    write_results(NAME, results, args.output)
    return results


if __name__ == "__main__":
    run_main(main)
