"""Provider limits shared by every worker vs each worker on its own, against one rate-limited provider.

    python -m bench.limits                          # 1, 2, 4 workers; 100 requests per 10 s window
    python -m bench.limits --workers 1,2 --rate 30 --rate-window 3 --window 24

The local OpenAI-compatible server of :mod:`bench.model_server` (its own process) answers after ``--latency``
seconds and with OpenAI's 429 (``retry-after`` until its window ends) above ``--rate`` requests per
``--rate-window`` seconds, as a provider's account limit does. Every model call goes over real HTTP through
strands' ``OpenAIModel`` and the ``openai`` SDK. For each number of workers (threads pool, ``--concurrency`` each,
one-step runs from a backlog), two configurations:

* **own backoff** -- ``TEAMSTER_PROVIDER_COORDINATION=false``: no shared limits, no shared cool-down: each step that
  meets a 429 is retried by its own policy (exponential backoff with jitter), as every worker finds out about the
  limit on its own;
* **shared limits** -- ``TEAMSTER_PROVIDER_LIMITS`` sets the server's limit (``rpm`` = ``--rate`` per
  ``period_seconds`` = ``--rate-window``): every worker takes its calls from one sliding window in Redis, and a
  429 that still happens makes all of them back off together.

Reported per configuration: 429 responses (the server's count, from the workers' start to the end of the window),
successful steps per second in the window and as a fraction of the server's limit, retries (attempts beyond the
first, and retries still scheduled when the window ends), steps dead-lettered. Goals (issue 14): with shared
limits, at least 90% fewer 429s than without, and throughput at least 0.9x the server's limit.

Shared limits reuse a request's place in the window only ``margin_seconds`` (0.25 s) after the window, so they run
at most at ``period / (period + margin)`` of the limit: 0.976x at the default 10 s window (0.996x for a provider's
per-minute limit), 0.92x at a 3 s window. The measurement window (30 s) is a multiple of the default rate window.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from bench._common import (
    BenchEnv,
    BenchError,
    BenchWorker,
    Ticker,
    add_common_args,
    bench_env,
    console,
    fmt,
    machine_info,
    print_table,
    ratio,
    run_main,
    write_results,
)
from bench.bench_workflows import SINGLE_STEP, SINGLE_WORKFLOW
from bench.model_server import ModelServerProcess
from teamster.config.settings import load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.models import StepStatus

__all__ = ["main", "build_parser", "NAME"]

NAME = "limits"


def measure(env: BenchEnv, server: ModelServerProcess, *, workers: int, shared: bool, args: argparse.Namespace,
            limit_per_second: float) -> dict[str, Any]:
    """One configuration: ``workers`` workers on a backlog of one-step runs; returns its row."""
    label = f"{workers} worker{'s' if workers > 1 else ''}, {'shared limits' if shared else 'own backoff'}"
    prefix = env.prefix(f"w{workers}-{'shared' if shared else 'own'}")
    model = f"openai:latency-{args.latency:g}"
    overrides: dict[str, Any] = {"model": model, "model_base_url": server.url, "stuck_queued_seconds": 86_400}
    if shared:
        overrides["provider_limits"] = json.dumps({model: {"rpm": args.rate, "period_seconds": args.rate_window}})
    else:  # the baseline: no shared limits, no shared cool-down, no breaker -- each step's own retry policy
        overrides["provider_coordination"] = "false"
    client = Client(load_settings(key_prefix=prefix, **overrides), redis_url=env.redis_url)
    span = args.warmup + args.window
    backlog = math.ceil(limit_per_second * span * 1.5) + workers * args.concurrency
    console.print(f"[bold]{label}[/]: a backlog of {backlog} runs ...")
    run_ids = [client.submit(SINGLE_WORKFLOW, {"text": f"l{i}"}) for i in range(backlog)]
    procs: list[BenchWorker] = [env.worker(f"{prefix}-{i}", prefix=prefix, concurrency=args.concurrency,
                                           env=overrides) for i in range(workers)]
    server.reset()
    env.start_workers(procs)
    t_ready = time.time()
    w_start, w_end = t_ready + args.warmup, t_ready + span
    progress = Ticker("runs done", backlog)
    while time.time() < w_end:
        for w in procs:
            if not w.alive():
                raise BenchError(f"worker {w.name} died (log {w.log_path}):\n{w.log_tail()}")
        progress.update(backlog - int(env.client.zcard(client.runtime.keys.active_runs)))
        time.sleep(0.25)
    stats = server.stats()
    for w in procs:
        w.stop(timeout=30)
    env.workers.clear()
    steps = env.step_records(client, run_ids, SINGLE_STEP)
    env.discard(prefix)
    done = [s for s in steps if s.get("finished_at") and w_start <= s["finished_at"] <= w_end]
    succeeded = [s for s in done if s["status"] == StepStatus.SUCCEEDED]
    finished = [s for s in steps if s["status"] in (StepStatus.SUCCEEDED, StepStatus.FAILED)]
    steps_per_second = len(succeeded) / args.window
    return {"label": label, "workers": workers, "shared_limits": shared,
            "throttled": stats["throttled"], "requests": stats["requests"],
            "max_requests_per_window": stats["max_requests_per_window"],
            "steps_per_second": steps_per_second, "vs_limit": ratio(steps_per_second, limit_per_second),
            "retries": sum(max(0, int(s.get("attempts") or 0) - 1) for s in steps)
            + sum(1 for s in steps if s["status"] == StepStatus.RETRYING),
            "failed": sum(1 for s in finished if s["status"] == StepStatus.FAILED)}



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="Numbers of worker processes (default 1,2,4).")
    parser.add_argument("--concurrency", type=int, default=8, help="Threads per worker (default 8).")
    parser.add_argument("--rate", type=int, default=100, help="Requests the server accepts per window (default 100).")
    parser.add_argument("--rate-window", type=float, default=10.0,
                        help="The server's rate-limit window in seconds (default 10).")
    parser.add_argument("--latency", type=float, default=0.2, help="Model latency in seconds (default 0.2).")
    parser.add_argument("--warmup", type=float, default=10.0, help="Seconds before the window starts (default 10).")
    parser.add_argument("--window", type=float, default=30.0, help="Measurement window in seconds (default 30).")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    counts = [int(n) for n in str(args.workers).split(",") if n.strip()]
    limit_per_second = args.rate / args.rate_window
    results: dict[str, Any] = {"benchmark": NAME, "settings": {
        "rate": args.rate, "rate_window_seconds": args.rate_window, "limit_per_second": limit_per_second,
        "latency_seconds": args.latency, "concurrency_per_worker": args.concurrency, "warmup_seconds": args.warmup,
        "window_seconds": args.window}, "rows": []}
    with bench_env(NAME, args) as env, \
            ModelServerProcess(latency=args.latency, rate_limit=args.rate, rate_window=args.rate_window) as server:
        results["machine"] = machine_info(env.client)
        for workers in counts:
            own = measure(env, server, workers=workers, shared=False, args=args, limit_per_second=limit_per_second)
            shared = measure(env, server, workers=workers, shared=True, args=args,
                             limit_per_second=limit_per_second)
            shared["fewer_429s"] = 1.0 - shared["throttled"] / own["throttled"] if own["throttled"] else None
            results["rows"] += [own, shared]
    rows = results["rows"]
    print_table(f"one provider limited to {args.rate} requests per {args.rate_window:g} s "
                f"({limit_per_second:g}/s), {args.latency:g} s latency, {args.concurrency} threads per worker",
                ["", "429 responses", "fewer 429s", "steps/s", "vs limit", "retries", "dead-lettered",
                 "max requests in a server window"],
                [[r["label"], fmt(r["throttled"]),
                  "" if r.get("fewer_429s") is None else f"{r['fewer_429s'] * 100:.1f}%",
                  fmt(r["steps_per_second"], 1), fmt(r["vs_limit"], 2, "x"), fmt(r["retries"]), fmt(r["failed"]),
                  fmt(r["max_requests_per_window"])] for r in rows])
    write_results(NAME, results, args.output)
    return results


if __name__ == "__main__":
    run_main(main)
