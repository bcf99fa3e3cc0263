"""Per-step overhead of teamster vs raw Celery chains, same worker, same settings, same run.

    python -m bench.overhead --runs 200

Both sides run in ONE worker process (threads pool, concurrency 8 by default) started from ``teamster.tasks.app`` with
teamster's Celery configuration (JSON, acks_late, prefetch off, Redis result backend):

* teamster: ``--runs`` runs of ``bench_linear5`` -- five agent steps, each one scripted model call (zero
  latency) producing a tiny structured output, with leases, journal, fenced commits and state versions;
* raw Celery: ``--runs`` ``celery.chain`` s of five ``bench.noop`` tasks with the Redis result backend.

One difference is teamster's design, not the set-up: kombu's ack emulation (its unacked hash, 8 commands per message)
tracks the noop tasks, as it tracks any Celery task on Redis, but not step messages, whose delivery the run store
tracks instead (see ``teamster/tasks/transport.py``).

Phases: warm-up; idle Redis traffic (subtracted from the command counts); a throughput phase (all runs
submitted at once, open loop, in ``--rounds`` alternating blocks); a latency phase (``--latency-runs`` runs
one after the other on an otherwise idle worker).

Per-step latency: teamster = ``finished_at - queued_at`` of each step record (the successor's ``queued_at`` is
its predecessor's commit time); raw Celery = ``t(k) - t(k-1)``, where ``t(k)`` is the time the k-th noop ran
(its return value, read from the result backend) and ``t(0)`` the moment the client sent the chain. Both
therefore measure "previous step finished -> this step finished", including the broker hop.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, chain

from bench._common import (
    BenchEnv,
    BenchError,
    BenchWorker,
    Ticker,
    add_common_args,
    bench_env,
    console,
    context_switches,
    counter_delta,
    cpu_count,
    cpu_seconds,
    fmt,
    machine_info,
    percentile,
    print_table,
    ratio,
    redis_counters,
    run_main,
    write_results,
)
from bench.bench_workflows import LINEAR_STEPS, LINEAR_WORKFLOW, NOOP_TASK
from teamster.config.settings import TeamsterSettings, load_settings
from teamster.orchestrator.client import Client
from teamster.orchestrator.enqueue import producer_app
from teamster.orchestrator.keys import Keys

__all__ = ["main", "build_parser"]

NAME = "overhead"
STEPS = len(LINEAR_STEPS)
POLL = 0.02


@dataclass
class Block:
    """One measured block of one side."""

    side: str
    runs: int
    seconds: float
    counters: dict[str, int]
    own: Counter[str]
    worker_cpu: float
    redis_cpu: float
    switches: int = 0
    latencies: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- sides


class Side:
    """How one side submits a batch, detects completion and reports per-step timestamps."""

    name = ""

    def submit(self, n: int) -> list[Any]:
        raise NotImplementedError

    def pending(self, handles: list[Any], own: Counter[str]) -> int:
        raise NotImplementedError

    def latencies(self, handles: list[Any]) -> list[float]:
        raise NotImplementedError

    def run_one(self, timeout: float) -> Any:
        raise NotImplementedError


class TeamsterSide(Side):
    name = "teamster"

    def __init__(self, env: BenchEnv, client: Client, settings: TeamsterSettings) -> None:
        self.env = env
        self.client = client
        self.keys = Keys(settings.key_prefix)

    def submit(self, n: int) -> list[str]:
        return [self.client.submit(LINEAR_WORKFLOW, {"text": "bench"}) for _ in range(n)]

    def pending(self, handles: list[str], own: Counter[str]) -> int:
        own["zcard"] += 1
        return int(self.env.client.zcard(self.keys.active_runs))

    def check(self, handles: list[str]) -> None:
        pipe = self.env.client.pipeline(transaction=False)
        for run_id in handles:
            pipe.hget(self.keys.run(run_id), "status")
        bad = [(r, s) for r, s in zip(handles, pipe.execute(), strict=True) if s != '"succeeded"']
        if bad:
            raise BenchError(f"{len(bad)} teamster runs did not succeed, e.g. {bad[:3]}; "
                             f"`teamster runs show {bad[0][0]}` (TEAMSTER_KEY_PREFIX={self.keys.prefix}) explains")

    def step_records(self, handles: list[str]) -> list[list[dict[str, float]]]:
        pipe = self.env.client.pipeline(transaction=False)
        for run_id in handles:
            for step in LINEAR_STEPS:
                pipe.hmget(self.keys.step(run_id, step), ["queued_at", "started_at", "finished_at"])
        raw = pipe.execute()
        out = []
        for i in range(len(handles)):
            rows = raw[i * STEPS:(i + 1) * STEPS]
            out.append([dict(zip(("queued_at", "started_at", "finished_at"), (float(json.loads(v)) for v in row),
                                 strict=True)) for row in rows])
        return out

    def latencies(self, handles: list[str]) -> list[float]:
        return [s["finished_at"] - s["queued_at"] for run in self.step_records(handles) for s in run]

    def breakdown(self, handles: list[str]) -> dict[str, list[float]]:
        """Where a step's time goes, from the step records and the journal (seconds per step)."""
        phases: dict[str, list[float]] = {k: [] for k in _PHASES}
        records = self.step_records(handles)
        for run_id, steps in zip(handles, records, strict=True):
            events: dict[tuple[str, str], float] = {}
            for event in self.client.journal(run_id):
                if event.step and event.type in ("step_start", "agent_start", "model_call", "outcome"):
                    events.setdefault((event.step, event.type), event.ts)
            for step, rec in zip(LINEAR_STEPS, steps, strict=True):
                marks = [rec["queued_at"], rec["started_at"], events.get((step, "step_start")),
                         events.get((step, "agent_start")), events.get((step, "model_call")),
                         events.get((step, "outcome")), rec["finished_at"]]
                if any(m is None for m in marks):
                    continue
                for name, (a, b) in zip(_PHASES, zip(marks, marks[1:], strict=False), strict=True):
                    phases[name].append(float(b) - float(a))  # type: ignore[arg-type]
        return phases

    def run_one(self, timeout: float) -> str:
        run_id = self.client.submit(LINEAR_WORKFLOW, {"text": "bench"})
        key = self.keys.run(run_id)
        deadline = time.monotonic() + timeout
        while True:
            status = self.env.client.hget(key, "status")
            if status == '"succeeded"':
                return run_id
            if status in ('"failed"', '"escalated"', '"needs_human"', '"cancelled"'):
                raise BenchError(f"teamster run {run_id} ended {status}: {self.client.status(run_id).error}")
            if time.monotonic() > deadline:
                raise BenchError(f"teamster run {run_id} not done after {timeout}s (status {status})")
            time.sleep(0.002)


