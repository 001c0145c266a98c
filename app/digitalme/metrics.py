"""Every Prometheus metric the service exports, in one place.

Each app gets its own :class:`Metrics` (and registry), so tests can build many apps in one
process. Names carry the ``digitalme_`` prefix, units, and ``_total`` on counters.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class HttpStats(Collector):
    """``digitalme_http_requests_total`` and ``digitalme_http_request_duration_seconds``:
    the two metrics every request updates, kept as plain numbers and turned into
    Prometheus samples only when scraped.

    The client library's ``labels(...).inc()`` and ``.observe()`` take a lock and check
    their labels on every call, several microseconds a request; here a request costs a dict
    lookup, a bisect and three additions. Only the event loop's thread records or collects
    (``/metrics`` renders on the loop), so nothing needs a lock. The samples are those the
    library would export: counters with ``_created``, cumulative buckets, ``_count``, ``_sum``.
    """

    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        # (method, route, status) -> [count, created]
        self._requests: dict[tuple[str, str, int], list[float]] = {}
        # (method, route) -> [per-bucket counts..., +Inf count, sum, created]
        self._latency: dict[tuple[str, str], list[float]] = {}
        self.answered = 0  # all requests, for the inbox worker's back-off

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.answered += 1
        counted = self._requests.get((method, route, status))
        if counted is None:
            counted = self._requests[(method, route, status)] = [0, time.time()]
        counted[0] += 1
        timed = self._latency.get((method, route))
        if timed is None:
            timed = self._latency[(method, route)] = [0.0] * (len(self.buckets) + 2) + [time.time()]
        timed[bisect.bisect_left(self.buckets, seconds)] += 1
        timed[-2] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "digitalme_http_requests_total",
            "HTTP requests answered.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), (count, created) in self._requests.items():
            requests.add_metric([method, route, str(status)], count, created=created)
        yield requests
        latency = HistogramMetricFamily(
            "digitalme_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            labels=["method", "route"],
        )
        bounds = [*(_bound(b) for b in self.buckets), "+Inf"]
        for (method, route), timed in self._latency.items():
            cumulative, total = [], 0.0
            for bound, count in zip(bounds, timed[: len(bounds)], strict=True):
                total += count
                cumulative.append((bound, total))
            latency.add_metric([method, route], cumulative, sum_value=timed[-2])
            # The library's histograms carry _created like its counters.
            latency.samples.append(
                Sample(
                    "digitalme_http_request_duration_seconds_created",
                    {"method": method, "route": route},
                    timed[-1],
                    None,
                    None,
                )
            )
        yield latency


def _bound(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{float(value)}"


class Metrics:
    def __init__(self, *, litestream: bool = False) -> None:
        """``litestream``: this process's SQLite database is replicated by Litestream
        (DIGITALME_LITESTREAM_SOCKET): only then are the ``digitalme_backup_*`` gauges
        exported. Otherwise they would claim a replication that nobody set up (an app host
        on PostgreSQL) is down."""
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # HTTP
        self.http = HttpStats()
        registry.register(self.http)
        self.rate_limited = Counter(
            "digitalme_http_rate_limited_total",
            "Requests refused by the rate limit.",
            registry=registry,
        )
        # Claude
        self.claude_calls = Counter(
            "digitalme_claude_calls_total",
            "Calls to Claude by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.claude_latency = Histogram(
            "digitalme_claude_call_duration_seconds",
            "Time of one Claude call.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.claude_errors = Counter(
            "digitalme_claude_errors_total",
            "Failed Claude calls by error type.",
            ["error"],
            registry=registry,
        )
        self.claude_tokens = Counter(
            "digitalme_claude_tokens_total", "Tokens used, by kind.", ["kind"], registry=registry
        )
        self.claude_cost = Counter(
            "digitalme_claude_cost_usd_total",
            "Estimated Claude spend in US dollars.",
            registry=registry,
        )
        self.breaker_state = Gauge(
            "digitalme_claude_breaker_state",
            "Circuit breaker in front of Claude: 0 closed, 1 half-open, 2 open.",
            registry=registry,
        )
        self.breaker_opened = Counter(
            "digitalme_claude_breaker_opened_total",
            "Times the circuit breaker opened.",
            registry=registry,
        )
        # Conversations
        self.chat_replies = Counter(
            "digitalme_chat_replies_total",
            "Replies stored, by channel.",
            ["channel"],
            registry=registry,
        )
        # Channels: webhook deliveries, the inbox and its worker, outbound calls
        self.webhook_deliveries = Counter(
            "digitalme_webhook_deliveries_total",
            "Webhook deliveries by channel and outcome (accepted, duplicate, ignored, "
            "bad_signature, stale_timestamp, malformed, not_configured, too_large, ...).",
            ["channel", "outcome"],
            registry=registry,
        )
        self.inbox_items = Gauge(
            "digitalme_inbox_items",
            "Deliveries in the inbox by channel and status "
            "(pending + processing is the queue depth).",
            ["channel", "status"],
            registry=registry,
        )
        self.inbox_processed = Counter(
            "digitalme_inbox_processed_total",
            "Attempts at inbox items by channel and result (done, ignored, retry, "
            "deferred, failed, taken_over: another worker took the item back from this one).",
            ["channel", "result"],
            registry=registry,
        )
        self.inbox_worker_slots = Gauge(
            "digitalme_inbox_worker_slots",
            "Inbox items the worker lets run at once now: DIGITALME_WORKER_CONCURRENCY, "
            "fewer while requests keep the event loop busy.",
            registry=registry,
        )
        self.inbox_attempt_latency = Histogram(
            "digitalme_inbox_attempt_duration_seconds",
            "Time of one attempt at an inbox item (Claude and outbound calls included).",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inbox_completion_latency = Histogram(
            "digitalme_inbox_completion_seconds",
            "Time from a delivery's acknowledgement to its completion (retries included).",
            ["channel"],
            buckets=(*_LATENCY_BUCKETS, 300, 900, 3600, 21600, 86400),
            registry=registry,
        )
        self.outbound_requests = Counter(
            "digitalme_outbound_requests_total",
            "Outbound calls (retries included) to a platform.",
            ["service"],
            registry=registry,
        )
        self.outbound_reconciled = Counter(
            "digitalme_outbound_reconciled_total",
            "Sends that may have arrived already (a crash or a timeout before the answer), "
            "by platform and what asking it found: found (not sent again), not_found (sent), "
            "unknowable (sent again: the platform gives no way to know; it may show twice).",
            ["service", "result"],
            registry=registry,
        )
        self.outbound_errors = Counter(
            "digitalme_outbound_errors_total",
            "Failed outbound calls by platform and kind (rate_limited, server_error, "
            "network, permanent).",
            ["service", "kind"],
            registry=registry,
        )
        # Database
        self.db_size = Gauge(
            "digitalme_database_size_bytes",
            "Size of the database: the SQLite file and its WAL, or pg_database_size.",
            registry=registry,
        )
        self.retention_deleted = Counter(
            "digitalme_retention_deleted_rows_total",
            "Rows the retention prune deleted, by table (inbox, activity).",
            ["table"],
            registry=registry,
        )
        self.retention_last_run = Gauge(
            "digitalme_retention_last_run_timestamp_seconds",
            "When the retention prune last completed a run (unix time; 0: not yet).",
            registry=registry,
        )
        # Backups (Litestream's control socket; the restore drill publishes its own
        # digitalme_backup_drill_* metrics through node-exporter's textfile collector)
        replication = registry if litestream else None
        self.backup_litestream_up = Gauge(
            "digitalme_backup_litestream_up",
            "1 when Litestream answers on its control socket for the database, else 0 "
            "(exported only with DIGITALME_LITESTREAM_SOCKET).",
            registry=replication,
        )
        self.backup_replication_lag = Gauge(
            "digitalme_backup_replication_lag_seconds",
            "Seconds since Litestream last completed a sync to the replica (NaN when it "
            "does not answer): the most a crash of this host would lose (exported only with "
            "DIGITALME_LITESTREAM_SOCKET).",
            registry=replication,
        )
        self.backup_replication_lag.set(math.nan)  # unknown until Litestream is asked
        self.build_info = Gauge(
            "digitalme_build_info",
            "Version and commit of the running service.",
            ["version", "commit", "environment"],
            registry=registry,
        )
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        self._webhook_children: dict[tuple[str, str], Any] = {}

    def webhook_delivery(self, channel: str, outcome: str) -> None:
        """Count a delivery: the labelled child is looked up once per (channel, outcome)
        (``labels()`` takes a lock and checks its arguments on every call)."""
        child = self._webhook_children.get((channel, outcome))
        if child is None:
            child = self._webhook_children[(channel, outcome)] = self.webhook_deliveries.labels(
                channel, outcome
            )
        child.inc()

    def on_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Register a coroutine that updates gauges just before each scrape."""
        self._refreshers.append(refresh)

    async def render(self) -> bytes:
        for refresh in self._refreshers:
            await refresh()
        return generate_latest(self.registry)


def metrics_reference_markdown() -> str:
    """The table of every metric the service exports, as docs/operations/monitoring.md
    carries it (``python -m digitalme.metrics`` prints it): name, type and help, from the
    registry itself, so a new metric cannot go undocumented."""
    lines = ["| Metric | Type | Meaning |", "| --- | --- | --- |"]
    for family in Metrics(litestream=True).registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        lines.append(f"| `{name}` | {family.type} | {family.documentation} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(metrics_reference_markdown(), end="")
