"""Prometheus metrics of teamster (prometheus-client), served by workers on ``TEAMSTER_METRICS_PORT``.

Counters and histograms are updated where things happen (engine, watchdog); the run-status and dead-letter
gauges are read from Redis at scrape time by :class:`StoreCollector`, so they are right whichever worker
is scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from teamster.orchestrator.store import RunStore

__all__ = [
    "STEPS",
    "STEP_SECONDS",
    "MODEL_SECONDS",
    "TOKENS",
    "RETRIES",
    "RUNS_FINISHED",
    "LEASE_EXPIRIES",
    "DEAD_LETTERS",
    "COMMITS_REJECTED",
    "LEASES_ABANDONED",
    "PROVIDER_WAITS",
    "PROVIDER_WAIT_SECONDS",
    "PROVIDER_COOLDOWNS",
    "RUN_BUDGET_BREACHES",
    "SPEND_TOKENS",
    "SPEND_COST",
    "STORE_DATA_LOST",
    "POISON_MESSAGES",
    "TOOLS_ABANDONED",
    "CHILD_RUNS",
    "StoreCollector",
    "serve_metrics",
]

log = logging.getLogger(__name__)

STEPS = Counter("teamster_steps_total", "Step executions by final outcome of the attempt",
                ["workflow", "step", "outcome"])
STEP_SECONDS = Histogram("teamster_step_duration_seconds", "Wall-clock duration of step attempts",
                         ["workflow", "step"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
MODEL_SECONDS = Histogram("teamster_model_call_duration_seconds", "Latency of model calls", ["agent"],
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
TOKENS = Counter("teamster_tokens_total", "Model tokens used", ["agent", "kind"])
RETRIES = Counter("teamster_retries_total", "Step retries scheduled", ["workflow", "step", "error_type"])
RUNS_FINISHED = Counter("teamster_runs_finished_total", "Runs reaching a final or waiting status",
                        ["workflow", "status"])
LEASE_EXPIRIES = Counter("teamster_lease_expiries_total", "Step leases that expired (worker died or hung)")
DEAD_LETTERS = Counter("teamster_dead_letters_total", "Dead-letter entries created", ["workflow", "error_type"])
TOOLS_ABANDONED = Counter("teamster_tools_abandoned_total",
                          "Blocking tool calls left running when their step's deadline passed (result discarded)",
                          ["agent", "tool"])
POISON_MESSAGES = Counter("teamster_poison_messages_total",
                          "Messages on teamster's queues that could not be decoded or run (dropped, logged, answered)",
                          ["queue", "reason"])
STORE_DATA_LOST = Counter("teamster_store_data_lost_total",
                          "Times the watchdog found that Redis lost teamster's data (its epoch mark vanished)")
PROVIDER_WAITS = Counter("teamster_provider_waits_total", "Model calls that waited for provider capacity",
                         ["model", "reason"])
PROVIDER_WAIT_SECONDS = Histogram("teamster_provider_wait_seconds", "How long model calls waited for capacity",
                                  ["model"], buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
PROVIDER_COOLDOWNS = Counter("teamster_provider_cooldowns_total",
                             "429/529 answers that made every worker back off a provider", ["model"])
RUN_BUDGET_BREACHES = Counter("teamster_run_budget_breaches_total", "Steps ended because their run's budget was spent",
                              ["workflow", "budget"])
SPEND_TOKENS = Counter("teamster_spend_tokens_total", "Tokens spent by live model calls", ["workflow", "model"])
SPEND_COST = Counter("teamster_spend_cost_total", "Cost of live model calls (TEAMSTER_MODEL_PRICES)",
                     ["workflow", "model"])
LEASES_ABANDONED = Counter("teamster_leases_abandoned_total",
                           "Leases no longer renewed because their step ran past its deadline plus grace")
CHILD_RUNS = Counter("teamster_child_runs_total",
                     "Child runs started by child steps, and how they ended for their parent step (event: started, or "
                     "the child's status when the parent step read it)", ["workflow", "child_workflow", "event"])
LOOP_LAG = Gauge("teamster_worker_loop_lag_seconds",
                 "How late a timer fires on this worker process's agent loop (averaged): how far behind it is")
ADMISSION_LIMIT = Gauge("teamster_worker_step_limit",
                        "Steps this worker process runs at once, adapted to its loop's lag (worker_max_loop_lag)")
ADMISSION_WAIT_SECONDS = Counter("teamster_worker_admission_wait_seconds_total",
                                 "Seconds steps waited for a slot of this worker process before they were claimed")
COMMITS_REJECTED = Counter("teamster_commits_rejected_total", "Commits rejected (stale fencing token)")


class StoreCollector(Collector):
    """Gauges read from Redis at scrape time: runs by status (recent), open dead-letter entries, steps in flight,
    child steps parked."""

    def __init__(self, store: RunStore, sample: int = 1000) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.sample = sample

    def collect(self) -> Iterator[GaugeMetricFamily]:
        dlq = GaugeMetricFamily("teamster_dlq_depth", "Open dead-letter entries")
        inflight = GaugeMetricFamily("teamster_steps_in_flight", "Steps queued, running or waiting to retry")
        parked = GaugeMetricFamily("teamster_steps_parked", "Child steps parked until their child run settles")
        runs = GaugeMetricFamily("teamster_runs", "Runs by status among the most recent runs", labels=["status"])
        try:
            dlq.add_metric([], float(self.client.zcard(self.keys.dlq_open)))  # type: ignore[arg-type]
            inflight.add_metric([], float(self.client.zcard(self.keys.inflight)))  # type: ignore[arg-type]
            parked.add_metric([], float(self.client.zcard(self.keys.parked)))  # type: ignore[arg-type]
            ids = self.client.zrevrange(self.keys.runs, 0, self.sample - 1)
            counts: dict[str, int] = {}
            for status in self.store.run_statuses(ids).values():  # type: ignore[arg-type]
                if status is not None:
                    counts[status.value] = counts.get(status.value, 0) + 1
            for name, count in sorted(counts.items()):
                runs.add_metric([name], float(count))
        except redis.RedisError as exc:
            log.warning("metrics: cannot read Redis: %s", exc)
        yield dlq
        yield inflight
        yield parked
        yield runs


def serve_metrics(port: int, store: RunStore, registry: CollectorRegistry = REGISTRY) -> Any:
    """Start the Prometheus HTTP endpoint on ``port`` (0 picks a free one) with the store gauges."""
    registry.register(StoreCollector(store))
    server, _thread = start_http_server(port, registry=registry)
    log.info("teamster metrics on :%s/metrics", server.server_port)
    return server