_PHASES = (
    "broker + dispatch + claim",
    "load run & state",
    "build strands agent",
    "model call + strands loop",
    "outcome + validation",
    "commit (state v+1, successors)",
)


class RawSide(Side):
    name = "raw celery"

    def __init__(self, env: BenchEnv, app: Celery, settings: TeamsterSettings) -> None:
        self.env = env
        self.app = app
        self.meta_prefix = f"{settings.key_prefix}:celery:celery-task-meta-"

    def _chain(self) -> tuple[float, list[str]]:
        sent = time.time()
        result = chain(*[self.app.signature(NOOP_TASK) for _ in range(STEPS)]).apply_async()
        ids: list[str] = []
        node: Any = result
        while node is not None:
            ids.append(str(node.id))
            node = node.parent
        ids.reverse()
        if len(ids) != STEPS:
            raise BenchError(f"expected a chain of {STEPS} results, got {len(ids)}")
        return sent, ids

    def submit(self, n: int) -> list[tuple[float, list[str]]]:
        return [self._chain() for _ in range(n)]

    def pending(self, handles: list[tuple[float, list[str]]], own: Counter[str]) -> int:
        own["exists"] += 1
        keys = [self.meta_prefix + ids[-1] for _, ids in handles]
        return len(keys) - int(self.env.client.exists(*keys))

    def latencies(self, handles: list[tuple[float, list[str]]]) -> list[float]:
        keys = [self.meta_prefix + i for _, ids in handles for i in ids]
        metas = self.env.client.mget(keys)
        out: list[float] = []
        for index, (sent, _ids) in enumerate(handles):
            previous = sent
            for raw in metas[index * STEPS:(index + 1) * STEPS]:
                if raw is None:
                    raise BenchError("a raw Celery result is missing from the result backend")
                meta = json.loads(raw)
                if meta.get("status") != "SUCCESS":
                    raise BenchError(f"a raw Celery task did not succeed: {meta}")
                done = float(meta["result"])
                out.append(done - previous)
                previous = done
        return out

    def run_one(self, timeout: float) -> tuple[float, list[str]]:
        sent, ids = self._chain()
        self.app.AsyncResult(ids[-1]).get(timeout=timeout)
        return sent, ids


