"""Every Prometheus metric the service exports, in one place.

Each app gets its own :class:`Metrics` (and registry), so tests can build many apps in one
process. Names carry the ``digitalme_`` prefix, units, and ``_total`` on counters.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # HTTP
        self.http_requests = Counter(
            "digitalme_http_requests_total", "HTTP requests answered.",
            ["method", "route", "status"], registry=registry)
        self.http_latency = Histogram(
            "digitalme_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["method", "route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.rate_limited = Counter(
            "digitalme_http_rate_limited_total", "Requests refused by the rate limit.",
            registry=registry)
        # Claude
        self.claude_calls = Counter(
            "digitalme_claude_calls_total", "Calls to Claude by outcome.",
            ["outcome"], registry=registry)
        self.claude_latency = Histogram(
            "digitalme_claude_call_duration_seconds", "Time of one Claude call.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.claude_errors = Counter(
            "digitalme_claude_errors_total", "Failed Claude calls by error type.",
            ["error"], registry=registry)
        self.claude_tokens = Counter(
            "digitalme_claude_tokens_total", "Tokens used, by kind.",
            ["kind"], registry=registry)
        self.claude_cost = Counter(
            "digitalme_claude_cost_usd_total", "Estimated Claude spend in US dollars.",
            registry=registry)
        self.breaker_state = Gauge(
            "digitalme_claude_breaker_state",
            "Circuit breaker in front of Claude: 0 closed, 1 half-open, 2 open.",
            registry=registry)
        self.breaker_opened = Counter(
            "digitalme_claude_breaker_opened_total", "Times the circuit breaker opened.",
            registry=registry)
        # Conversations
        self.chat_replies = Counter(
            "digitalme_chat_replies_total", "Replies stored, by channel.",
            ["channel"], registry=registry)
        # Channels: webhook deliveries, the inbox and its worker, outbound calls
        self.webhook_deliveries = Counter(
            "digitalme_webhook_deliveries_total",
            "Webhook deliveries by channel and outcome (accepted, duplicate, ignored, "
            "bad_signature, stale_timestamp, malformed, not_configured, too_large, ...).",
            ["channel", "outcome"], registry=registry)
        self.inbox_items = Gauge(
            "digitalme_inbox_items", "Deliveries in the inbox by channel and status "
            "(pending + processing is the queue depth).",
            ["channel", "status"], registry=registry)
        self.inbox_processed = Counter(
            "digitalme_inbox_processed_total",
            "Attempts at inbox items by channel and result (done, ignored, retry, "
            "deferred, failed).", ["channel", "result"], registry=registry)
        self.inbox_attempt_latency = Histogram(
            "digitalme_inbox_attempt_duration_seconds",
            "Time of one attempt at an inbox item (Claude and outbound calls included).",
            ["channel"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.inbox_completion_latency = Histogram(
            "digitalme_inbox_completion_seconds",
            "Time from a delivery's acknowledgement to its completion (retries included).",
            ["channel"], buckets=(*_LATENCY_BUCKETS, 300, 900, 3600, 21600, 86400),
            registry=registry)
        self.outbound_requests = Counter(
            "digitalme_outbound_requests_total",
            "Outbound calls (retries included) to a platform.", ["service"], registry=registry)
        self.outbound_errors = Counter(
            "digitalme_outbound_errors_total",
            "Failed outbound calls by platform and kind (rate_limited, server_error, "
            "network, permanent).", ["service", "kind"], registry=registry)
        # Database
        self.db_size = Gauge(
            "digitalme_database_size_bytes", "Size of the SQLite database and its WAL.",
            registry=registry)
        # Backups (Litestream's control socket; the restore drill publishes its own
        # digitalme_backup_drill_* metrics through node-exporter's textfile collector)
        self.backup_litestream_up = Gauge(
            "digitalme_backup_litestream_up",
            "1 when Litestream answers on its control socket for the database, else 0.",
            registry=registry)
        self.backup_replication_lag = Gauge(
            "digitalme_backup_replication_lag_seconds",
            "Seconds since Litestream last completed a sync to the replica (NaN when it "
            "does not answer): the most a crash of this host would lose.",
            registry=registry)
        self.backup_replication_lag.set(math.nan)  # unknown until Litestream is asked
        self.build_info = Gauge(
            "digitalme_build_info", "Version and commit of the running service.",
            ["version", "commit", "environment"], registry=registry)
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def on_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Register a coroutine that updates gauges just before each scrape."""
        self._refreshers.append(refresh)

    async def render(self) -> bytes:
        for refresh in self._refreshers:
            await refresh()
        return generate_latest(self.registry)
