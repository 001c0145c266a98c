"""HttpStats exports exactly what prometheus_client's Counter and Histogram would for the
same requests (the alert rules and dashboards read these samples); every metric of the
registry is in the monitoring guide's table."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from digitalme.metrics import _LATENCY_BUCKETS, HttpStats

REQUESTS = [
    ("GET", "/health", 200, 0.0003),
    ("GET", "/health", 200, 0.005),
    ("GET", "/health", 503, 0.2),
    ("POST", "/api/v1/conversations", 201, 0.011),
    ("POST", "/api/v1/conversations", 500, 61.0),
    ("GET", "unmatched", 404, 0.001),
]


def without_created_values(text: str) -> str:
    return re.sub(r"^(\S+_created\{.*\}) \S+$", r"\1 T", text, flags=re.M)


def test_samples_match_the_client_librarys() -> None:
    ours = CollectorRegistry()
    stats = HttpStats()
    ours.register(stats)
    theirs = CollectorRegistry()
    counter = Counter(
        "digitalme_http_requests_total",
        "HTTP requests answered.",
        ["method", "route", "status"],
        registry=theirs,
    )
    histogram = Histogram(
        "digitalme_http_request_duration_seconds",
        "Time to answer an HTTP request.",
        ["method", "route"],
        buckets=_LATENCY_BUCKETS,
        registry=theirs,
    )
    for method, route, status, seconds in REQUESTS:
        stats.observe(method, route, status, seconds)
        counter.labels(method, route, str(status)).inc()
        histogram.labels(method, route).observe(seconds)
    expected = without_created_values(generate_latest(theirs).decode())
    assert without_created_values(generate_latest(ours).decode()) == expected
    assert 'le="0.005",method="GET",route="/health"} 2.0' in expected  # a bound is inclusive


def test_every_metric_is_in_the_monitoring_guide() -> None:
    from digitalme.metrics import metrics_reference_markdown

    guide = (Path(__file__).resolve().parents[2] / "docs/operations/monitoring.md").read_text()
    table = metrics_reference_markdown()
    assert table.count("\n") > 20  # one row per metric: the registry was read
    # Regenerate with: .venv/bin/python -m digitalme.metrics
    assert table in guide, "docs/operations/monitoring.md's metrics table is out of date"


def test_every_textfile_metric_is_in_the_monitoring_guide() -> None:
    """The drills' and digitalme-deploy's metrics, as their own renderers write them."""
    from scripts.textfile_metrics import textfile_metrics_markdown

    guide = (Path(__file__).resolve().parents[2] / "docs/operations/monitoring.md").read_text()
    table = textfile_metrics_markdown()
    assert "digitalme_backup_drill_restored_rows{table}" in table
    assert "digitalme_deploys_total{result}" in table
    # Regenerate with: .venv/bin/python -m scripts.textfile_metrics
    assert table in guide, "docs/operations/monitoring.md's textfile metrics table is out of date"