# --------------------------------------------------------------------------- phases


def _redis_cpu(env: BenchEnv) -> float:
    info = env.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure_block(env: BenchEnv, side: Side, worker: BenchWorker, n: int, timeout: float) -> Block:
    """Submit ``n`` runs at once and wait for all of them; counters cover submission and execution."""
    own: Counter[str] = Counter()
    before = redis_counters(env.client)
    cpu0, rcpu0, switches0 = cpu_seconds(worker.pid), _redis_cpu(env), context_switches(worker.pid)
    t0 = time.monotonic()
    handles = side.submit(n)
    ticker = Ticker(f"{side.name}: runs done", n)
    deadline = t0 + timeout
    while True:
        left = side.pending(handles, own)
        if left == 0:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{side.name}: {left} of {n} runs not done after {timeout:.0f}s "
                             f"(worker log {worker.log_path}):\n{worker.log_tail(15)}")
        if not worker.alive():
            raise BenchError(f"worker died (log {worker.log_path}):\n{worker.log_tail()}")
        ticker.update(n - left)
        time.sleep(POLL)
    seconds = time.monotonic() - t0
    cpu1, rcpu1, switches1 = cpu_seconds(worker.pid), _redis_cpu(env), context_switches(worker.pid)
    after = redis_counters(env.client)
    if isinstance(side, TeamsterSide):
        side.check(handles)
    block = Block(side.name, n, seconds, counter_delta(before, after), own, cpu1 - cpu0, rcpu1 - rcpu0,
                  switches1 - switches0)
    block.latencies = side.latencies(handles)
    console.print(f"  {side.name}: {n} runs x {STEPS} steps in {seconds:.2f}s "
                  f"({n * STEPS / seconds:.1f} steps/s)")
    return block


def commands_per_step(blocks: list[Block], idle: dict[str, float]) -> dict[str, Any]:
    """Redis commands per step over the blocks, minus idle background traffic and the benchmark's polling."""
    steps = sum(b.runs for b in blocks) * STEPS
    seconds = sum(b.seconds for b in blocks)
    per_cmd: Counter[str] = Counter()
    for block in blocks:
        for key, value in block.counters.items():
            if key.startswith("cmd:") and key != "cmd:info":
                per_cmd[key[4:]] += value
        for cmd, count in block.own.items():
            per_cmd[cmd] -= count
    corrected = {cmd: (count - idle.get(cmd, 0.0) * seconds) / steps for cmd, count in per_cmd.items()}
    corrected = {cmd: value for cmd, value in corrected.items() if value > 0.005}
    bytes_in = sum(b.counters.get("net_input_bytes", 0) for b in blocks) - idle.get("@net_in", 0.0) * seconds
    bytes_out = sum(b.counters.get("net_output_bytes", 0) for b in blocks) - idle.get("@net_out", 0.0) * seconds
    return {
        "total": sum(corrected.values()),
        "evalsha": corrected.get("evalsha", 0.0) + corrected.get("eval", 0.0),
        "by_command": dict(sorted(corrected.items(), key=lambda kv: -kv[1])),
        "net_in_bytes": bytes_in / steps,
        "net_out_bytes": bytes_out / steps,
    }


def idle_rates(env: BenchEnv, seconds: float) -> dict[str, float]:
    """Background Redis commands per second with the worker idle (BRPOP loops, heartbeats, restores...)."""
    before = redis_counters(env.client)
    time.sleep(seconds)
    delta = counter_delta(before, redis_counters(env.client))
    rates = {k[4:]: v / seconds for k, v in delta.items() if k.startswith("cmd:") and k != "cmd:info"}
    rates["@net_in"] = delta.get("net_input_bytes", 0) / seconds
    rates["@net_out"] = delta.get("net_output_bytes", 0) / seconds
    return rates


