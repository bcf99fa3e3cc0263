"""Recovery after SIGKILL mid-step: the step lease + watchdog vs Redis's visibility timeout.

    python -m bench.recovery

Two workers (threads pool) consume the same queue and the watchdog loop runs in this process
(``orchestrator.watchdog.Watchdog(...).run_forever``, every ``--watchdog-interval`` seconds). For each lease
length (``--leases``, default 2, 5 and 10 s) and each repetition: a ``bench_single`` run is submitted; once
its model call is in flight (the scripted model takes ``--step-seconds``), the worker holding the step is
SIGKILLed at a random point of the call; a replacement worker is started right away (so two stay up) and the
time until the step is committed by another worker is measured. The timeline of each recovery comes from
the run store and the journal:

* detect: kill -> the watchdog re-enqueues the step (journal ``lease_expired``); bounded by the lease left at
  the kill (at most ``lease_seconds``) plus one watchdog interval;
* pick-up: re-enqueue -> another worker claims it with a new fencing token;
* redo: claim -> commit (the interrupted model call is made again: ``--step-seconds``);
* total: kill -> commit.

Plain Celery with ``acks_late`` on Redis recovers the same message only when the broker's visibility timeout
expires: 3600 s by default, ``TEAMSTER_VISIBILITY_TIMEOUT`` (900 s by default) in teamster's configuration,
where it is only a backstop. Those are configuration values, not measurements; the ratio says how much sooner
the measured recovery is.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from typing import Any

from bench._common import (
    BenchEnv,
    BenchError,
    BenchWorker,
    add_common_args,
    bench_env,
    console,
    cpu_count,
    fmt,
    machine_info,
    print_table,
    run_main,
    wait_until,
    write_results,
)
from bench.bench_workflows import SINGLE_STEP, SINGLE_WORKFLOW
from teamster.config.settings import TeamsterSettings, load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.keys import Keys
from teamster.orchestrator.watchdog import Watchdog
from teamster.testing import model_calls_key

__all__ = ["main", "build_parser", "CELERY_DEFAULT_VISIBILITY_TIMEOUT"]

NAME = "recovery"
CELERY_DEFAULT_VISIBILITY_TIMEOUT = 3600  # kombu's Redis transport default (seconds)
FINAL = ('"succeeded"', '"failed"', '"escalated"', '"needs_human"', '"cancelled"')


class WorkerPool:
    """The workers of one lease setting; the killed one is replaced at once."""

    def __init__(self, env: BenchEnv, prefix: str, lease: float, args: argparse.Namespace) -> None:
        self.env = env
        self.prefix = prefix
        self.worker_env = {"scripted_latency": args.step_seconds, "lease_seconds": lease,
                           "bench_count_model_calls": 1}
        self.concurrency = args.concurrency
        self.serial = 0
        self.workers = [self._new() for _ in range(args.workers)]

    def _new(self) -> BenchWorker:
        self.serial += 1
        return self.env.worker(f"{self.prefix.rsplit('-', 1)[-1]}-w{self.serial}", prefix=self.prefix,
                               concurrency=self.concurrency, env=self.worker_env)

    def start(self) -> None:
        self.env.start_workers(self.workers)

    def wait_ready(self) -> None:
        for worker in self.workers:
            worker.wait_ready(120)

    def by_pid(self, pid: int) -> BenchWorker:
        for worker in self.workers:
            if worker.pid == pid:
                return worker
        raise BenchError(f"the step runs in pid {pid}, which is none of this benchmark's workers")

    def replace(self, victim: BenchWorker) -> None:
        self.workers.remove(victim)
        self.workers.append(self._new().start(wait=False))

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=10)


def one_recovery(env: BenchEnv, client: Client, keys: Keys, pool: WorkerPool, lease: float, rep: int,
                 rng: random.Random, args: argparse.Namespace) -> dict[str, Any]:
    """Submit, kill the step's worker mid-call, wait for the commit, read the timeline."""
    pool.wait_ready()
    redis = env.client
    run_id = client.submit(SINGLE_WORKFLOW, {"text": f"recover {lease} {rep}"})
    calls_field = f"{run_id}:{SINGLE_STEP}"
    wait_until(lambda: int(redis.hget(model_calls_key(keys.prefix), calls_field) or 0) >= 1, 30,
               f"the model call of run {run_id} to start")
    call_seen = time.monotonic()
    record = client.runtime.store.get_step(run_id, SINGLE_STEP)
    if record is None or record.worker is None:
        raise BenchError(f"step of run {run_id} has no worker recorded")
    victim = pool.by_pid(int(record.worker.rsplit(":", 1)[1]))
    offset = rng.uniform(args.kill_min, args.kill_max_fraction * args.step_seconds)
    time.sleep(max(0.0, call_seen + offset - time.monotonic()))
    lease_left_ms = int(client.runtime.store.lease_remaining(run_id, SINGLE_STEP) * 1000)
    t_kill = time.time()
    victim.kill()
    status = redis.hget(keys.step(run_id, SINGLE_STEP), "status")
    if status != '"running"':
        raise BenchError(f"the step was {status} when its worker was killed; use a longer --step-seconds")
    pool.replace(victim)
    timeout = lease + args.watchdog_interval + args.step_seconds + 60
    final = wait_until(lambda: redis.hget(keys.run(run_id), "status") in FINAL and
                       redis.hget(keys.run(run_id), "status"), timeout, f"run {run_id} to finish after the kill")
    record = client.runtime.store.get_step(run_id, SINGLE_STEP)
    assert record is not None
    events = client.journal(run_id, step=SINGLE_STEP)
    expired = next((e.ts for e in events if e.type == "lease_expired"), None)
    commits = [e for e in events if e.type == "commit"]
    takeover = [e for e in events if e.type == "step_start" and e.data.get("takeover")]
    model_calls = int(redis.hget(model_calls_key(keys.prefix), calls_field) or 0)
    finished = record.finished_at
    ok = (final == '"succeeded"' and record.attempts == 2 and record.lease_expiries == 1 and len(commits) == 1
          and len(takeover) == 1 and not str(record.worker).endswith(f":{victim.pid}"))
    result = {
        "lease_seconds": lease,
        "rep": rep,
        "run_id": run_id,
        "kill_after_call_start_s": offset,
        "lease_left_at_kill_s": lease_left_ms / 1000 if lease_left_ms >= 0 else None,
        "detect_s": expired - t_kill if expired else None,
        "pickup_s": record.started_at - expired if expired and record.started_at else None,
        "redo_s": finished - record.started_at if finished and record.started_at else None,
        "kill_to_claim_s": record.started_at - t_kill if record.started_at else None,
        "total_s": finished - t_kill if finished else None,
        "run_status": str(final).strip('"'),
        "attempts": record.attempts,
        "lease_expiries": record.lease_expiries,
        "commits": len(commits),
        "model_calls": model_calls,
        "consistent": ok,
    }
    console.print(f"  lease {lease:g}s rep {rep + 1}: killed {offset:.2f}s into the call "
                  f"({fmt(result['lease_left_at_kill_s'], 2)}s of lease left) -> committed by another worker "
                  f"{fmt(result['total_s'], 2)}s later (detect {fmt(result['detect_s'], 2)}s, pick-up "
                  f"{fmt(result['pickup_s'], 3)}s, redo {fmt(result['redo_s'], 2)}s)"
                  + ("" if ok else " [red]INCONSISTENT[/]"))
    return result


