"""bench/http_bench.py still runs: tiny counts, no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.process import REPO, base_env


def test_http_bench_runs_with_tiny_counts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.http_bench", "--client", "aiohttp", "--requests", "150",
         "--duration", "5", "--concurrency", "4", "--turns", "12", "--turn-concurrency", "1",
         "--json"],
        cwd=REPO, env=base_env(tmp_path / "home"), capture_output=True, text=True,
        timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:2] == ["count", "errors"]
    figures = json.loads(lines[-1])
    assert figures["client"] == "aiohttp"
    assert figures["hello"]["requests"] == figures["digitalme"]["requests"] == 150
    assert figures["chat"]["requests"] == 12
    for phase in ("hello", "digitalme", "chat"):
        assert figures[phase]["errors"] == 0, figures[phase]
        assert figures[phase]["per_second"] > 0
        assert 0 < figures[phase]["p50_ms"] <= figures[phase]["p99_ms"]
    assert figures["ratio"] > 0
    assert figures["service_log_errors"] == 0
    assert "GET /health: DigitalMe serves" in result.stdout