def round_trips(env: BenchEnv, side: Side, runs: int, timeout: float) -> dict[str, float]:
    """Commands per step as the network sees them, from Redis MONITOR over ``runs`` runs one at a time.

    MONITOR tags the commands a Lua script runs (client type ``lua``), so this separates round trips (commands a
    client sent; a pipeline counts once per command it carries) from work inside scripts. The benchmark's own
    connections (submitting, polling) are left out, identified by their local ports. Slow (MONITOR copies every
    command), so it runs apart from the timed phases.
    """
    import psutil  # noqa: PLC0415 - a dev dependency of the benchmarks

    seen: Counter[str] = Counter()
    stop = threading.Event()
    monitor_client = redis.Redis.from_url(env.redis_url, decode_responses=True)
    ready = threading.Event()

    def watch() -> None:
        with monitor_client.monitor() as monitor:
            ready.set()
            for entry in monitor.listen():
                if stop.is_set() and entry.get("command", "").upper().startswith("ECHO TEAMSTER-BENCH-END"):
                    return
                origin = "lua" if entry.get("client_type") == "lua" else str(entry.get("client_port", ""))
                seen[f"{origin}|{str(entry.get('command', '')).split(' ', 1)[0].strip(chr(34)).lower()}"] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(10)
    for _ in range(runs):
        side.run_one(timeout)
    own = {str(c.laddr.port) for c in psutil.Process().net_connections(kind="tcp") if c.laddr}
    stop.set()
    env.client.echo("TEAMSTER-BENCH-END")
    thread.join(30)
    monitor_client.close()
    steps = runs * STEPS
    network = sum(n for key, n in seen.items() if key.split("|")[0] not in own and not key.startswith("lua|"))
    scripted = sum(n for key, n in seen.items() if key.startswith("lua|"))
    return {"round_trips": network / steps, "in_scripts": scripted / steps, "total": (network + scripted) / steps}


def subscriptions(env: BenchEnv) -> list[dict[str, str]]:
    """Redis clients holding channel subscriptions (e.g. result consumers never drained), from CLIENT LIST."""
    out = []
    for line in str(env.client.execute_command("CLIENT", "LIST")).splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if int(fields.get("sub", "0")):  # kombu's fanout (pidbox, events) uses PSUBSCRIBE, not counted
            out.append({k: fields.get(k, "") for k in ("id", "addr", "name", "sub", "psub", "omem", "tot-mem", "cmd")})
    return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="teamster vs raw Celery: steps/s, per-step latency and Redis commands per step, with one "
                    "worker process and identical Celery settings on both sides. Nothing is asserted: read the "
                    "ratios (teamster/raw) measured in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=400, help="Runs per side in the throughput phase "
                        "(teamster: bench_linear5 runs; raw: chains of 5 noop tasks).")
    parser.add_argument("--latency-runs", type=int, default=60,
                        help="Runs per side in the latency phase (one run at a time, idle worker).")
    parser.add_argument("--rounds", type=int, default=4,
                        help="The throughput phase alternates raw/teamster blocks this many times (drift on a "
                             "shared machine hits both sides alike).")
    parser.add_argument("--pool", default="threads", help="Celery pool of the worker.")
    parser.add_argument("--concurrency", type=int, default=8, help="Worker concurrency.")
    parser.add_argument("--warmup", type=int, default=5, help="Warm-up runs per side (not measured).")
    parser.add_argument("--idle-seconds", type=float, default=3.0,
                        help="How long idle Redis traffic is sampled (subtracted from command counts).")
    parser.add_argument("--timeout", type=float, default=900.0, help="Give up on a block after this many seconds.")
    parser.add_argument("--monitor-runs", type=int, default=20,
                        help="Runs per side counted under Redis MONITOR (round trips vs commands in scripts); "
                             "0 skips that phase.")
    add_common_args(parser)
    return parser