def measure_lease(env: BenchEnv, lease: float, args: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    prefix = env.prefix(f"lease{str(lease).replace('.', '_')}")
    settings: TeamsterSettings = load_settings(key_prefix=prefix, lease_seconds=lease,
                                               watchdog_interval_seconds=args.watchdog_interval)
    keys = Keys(prefix)
    client = Client(settings, redis_url=env.redis_url)
    pool = WorkerPool(env, prefix, lease, args)
    console.print(f"[bold]lease {lease:g}s[/]: starting {args.workers} workers and the watchdog "
                  f"(every {args.watchdog_interval:g}s) ...")
    pool.start()
    stop = threading.Event()
    watchdog = threading.Thread(target=Watchdog(client.runtime).run_forever, args=(stop, args.watchdog_interval),
                                name="watchdog", daemon=True)
    watchdog.start()
    try:
        return [one_recovery(env, client, keys, pool, lease, rep, rng, args) for rep in range(args.reps)]
    finally:
        stop.set()
        watchdog.join(10)
        pool.stop()
        env.discard(prefix)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.recovery",
        description="SIGKILL a worker mid-step; measure the time until another worker commits the step (lease + "
                    "watchdog), compared with the Redis visibility timeout plain Celery relies on. Nothing is "
                    "asserted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--leases", default="2,5,10", help="TEAMSTER_LEASE_SECONDS values to measure.")
    parser.add_argument("--reps", type=int, default=5, help="Kills per lease value.")
    parser.add_argument("--step-seconds", type=float, default=2.0,
                        help="Scripted model latency: how long the step runs (and runs again after takeover).")
    parser.add_argument("--watchdog-interval", type=float, default=1.0,
                        help="Seconds between watchdog scans (TEAMSTER_WATCHDOG_INTERVAL_SECONDS defaults to 10).")
    parser.add_argument("--workers", type=int, default=2, help="Workers running (one is killed and replaced).")
    parser.add_argument("--concurrency", type=int, default=2, help="Threads per worker.")
    parser.add_argument("--kill-min", type=float, default=0.2,
                        help="Earliest kill, seconds after the model call started.")
    parser.add_argument("--kill-max-fraction", type=float, default=0.8,
                        help="Latest kill as a fraction of --step-seconds (the kill time is uniform in between).")
    parser.add_argument("--seed", type=int, default=7, help="Seed of the kill times.")
    add_common_args(parser)
    return parser


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def report(results: dict[str, Any]) -> None:
    s = results["settings"]
    rows = []
    for r in results["summary"]:
        rows.append([f"{r['lease_seconds']:g}", str(r["reps"]), fmt(r["total_median_s"], 2), fmt(r["total_max_s"], 2),
                     fmt(r["detect_median_s"], 2), fmt(r["pickup_median_s"], 3), fmt(r["redo_median_s"], 2),
                     fmt(r["bound_s"], 1), f"{fmt(r['vs_celery_default'], 0)}x", f"{fmt(r['vs_teamster_vt'], 0)}x",
                     f"{r['consistent']}/{r['reps']}"])
    print_table(
        f"recovery after SIGKILL mid-step: {s['workers']} workers, watchdog every {s['watchdog_interval']:g}s, "
        f"step {s['step_seconds']:g}s, {results['machine']['cpu_count']} CPUs",
        ["lease s", "kills", "kill->commit median s", "max s", "detect s", "pick-up s", "redo s", "bound s",
         f"vs Celery VT {CELERY_DEFAULT_VISIBILITY_TIMEOUT}s", f"vs teamster VT {s['visibility_timeout']}s", "ok"],
        rows,
        caption="kill->commit = SIGKILL until the step's commit by another worker (medians over the kills); detect = "
                "kill -> watchdog re-enqueue (journal lease_expired); pick-up = re-enqueue -> new claim; redo = the "
                "interrupted model call made again. bound = lease + watchdog interval + step. 'vs ... VT' = "
                "visibility timeout / measured median: plain Celery with acks_late on Redis redelivers a killed "
                "worker's message only after the visibility timeout (3600 s by default; teamster configures "
                f"{s['visibility_timeout']} s as a backstop). ok = run succeeded, 2 attempts, 1 lease expiry, "
                "1 commit.",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write bench/results/recovery.json; return the results."""
    args = build_parser().parse_args(argv)
    leases = [float(x) for x in args.leases.split(",") if x.strip()]
    if not leases or min(leases) <= 0 or args.reps < 1 or args.workers < 2:
        raise SystemExit("--leases must be positive, --reps >= 1, --workers >= 2")
    if args.kill_max_fraction * args.step_seconds <= args.kill_min:
        raise SystemExit("--step-seconds too short for --kill-min / --kill-max-fraction")
    rng = random.Random(args.seed)
    vt = load_settings().visibility_timeout
    console.print(f"[bold]bench.recovery[/]: leases {leases}, {args.reps} kills each, {cpu_count()} CPUs")
    started = time.monotonic()
    measured: list[dict[str, Any]] = []
    with bench_env(NAME, args) as env:
        for lease in leases:
            measured += measure_lease(env, lease, args, rng)
        machine = machine_info(env.client)
    summary = []
    for lease in leases:
        mine = [m for m in measured if m["lease_seconds"] == lease]
        total = _median([m["total_s"] for m in mine])
        summary.append({
            "lease_seconds": lease,
            "reps": len(mine),
            "total_median_s": total,
            "total_max_s": _max([m["total_s"] for m in mine]),
            "detect_median_s": _median([m["detect_s"] for m in mine]),
            "detect_max_s": _max([m["detect_s"] for m in mine]),
            "pickup_median_s": _median([m["pickup_s"] for m in mine]),
            "redo_median_s": _median([m["redo_s"] for m in mine]),
            "kill_to_claim_median_s": _median([m["kill_to_claim_s"] for m in mine]),
            "bound_s": lease + args.watchdog_interval + args.step_seconds,
            "vs_celery_default": CELERY_DEFAULT_VISIBILITY_TIMEOUT / total if total else None,
            "vs_teamster_vt": vt / total if total else None,
            "consistent": sum(1 for m in mine if m["consistent"]),
        })
    results: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {"leases": leases, "reps": args.reps, "step_seconds": args.step_seconds,
                     "watchdog_interval": args.watchdog_interval, "workers": args.workers,
                     "concurrency": args.concurrency, "pool": "threads", "seed": args.seed,
                     "visibility_timeout": vt, "celery_default_visibility_timeout": CELERY_DEFAULT_VISIBILITY_TIMEOUT,
                     "worker_loglevel": args.loglevel, "redis": "external" if args.redis_url else "private"},
        "baseline": f"Redis visibility timeout: {CELERY_DEFAULT_VISIBILITY_TIMEOUT}s (Celery default), {vt}s "
                    "(teamster's TEAMSTER_VISIBILITY_TIMEOUT) -- configuration values, not measured",
        "summary": summary,
        "kills": measured,
        "notes": ["The replacement worker starts right after the kill (two workers stay up); its start-up shares "
                  "the CPUs with the recovery.",
                  f"The watchdog scans every {args.watchdog_interval:g}s here; TEAMSTER_WATCHDOG_INTERVAL_SECONDS "
                  "defaults to 10 s, which adds up to 10 s to 'detect'."],
        "wall_seconds": time.monotonic() - started,
    }
    report(results)
    for note in results["notes"]:
        console.print(f"[dim]note:[/] {note}")
    write_results(NAME, results, args.output)
    return results


if __name__ == "__main__":
    run_main(main)
