"""Run every benchmark at its default size and summarise them.

    python -m bench.all

Each benchmark runs in its own process (``python -m bench.<name>``, own private Redis, own workers) and writes
``bench/results/<name>.json``; this script then writes ``bench/results/summary.json`` and prints a markdown
table (teamster's number, the baseline measured in the same run, the ratio) ready to paste into the README.
A benchmark that fails is reported as failed; the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, RESULTS_DIR, console, fmt, write_results

__all__ = ["main", "build_parser", "markdown", "BENCHMARKS"]

BENCHMARKS = ("overhead", "provider", "limits", "concurrency", "recovery", "scaling")
WHAT = {
    "overhead": "per-step cost vs raw Celery chains (1 worker, threads x8, scripted model at 0 s)",
    "provider": "the real provider path over HTTP (strands OpenAIModel + openai SDK) vs the bare SDK",
    "limits": "1, 2, 4 workers against one rate-limited provider: shared limits vs each worker's own backoff",
    "concurrency": "I/O-bound steps (1 s model latency) on one worker: pools and concurrency vs prefork",
    "recovery": "SIGKILL mid-step until another worker commits it (lease + watchdog)",
    "scaling": "1, 2, 4 worker processes on one host (threads x8, 0.2 s model latency)",
}


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}x"


def rows_for(name: str, r: dict[str, Any]) -> list[list[str]]:
    """Markdown rows (benchmark, measure, teamster, baseline, ratio) of one result file."""
    out: list[list[str]] = []
    if name == "overhead":
        raw, ts, q = r["raw_celery"], r["teamster"], r["ratios"]
        out.append(["overhead", "throughput, steps/s", fmt(ts["steps_per_second"], 1),
                    f"raw Celery chains: {fmt(raw['steps_per_second'], 1)}", _x(q["steps_per_second"])])
        out.append(["overhead", "step latency p50 / p99, ms (idle worker)",
                    f"{fmt(ts['latency_unloaded_ms']['p50'], 1)} / {fmt(ts['latency_unloaded_ms']['p99'], 1)}",
                    f"{fmt(raw['latency_unloaded_ms']['p50'], 1)} / {fmt(raw['latency_unloaded_ms']['p99'], 1)}",
                    f"{_x(q['latency_p50'])} / {_x(q['latency_p99'])}"])
        out.append(["overhead", "Redis commands per step (inside Lua scripts included)",
                    fmt(ts["redis_per_step"]["total"], 1), fmt(raw["redis_per_step"]["total"], 1),
                    _x(q["redis_commands_per_step"])])
        trips_ts, trips_raw = ts.get("monitor_per_step"), raw.get("monitor_per_step")
        if trips_ts and trips_raw:
            out.append(["overhead", "Redis commands sent over the network per step (MONITOR)",
                        fmt(trips_ts["round_trips"], 1), fmt(trips_raw["round_trips"], 1),
                        _x(trips_ts["round_trips"] / trips_raw["round_trips"] if trips_raw["round_trips"] else None)])
        out.append(["overhead", "worker CPU per step, ms", fmt(ts["worker_cpu_ms_per_step"], 2),
                    fmt(raw["worker_cpu_ms_per_step"], 2), _x(q["worker_cpu_per_step"])])
    elif name == "provider":
        for scenario in r["scenarios"]:
            floors = [row for row in scenario["rows"] if row.get("http_client")]  # the bare SDK's
            floor = floors[0]  # on the workers' HTTP client: the like-for-like ratio
            default = next((f for f in floors[1:] if f["http_client"] == "httpx"), None)
            baseline = (f"bare SDK on {floor['http_client']}: {fmt(floor['steps_per_second'], 1)} "
                        f"req/s, {fmt(floor['cpu_ms_per_step'], 1)} ms CPU/req")
            if default is not None:
                baseline += (f"; on httpx (the SDK's default, a new connection per call): "
                             f"{fmt(default['steps_per_second'], 1)} req/s, {fmt(default['cpu_ms_per_step'], 1)} "
                             "ms CPU/req")
            for row in (row for row in scenario["rows"] if not row.get("http_client")):  # strands, Celery, teamster
                in_flight = row["in_flight_max"]  # steps (raw Celery tasks: the model calls)
                in_flight = in_flight if in_flight is not None else row["model_calls_in_flight_max"]
                ratio_cell = _x(row["vs_floor"])
                if default is not None:
                    ratio_cell += f" ({_x(row['vs_sdk_default_floor'])} of the httpx floor)"
                if row.get("vs_celery_strands_floor") is not None:
                    ratio_cell += f"; {_x(row['vs_celery_strands_floor'])} of the Celery + strands floor"
                out.append(["provider", f"{scenario['latency_seconds']:g} s model latency, "
                                        f"{scenario['concurrency']} in flight: {row['label']}",
                            f"{fmt(row['steps_per_second'], 1)} steps/s, {fmt(in_flight, 0)} in flight, "
                            f"{fmt(row['cpu_ms_per_step'], 1)} ms CPU/step, {fmt(row['rss_mb'], 0)} MB, "
                            f"{row['pool_errors']} pool errors"
                            + ("" if row["left_running"] is None else f", {row['left_running']} left running"),
                            baseline, ratio_cell])
    elif name == "limits":
        st = r["settings"]
        rows = r["rows"]
        for shared in (row for row in rows if row["shared_limits"]):
            own = next((row for row in rows if not row["shared_limits"] and row["workers"] == shared["workers"]),
                       None)
            if own is None:
                continue
            fewer = shared.get("fewer_429s")
            out.append(["limits", f"{shared['workers']} worker(s), server limit {st['rate']} req / "
                                  f"{st['rate_window_seconds']:g} s: 429s; steps/s vs the limit",
                        f"{shared['throttled']} 429s, {fmt(shared['vs_limit'], 2)}x the limit, "
                        f"{shared['failed']} dead-lettered",
                        f"own backoff: {own['throttled']} 429s, {fmt(own['vs_limit'], 2)}x, "
                        f"{own['failed']} dead-lettered",
                        "—" if fewer is None else f"{fewer * 100:.1f}% fewer 429s"])
    elif name == "concurrency":
        base = r.get("baseline") or "?"
        base_row = next((c for c in r["configs"] if c["label"] == base), None)
        for c in r["configs"]:
            if c["label"] == base:
                continue
            failed = sum(c["failed_steps"].values())
            value = f"{fmt(c['steps_per_second'], 1)} steps/s, {c['max_in_flight']} in flight"
            if failed:
                error = str(c["first_error"]).split(": ", 1)[-1][:90]
                value += f" -- {failed} steps FAILED: {error}"
            out.append(["concurrency", c["label"], value,
                        f"{base}: {fmt(base_row['steps_per_second'], 1) if base_row else '—'} steps/s, "
                        f"{base_row['max_in_flight'] if base_row else '—'} in flight",
                        _x(c["ratio_steps_per_second"])])
    elif name == "recovery":
        s = r["settings"]
        for row in r["summary"]:
            out.append(["recovery", f"lease {row['lease_seconds']:g}s: kill -> commit (median / max of "
                                    f"{row['reps']})",
                        f"{fmt(row['total_median_s'], 1)} s / {fmt(row['total_max_s'], 1)} s",
                        f"Celery alone: visibility timeout {s['celery_default_visibility_timeout']} s (default) / "
                        f"{s['visibility_timeout']} s (TEAMSTER_VISIBILITY_TIMEOUT)",
                        f"{fmt(row['vs_celery_default'], 0)}x / {fmt(row['vs_teamster_vt'], 0)}x sooner"])
    elif name == "scaling":
        base = next((x for x in r["summary"] if x["workers"] == 1), r["summary"][0])
        for row in r["summary"]:
            if row is base:
                continue
            out.append(["scaling", f"{row['workers']} workers, steps/s", fmt(row["steps_per_second"], 1),
                        f"1 worker: {fmt(base['steps_per_second'], 1)}", _x(row["speedup"])])
    return out


def _rows(name: str, data: dict[str, Any] | None) -> list[list[str]]:
    return rows_for(name, data) if data is not None else []


def markdown(results: dict[str, dict[str, Any] | None], failed: dict[str, str]) -> str:
    """The summary table in markdown."""
    lines = ["| benchmark | measure | teamster | baseline (same run, same machine) | ratio |",
             "| --- | --- | --- | --- | --- |"]
    machine: dict[str, Any] | None = None
    for name in BENCHMARKS:
        if name in failed:
            lines.append(f"| {name} | {WHAT[name]} | FAILED: {failed[name]} | | |")
            continue
        data = results.get(name)
        if data is None:
            continue
        machine = machine or data.get("machine")
        for row in rows_for(name, data):
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    if machine:
        lines.append("")
        lines.append(f"Measured on {machine['cpu_count']} CPUs ({machine['platform']}), Python {machine['python']}, "
                     f"Celery {machine['celery']}, Redis {machine['redis_server']} (AOF on), "
                     f"{machine['timestamp']}, commit {machine['git_commit']}. Ratios compare numbers taken in the "
                     "same run; absolute numbers depend on the machine and what else runs on it.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.all",
        description=f"Run {', '.join(BENCHMARKS)} at their default sizes (each in its own process, about 37 "
                    "minutes in all on 2 cores), then write bench/results/summary.json and print a markdown summary "
                    "table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="Comma-separated benchmarks to run.")
    parser.add_argument("--redis-url", default=None, help="Passed to every benchmark (default: private Redis each).")
    parser.add_argument("--summarize-only", action="store_true",
                        help="Run nothing; summarise the existing bench/results/<name>.json files.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit code (0 when all ran)."""
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmarks: {sorted(unknown)} (known: {', '.join(BENCHMARKS)})")
    failed: dict[str, str] = {}
    durations: dict[str, float] = {}
    for name in names if not args.summarize_only else []:
        command = [sys.executable, "-m", f"bench.{name}"]
        if args.redis_url:
            command += ["--redis-url", args.redis_url]
        console.rule(f"bench.{name}: {WHAT[name]}")
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            return 130
        durations[name] = time.monotonic() - started
        if code != 0:
            failed[name] = f"exit code {code}"
            console.print(f"[bold red]bench.{name} failed (exit code {code}); continuing[/]")
    results: dict[str, dict[str, Any] | None] = {}
    for name in names:
        path = RESULTS_DIR / f"{name}.json"
        results[name] = json.loads(path.read_text()) if name not in failed and path.exists() else None
        if results[name] is None and name not in failed:
            failed[name] = f"no results file {path.relative_to(REPO_ROOT)}"
    table = markdown(results, failed)
    summary = {
        "benchmarks": {name: {"status": "failed" if name in failed else "ok", "error": failed.get(name),
                              "seconds": durations.get(name),
                              "results_file": str(Path("bench/results") / f"{name}.json"),
                              "rows": _rows(name, results.get(name))}
                       for name in names},
        "markdown": table,
    }
    console.rule("summary (markdown)")
    print(table)
    write_results("summary", summary)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
