"""The benches (bench/) still run: tiny counts, no timing asserted, every answer checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.process import REPO, base_env


def run_bench(tmp_path: Path, module: str, *args: str) -> tuple[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=base_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return result.stdout, figures


def test_http_bench_runs_with_tiny_counts(tmp_path: Path) -> None:
    out, figures = run_bench(
        tmp_path,
        "bench.http_bench",
        "--client",
        "aiohttp",
        "--requests",
        "150",
        "--duration",
        "5",
        "--concurrency",
        "4",
        "--turns",
        "12",
        "--turn-concurrency",
        "1",
        "--history",
        "2",
        "--json",
    )
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["count", "errors"]
    assert figures["client"] == "aiohttp"
    assert figures["hello"]["requests"] == figures["digitalme"]["requests"] == 150
    assert figures["messages"]["requests"] == 150
    assert figures["chat"]["requests"] == figures["chat_reference"]["requests"] == 12
    for phase in ("hello", "digitalme", "messages", "chat_reference", "chat"):
        assert figures[phase]["errors"] == 0, figures[phase]
        assert figures[phase]["per_second"] > 0
        assert 0 < figures[phase]["p50_ms"] <= figures[phase]["p99_ms"]
    assert set(figures["ratios"]) == {"health", "messages", "chat"}
    assert all(ratio > 0 for ratio in figures["ratios"].values())
    assert figures["service_log_errors"] == 0
    assert "GET /health: DigitalMe serves" in out
    assert "chat turns: DigitalMe" in out


def test_webhook_bench_runs_with_tiny_counts(tmp_path: Path) -> None:
    _, figures = run_bench(
        tmp_path,
        "bench.webhook_bench",
        "--duration",
        "0.5",
        "--concurrency",
        "4",
        "--rate",
        "50",
        "--rate-duration",
        "1",
        "--burst",
        "60",
        "--drain-timeout",
        "60",
        "--json",
    )
    phases = {p["phase"]: p for p in figures["phases"]}
    assert len(phases) == 7
    assert all(p["errors"] == 0 and p["requests"] > 0 for p in phases.values()), phases
    assert phases["burst of 60 (acks)"]["requests"] == 60
    assert set(figures["ack_ratio_vs_reference"]) == {"telegram", "github"}
    # Every delivery was answered exactly once, and the burst was drained.
    replies = figures["replies"]
    assert replies["deliveries"] == replies["answered"] > 60
    assert replies["missing"] == replies["answered_twice"] == 0
    assert figures["drain"]["deliveries"] == 60 and figures["drain"]["per_second"] > 0
    assert set(figures["drain"]["inbox_after"]) <= {"done", "ignored"}
    assert figures["service_log_errors"] == 0


def test_memory_bench_runs_with_tiny_counts(tmp_path: Path) -> None:
    _, figures = run_bench(
        tmp_path,
        "bench.memory_bench",
        "--rounds",
        "2",
        "--requests",
        "40",
        "--turns",
        "6",
        "--conversations",
        "2",
        "--deliveries",
        "20",
        "--timeout",
        "60",
        "--json",
    )
    assert [r["round"] for r in figures["rounds"]] == [1, 2]
    for r in figures["rounds"]:
        assert (r["requests"], r["turns"], r["deliveries"], r["errors"]) == (40, 6, 20, 0)
        assert r["rss_mb"] > 10
    assert figures["missing_replies"] == figures["double_replies"] == 0
    assert figures["service_log_errors"] == 0


def test_retention_bench_runs_with_tiny_counts(tmp_path: Path) -> None:
    _, figures = run_bench(
        tmp_path,
        "bench.retention_bench",
        "--duration",
        "6",
        "--rate",
        "20",
        "--retention",
        "2",
        "--interval",
        "1",
        "--backlog",
        "2000",
        "--backlog-interval",
        "1",
        "--json",
    )
    off, on = figures["steady"]
    assert (off["phase"], on["phase"]) == ("retention off", "retention on")
    for phase in (off, on):
        assert phase["errors"] == 0 and phase["deliveries"] == phase["acks"]["count"] == 120
    # Without retention every delivery stays; with it, the old ones went, messages stayed.
    assert off["rows_pruned"] == 0 and off["final"]["inbox_rows"] == 120
    assert on["rows_pruned"] > 0 and on["final"]["inbox_rows"] < 120
    assert on["final"]["messages_rows"] == off["final"]["messages_rows"] > 0
    backlog = figures["backlog"]
    assert backlog["prune"]["deliveries"] == 2000 and backlog["prune"]["batches"] >= 10
    assert backlog["errors"] == 0
    assert figures["telegram"]["acknowledged"] == figures["telegram"]["answered"] > 0
    assert figures["telegram"]["answered_twice"] == 0