def run(env: BenchEnv, args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    worker = env.worker("overhead", pool=args.pool, concurrency=args.concurrency)
    console.print(f"starting 1 worker (pool={args.pool}, concurrency={args.concurrency}) ...")
    env.start_workers([worker])
    client = Client(settings, redis_url=env.redis_url)
    app = producer_app(settings, env.redis_url)
    teamster = TeamsterSide(env, client, settings)
    raw = RawSide(env, app, settings)
    sides: list[Side] = [raw, teamster]

    console.print(f"warm-up: {args.warmup} runs per side ...")
    for side in sides:
        for _ in range(args.warmup):
            side.run_one(args.timeout)
    console.print(f"idle Redis traffic: sampling {args.idle_seconds:.0f}s ...")
    idle = idle_rates(env, args.idle_seconds)

    console.print(f"throughput: {args.runs} runs per side, submitted at once, in {args.rounds} round(s) ...")
    blocks: dict[str, list[Block]] = {s.name: [] for s in sides}
    per_round = [args.runs // args.rounds + (1 if i < args.runs % args.rounds else 0) for i in range(args.rounds)]
    for index, n in enumerate(per_round):
        order = sides if index % 2 == 0 else list(reversed(sides))
        for side in order:
            if n:
                blocks[side.name].append(measure_block(env, side, worker, n, args.timeout))
    subs = subscriptions(env)

    console.print(f"latency: {args.latency_runs} runs per side, one at a time ...")
    unloaded: dict[str, list[float]] = {}
    handles: dict[str, list[Any]] = {}
    for side in sides:
        ticker = Ticker(f"{side.name}: runs", args.latency_runs)
        done: list[Any] = []
        for _ in range(args.latency_runs):
            done.append(side.run_one(args.timeout))
            ticker.update(len(done))
        handles[side.name] = done
        unloaded[side.name] = side.latencies(done)
    breakdown = teamster.breakdown(handles[teamster.name])
    trips: dict[str, dict[str, float]] = {}
    if args.monitor_runs > 0:
        console.print(f"round trips: {args.monitor_runs} runs per side under Redis MONITOR ...")
        trips = {key: round_trips(env, side, args.monitor_runs, args.timeout)
                 for key, side in (("raw_celery", raw), ("teamster", teamster))}
    results = summarize(args, blocks, unloaded, breakdown, idle, subs, env, worker)
    for key, per_step in trips.items():
        results[key]["monitor_per_step"] = per_step
    return results


def _monitor_rows(raw: dict[str, Any], ts: dict[str, Any]) -> list[list[str]]:
    """The MONITOR rows of the overhead table, or none when ``--monitor-runs 0`` skipped that phase."""
    if "monitor_per_step" not in ts:
        return []
    raw_trips, ts_trips = raw["monitor_per_step"], ts["monitor_per_step"]
    return [
        ["  sent over the network (MONITOR)", fmt(raw_trips["round_trips"], 1), fmt(ts_trips["round_trips"], 1),
         fmt(ratio(ts_trips["round_trips"], raw_trips["round_trips"]), 2)],
        ["  run inside Lua scripts (MONITOR)", fmt(raw_trips["in_scripts"], 1), fmt(ts_trips["in_scripts"], 1), "—"],
    ]


def _side_summary(blocks: list[Block], unloaded: list[float], idle: dict[str, float]) -> dict[str, Any]:
    runs = sum(b.runs for b in blocks)
    seconds = sum(b.seconds for b in blocks)
    loaded = [x for b in blocks for x in b.latencies]
    steps = runs * STEPS
    return {
        "runs": runs,
        "steps": steps,
        "seconds": seconds,
        "steps_per_second": steps / seconds if seconds else None,
        "worker_cpu_ms_per_step": 1000 * sum(b.worker_cpu for b in blocks) / steps,
        "redis_cpu_ms_per_step": 1000 * sum(b.redis_cpu for b in blocks) / steps,
        "worker_context_switches_per_step": sum(b.switches for b in blocks) / steps,
        "latency_unloaded_ms": {"p50": 1000 * percentile(unloaded, 50), "p90": 1000 * percentile(unloaded, 90),
                                "p99": 1000 * percentile(unloaded, 99), "n": len(unloaded)},
        "latency_loaded_ms": {"p50": 1000 * percentile(loaded, 50), "p99": 1000 * percentile(loaded, 99),
                              "n": len(loaded)},
        "redis_per_step": commands_per_step(blocks, idle),
        "blocks": [{"runs": b.runs, "seconds": b.seconds, "steps_per_second": b.runs * STEPS / b.seconds}
                   for b in blocks],
    }


def summarize(args: argparse.Namespace, blocks: dict[str, list[Block]], unloaded: dict[str, list[float]],
              breakdown: dict[str, list[float]], idle: dict[str, float], subs: list[dict[str, str]],
              env: BenchEnv, worker: BenchWorker) -> dict[str, Any]:
    raw = _side_summary(blocks["raw celery"], unloaded["raw celery"], idle)
    ts = _side_summary(blocks["teamster"], unloaded["teamster"], idle)
    phases = {name: {"p50_ms": 1000 * percentile(v, 50), "mean_ms": 1000 * sum(v) / len(v) if v else None}
              for name, v in breakdown.items()}
    return {
        "benchmark": NAME,
        "machine": machine_info(env.client),
        "settings": {"runs": args.runs, "latency_runs": args.latency_runs, "rounds": args.rounds,
                     "pool": args.pool, "concurrency": args.concurrency, "workers": 1,
                     "steps_per_run": STEPS, "scripted_latency_s": 0.0, "redis": "private" if env.embedded else
                     "external", "aof": bool(env.embedded), "worker_loglevel": env.loglevel},
        "method": {
            "teamster_latency": "step finished_at - queued_at from the run store (queued_at of step k = commit "
                                "time of step k-1)",
            "raw_latency": "t(k) - t(k-1), t(k) = time.time() returned by the k-th noop (from the result "
                           "backend), t(0) = when the client sent the chain",
            "steps_per_second": "runs x 5 steps / wall time from first submit until every run is done "
                                "(open loop: the whole block submitted at once)",
            "redis_commands": "INFO commandstats delta over the throughput blocks (commands run inside Lua "
                              "scripts included), minus idle background traffic (rate x duration) and the "
                              "benchmark's own completion polling, divided by steps",
        },
        "raw_celery": raw,
        "teamster": ts,
        "ratios": {
            "steps_per_second": ratio(ts["steps_per_second"], raw["steps_per_second"]),
            "latency_p50": ratio(ts["latency_unloaded_ms"]["p50"], raw["latency_unloaded_ms"]["p50"]),
            "latency_p99": ratio(ts["latency_unloaded_ms"]["p99"], raw["latency_unloaded_ms"]["p99"]),
            "redis_commands_per_step": ratio(ts["redis_per_step"]["total"], raw["redis_per_step"]["total"]),
            "worker_cpu_per_step": ratio(ts["worker_cpu_ms_per_step"], raw["worker_cpu_ms_per_step"]),
        },
        "overhead_ms_per_step": {
            "p50": ts["latency_unloaded_ms"]["p50"] - raw["latency_unloaded_ms"]["p50"],
            "p99": ts["latency_unloaded_ms"]["p99"] - raw["latency_unloaded_ms"]["p99"],
        },
        "teamster_breakdown": phases,
        "idle_redis_commands_per_second": {k: v for k, v in idle.items() if not k.startswith("@")},
        "client_subscriptions_after_throughput": subs,
        "worker_ready_seconds": worker.ready_seconds,
    }


def report(results: dict[str, Any]) -> None:
    raw, ts, r = results["raw_celery"], results["teamster"], results["ratios"]
    s = results["settings"]
    print_table(
        f"overhead: {s['runs']} runs x {STEPS} steps per side, 1 worker ({s['pool']}, concurrency "
        f"{s['concurrency']}), {results['machine']['cpu_count']} CPUs",
        ["metric", "raw Celery", "teamster", "teamster / raw"],
        [
            ["throughput, steps/s (open loop)", fmt(raw["steps_per_second"]), fmt(ts["steps_per_second"]),
             fmt(r["steps_per_second"], 3)],
            ["step latency p50, ms (idle worker)", fmt(raw["latency_unloaded_ms"]["p50"], 2),
             fmt(ts["latency_unloaded_ms"]["p50"], 2), fmt(r["latency_p50"], 2)],
            ["step latency p99, ms (idle worker)", fmt(raw["latency_unloaded_ms"]["p99"], 2),
             fmt(ts["latency_unloaded_ms"]["p99"], 2), fmt(r["latency_p99"], 2)],
            ["step latency p50, ms (throughput phase)", fmt(raw["latency_loaded_ms"]["p50"], 1),
             fmt(ts["latency_loaded_ms"]["p50"], 1), "—"],
            ["worker CPU per step, ms", fmt(raw["worker_cpu_ms_per_step"], 2), fmt(ts["worker_cpu_ms_per_step"], 2),
             fmt(r["worker_cpu_per_step"], 2)],
            ["worker context switches per step", fmt(raw["worker_context_switches_per_step"], 1),
             fmt(ts["worker_context_switches_per_step"], 1),
             fmt(ratio(ts["worker_context_switches_per_step"], raw["worker_context_switches_per_step"]), 2)],
            ["Redis CPU per step, ms", fmt(raw["redis_cpu_ms_per_step"], 3), fmt(ts["redis_cpu_ms_per_step"], 3),
             "—"],
            ["Redis commands per step", fmt(raw["redis_per_step"]["total"], 1),
             fmt(ts["redis_per_step"]["total"], 1), fmt(r["redis_commands_per_step"], 2)],
            ["  of which EVALSHA (Lua scripts)", fmt(raw["redis_per_step"]["evalsha"], 2),
             fmt(ts["redis_per_step"]["evalsha"], 2), "—"],
            *_monitor_rows(raw, ts),
            ["bytes to Redis per step", fmt(raw["redis_per_step"]["net_in_bytes"], 0),
             fmt(ts["redis_per_step"]["net_in_bytes"], 0), "—"],
            ["bytes from Redis per step", fmt(raw["redis_per_step"]["net_out_bytes"], 0),
             fmt(ts["redis_per_step"]["net_out_bytes"], 0), "—"],
        ],
        caption=f"teamster per-step overhead over raw Celery (idle worker): p50 "
                f"{fmt(results['overhead_ms_per_step']['p50'], 2)} ms, p99 "
                f"{fmt(results['overhead_ms_per_step']['p99'], 2)} ms. Latency: teamster = finished_at - queued_at "
                "(run store); raw = t(k) - t(k-1) from the noop return values, t(0) = chain sent. Redis "
                "commands include those run inside Lua scripts; idle traffic and the benchmark's polling are "
                "subtracted.",
    )
    print_table(
        "where a teamster step's time goes (idle worker, scripted model at 0 latency)",
        ["phase", "p50 ms", "mean ms"],
        [[name, fmt(v["p50_ms"], 2), fmt(v["mean_ms"], 2)] for name, v in results["teamster_breakdown"].items()],
        caption="From the step record (queued_at, started_at = claim, finished_at = commit) and journal events "
                "(step_start, agent_start, model_call, outcome).",
    )
    top = [(cmd, ts["redis_per_step"]["by_command"].get(cmd), raw["redis_per_step"]["by_command"].get(cmd))
           for cmd in list(ts["redis_per_step"]["by_command"])[:12]]
    print_table("Redis commands per step by command (teamster's top 12)", ["command", "teamster", "raw Celery"],
                [[c, fmt(t, 2), fmt(rw, 2)] for c, t, rw in top])
    subs = results["client_subscriptions_after_throughput"]
    if subs:
        console.print(f"[yellow]note:[/] {len(subs)} Redis client(s) still hold pub/sub subscriptions after the "
                      "throughput phase: " + "; ".join(f"{s['addr']} sub={s['sub']} omem={s['omem']}"
                                                       for s in subs))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print tables; write bench/results/overhead.json; return the results."""
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.rounds < 1 or args.latency_runs < 1:
        raise SystemExit("--runs, --rounds and --latency-runs must be at least 1")
    console.print(f"[bold]bench.overhead[/]: teamster vs raw Celery, {cpu_count()} CPUs")
    started = time.monotonic()
    with bench_env(NAME, args) as env:
        results = run(env, args)
    results["wall_seconds"] = time.monotonic() - started
    report(results)
    write_results(NAME, results, args.output)
    return results


if __name__ == "__main__":
    run_main(main)
