"""Webhook acknowledgements per second and their p99 latency, beside ``GET /health`` on the
same service in the same run, on 127.0.0.1.

The real service runs as ``digitalme serve`` (a subprocess) with the Telegram and GitHub
channels on. Claude is the Anthropic stand-in (a subprocess, answering after
``--claude-delay`` seconds) and Telegram's Bot API a stand-in in this process, so the
background worker really processes deliveries (Claude, sendMessage, SQLite) while the
acknowledgements are measured: that is the point, acks must not wait for it.

Phases, each closed-loop with ``--concurrency`` clients for ``--duration`` seconds (and at
most ``--max-requests`` requests):

1. ``GET /health``: the floor (no body, no database);
2. ``POST /webhooks/telegram``: secret header, JSON parse, one durable SQLite insert
   (``synchronous=FULL``), wake the worker, 200 — each update a new ``update_id``;
3. ``POST /webhooks/github``: the same with an HMAC-SHA256 check of the body (gidgethub),
   issue_comment events (recorded as activity by the worker).

Run from the repository root:

    .venv/bin/python -m bench.webhook_bench [--duration 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO))

from tests.standins.platform import running  # noqa: E402
from tests.standins.telegram_api import TelegramStandin  # noqa: E402
from tests.support.process import (  # noqa: E402
    SAMPLE_PERSONA,
    ServiceProcess,
    StandinProcess,
    run_cli,
    service_env,
)

TELEGRAM_TOKEN = "123456:BENCH-token"
TELEGRAM_SECRET = "bench-secret-token"
GITHUB_SECRET = "bench-github-secret"


@dataclass
class Phase:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0

    def summary(self) -> dict[str, object]:
        return {"phase": self.name, "requests": len(self.latencies_ms),
                "errors": self.errors, "seconds": round(self.seconds, 2),
                "per_second": round(self.per_second, 1),
                "p50_ms": round(statistics.median(self.latencies_ms), 2)
                if self.latencies_ms else None,
                "p99_ms": round(self.quantile(0.99), 2),
                "max_ms": round(max(self.latencies_ms), 2) if self.latencies_ms else None}


RequestFactory = Callable[[int], tuple[str, str, dict[str, str], bytes | None]]


async def run_phase(name: str, http: aiohttp.ClientSession, base_url: str,
                    make: RequestFactory, *, concurrency: int, duration: float,
                    max_requests: int, expect: int) -> Phase:
    phase = Phase(name)
    counter = itertools.count()
    deadline = time.monotonic() + duration

    async def client() -> None:
        while time.monotonic() < deadline:
            n = next(counter)
            if n >= max_requests:
                return
            method, path, headers, body = make(n)
            started = time.perf_counter()
            try:
                async with http.request(method, base_url + path, headers=headers,
                                        data=body) as response:
                    await response.read()
                    ok = response.status == expect
            except aiohttp.ClientError:
                ok = False
            elapsed = (time.perf_counter() - started) * 1000
            if ok:
                phase.latencies_ms.append(elapsed)
            else:
                phase.errors += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    phase.seconds = time.monotonic() - started
    return phase


def health(_n: int) -> tuple[str, str, dict[str, str], bytes | None]:
    return "GET", "/health", {}, None


def telegram_update(n: int) -> tuple[str, str, dict[str, str], bytes | None]:
    update = {"update_id": 10_000_000 + n, "message": {
        "message_id": n, "date": int(time.time()), "text": f"bench message {n}",
        "from": {"id": 1000 + n % 50, "is_bot": False, "first_name": "Bench"},
        "chat": {"id": 1000 + n % 50, "type": "private"}}}
    return "POST", "/webhooks/telegram", {
        "Content-Type": "application/json",
        "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET}, json.dumps(update).encode()


def github_comment(n: int) -> tuple[str, str, dict[str, str], bytes | None]:
    payload = {"action": "created",
               "issue": {"number": n % 100, "title": "Bench issue", "user": {"login": "a"}},
               "comment": {"id": n, "body": f"bench comment {n}", "user": {"login": "a"},
                           "created_at": "2026-11-01T10:00:00Z"},
               "repository": {"name": "bench", "full_name": "acme/bench",
                              "owner": {"login": "acme"}},
               "sender": {"login": "a"}}
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return "POST", "/webhooks/github", {
        "Content-Type": "application/json", "X-GitHub-Event": "issue_comment",
        "X-GitHub-Delivery": f"bench-{n}", "X-Hub-Signature-256": signature}, body


async def bench(args: argparse.Namespace) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="digitalme-webhook-bench-"))
    claude = StandinProcess(workdir / "claude", delay=args.claude_delay).start()
    try:
        async with running(TelegramStandin(TELEGRAM_TOKEN)) as telegram:
            env = service_env(
                workdir, anthropic_base_url=claude.base_url,
                DIGITALME_LOG_LEVEL="warning",
                DIGITALME_TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
                DIGITALME_TELEGRAM_SECRET_TOKEN=TELEGRAM_SECRET,
                DIGITALME_TELEGRAM_API_BASE=telegram.base_url,
                DIGITALME_GITHUB_WEBHOOK_SECRET=GITHUB_SECRET)
            for args in (["migrate"], ["persona", "import", str(SAMPLE_PERSONA)]):
                prepared = run_cli(args, env)
                if prepared.returncode != 0:
                    raise SystemExit(f"digitalme {' '.join(args)} failed: {prepared.stderr}")
            service = ServiceProcess(env, workdir)
            await service.start_async()
            try:
                phases = []
                connector = aiohttp.TCPConnector(limit=args.concurrency)
                async with aiohttp.ClientSession(connector=connector) as http:
                    await run_phase("warmup", http, service.base_url, health,
                                    concurrency=4, duration=0.5, max_requests=200, expect=200)
                    plan: list[tuple[str, RequestFactory, int]] = [
                        ("GET /health", health, 200),
                        ("POST /webhooks/telegram", telegram_update, 200),
                        ("POST /webhooks/github", github_comment, 202)]
                    for name, make, expect in plan:
                        phases.append(await run_phase(
                            name, http, service.base_url, make,
                            concurrency=args.concurrency, duration=args.duration,
                            max_requests=args.max_requests, expect=expect))
                    ready = await (await http.get(service.base_url + "/health/ready")).json()
                await asyncio.sleep(0.5)
                with sqlite3.connect(service.db_path) as conn:
                    inbox = dict(conn.execute(
                        "SELECT status, COUNT(*) FROM inbox GROUP BY status").fetchall())
            finally:
                await service.stop_async()
            sent = len(telegram.sent)
    finally:
        claude.stop()
    health_phase, telegram_phase, github_phase = phases
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "settings": vars(args),
        "phases": [p.summary() for p in phases],
        "ratios_vs_health": {
            "telegram_per_second": round(telegram_phase.per_second
                                         / health_phase.per_second, 3),
            "github_per_second": round(github_phase.per_second / health_phase.per_second, 3),
            "telegram_p99": round(telegram_phase.quantile(0.99)
                                  / health_phase.quantile(0.99), 2),
            "github_p99": round(github_phase.quantile(0.99) / health_phase.quantile(0.99), 2),
        },
        "worker_during_run": {"inbox_by_status": inbox, "telegram_replies_sent": sent,
                              "inbox_check": ready.get("checks", {}).get("inbox")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument("--max-requests", type=int, default=50_000,
                        help="upper bound of requests per phase")
    parser.add_argument("--claude-delay", type=float, default=0.2,
                        help="seconds the Claude stand-in takes per answer")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'phase':<26} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'errors':>6}")
    for p in result["phases"]:  # type: ignore[attr-defined]
        print(f"{p['phase']:<26} {p['per_second']:>9} {p['p50_ms']:>8} {p['p99_ms']:>8} "
              f"{p['max_ms']:>8} {p['errors']:>6}")
    print("ratios vs GET /health:", json.dumps(result["ratios_vs_health"]))
    print("worker during the run:", json.dumps(result["worker_during_run"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
