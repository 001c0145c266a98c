"""Webhook acknowledgements beside a minimal reference, their latency at a steady rate, and
how fast the background worker answers a burst, in one run on 127.0.0.1.

The real service runs as ``digitalme serve`` (a subprocess) with the Telegram and GitHub
channels on, production settings otherwise (access log at info, the rate limit on with a
limit the load never reaches). Claude is the Anthropic stand-in (a subprocess, answering
after ``--claude-delay`` seconds, instant by default) and Telegram's Bot API a stand-in in
a process of its own (bench/telegram_process.py), so the worker really answers every
delivery (Claude, SQLite, sendMessage) while acknowledgements are measured: acks must not
wait for it.

Phases:

1. ``GET /health`` on the service: the floor of a request;
2. ``POST /webhooks/telegram`` (secret header) and ``POST /webhooks/github`` (HMAC of the
   body), closed loop with ``--concurrency`` clients for ``--duration`` seconds each, on the
   reference (bench/webhook_reference.py: verify, insert the raw delivery, commit, with the
   same SQLite settings) and on the service: acks per second and their **ratio**;
3. Telegram deliveries at a steady ``--rate`` per second (open loop: each request is sent
   at its time whatever the previous ones do, latency counted from that time) for
   ``--rate-duration`` seconds: p50/p99/max ack latency;
4. a burst of ``--burst`` Telegram deliveries (100 chats) sent as fast as the service
   acknowledges them, then the time until every one is answered: the worker's **drain
   rate** (deliveries answered per second, from the burst's first request to the last
   answer). Every delivery of the run must be answered exactly once: a missing or a
   second reply is an error.

Run from the repository root:

    .venv/bin/python -m bench.webhook_bench [--duration 5] [--burst 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO))

from tests.support.process import (  # noqa: E402
    SAMPLE_PERSONA,
    ProcessFailed,
    ServiceProcess,
    StandinProcess,
    die_with_parent,
    free_port,
    run_cli,
    service_env,
)

TELEGRAM_TOKEN = "123456:BENCH-token"
TELEGRAM_SECRET = "bench-secret-token"
GITHUB_SECRET = "bench-github-secret"
CHATS = 100


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
        return {
            "phase": self.name,
            "requests": len(self.latencies_ms),
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "per_second": round(self.per_second, 1),
            "p50_ms": round(statistics.median(self.latencies_ms), 2) if self.latencies_ms else None,
            "p99_ms": round(self.quantile(0.99), 2),
            "max_ms": round(max(self.latencies_ms), 2) if self.latencies_ms else None,
        }


Request = tuple[str, str, dict[str, str], bytes | None]
RequestFactory = Callable[[int], Request]


async def send(http: aiohttp.ClientSession, base_url: str, request: Request, expect: int) -> bool:
    method, path, headers, body = request
    try:
        async with http.request(method, base_url + path, headers=headers, data=body) as response:
            await response.read()
            return response.status == expect
    except aiohttp.ClientError:
        return False


async def closed_loop(
    name: str,
    http: aiohttp.ClientSession,
    base_url: str,
    make: RequestFactory,
    numbers: collections.abc.Iterator[int],
    *,
    concurrency: int,
    duration: float,
    max_requests: int,
    expect: int,
) -> Phase:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    phase = Phase(name)
    deadline = time.monotonic() + duration
    sent = 0

    async def client() -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            request = make(next(numbers))
            started = time.perf_counter()
            ok = await send(http, base_url, request, expect)
            if ok:
                phase.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                phase.errors += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    phase.seconds = time.monotonic() - started
    return phase


async def open_loop(
    name: str,
    http: aiohttp.ClientSession,
    base_url: str,
    make: RequestFactory,
    numbers: collections.abc.Iterator[int],
    *,
    rate: float,
    duration: float,
    expect: int,
) -> Phase:
    """One request every 1/rate seconds, each at its time whatever the others do; its
    latency counts from that time (a server that falls behind is not let off)."""
    phase = Phase(name)
    count = max(1, int(rate * duration))
    begin = time.perf_counter() + 0.05

    async def one(due: float, request: Request) -> None:
        ok = await send(http, base_url, request, expect)
        if ok:
            phase.latencies_ms.append((time.perf_counter() - due) * 1000)
        else:
            phase.errors += 1

    tasks = []
    for i in range(count):
        due = begin + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due, make(next(numbers)))))
    await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - begin
    return phase


# --- deliveries ------------------------------------------------------------------------------


def health(_n: int) -> Request:
    return "GET", "/health", {}, None


def telegram_update(n: int) -> Request:
    update = {
        "update_id": n,
        "message": {
            "message_id": n,
            "date": int(time.time()),
            "text": f"bench message {n}",
            "from": {"id": 1000 + n % CHATS, "is_bot": False, "first_name": "Bench"},
            "chat": {"id": 1000 + n % CHATS, "type": "private"},
        },
    }
    return (
        "POST",
        "/webhooks/telegram",
        {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET},
        json.dumps(update).encode(),
    )


def github_comment(n: int) -> Request:
    payload = {
        "action": "created",
        "issue": {"number": n % 100, "title": "Bench issue", "user": {"login": "a"}},
        "comment": {
            "id": n,
            "body": f"bench comment {n}",
            "user": {"login": "a"},
            "created_at": "2026-11-01T10:00:00Z",
        },
        "repository": {"name": "bench", "full_name": "acme/bench", "owner": {"login": "acme"}},
        "sender": {"login": "a"},
    }
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return (
        "POST",
        "/webhooks/github",
        {
            "Content-Type": "application/json",
            "X-GitHub-Event": "issue_comment",
            "X-GitHub-Delivery": f"bench-{n}",
            "X-Hub-Signature-256": signature,
        },
        body,
    )


# --- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    log_path = workdir / "reference.log"
    env = {
        **os.environ,
        "BENCH_TELEGRAM_SECRET": TELEGRAM_SECRET,
        "BENCH_GITHUB_SECRET": GITHUB_SECRET,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.webhook_reference",
                "--port",
                str(port),
                "--db",
                str(workdir / "reference.db"),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise ProcessFailed(f"reference server exited: {log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                raise ProcessFailed("reference server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class TelegramProcess:
    """bench/telegram_process.py: the Bot API stand-in in a process of its own."""

    def __init__(self, workdir: Path) -> None:
        self.report = workdir / "telegram-replies.json"
        self.log = workdir / "telegram.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self) -> TelegramProcess:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.telegram_process",
                    "--token",
                    TELEGRAM_TOKEN,
                    "--report",
                    str(self.report),
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        prefix = "telegram-standin listening on "
        if not line.startswith(prefix):
            raise ProcessFailed(f"the Telegram stand-in did not start: {self.log.read_text()}")
        self.base_url = line[len(prefix) :].strip()
        return self

    def stop(self) -> collections.Counter[int]:
        """Stop it; how many replies each Telegram message got (the bench's update_id is
        its message id)."""
        if self.process is None:
            return collections.Counter()
        self.process.terminate()
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        return collections.Counter(int(n) for n in json.loads(self.report.read_text()))


def inbox_counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM inbox GROUP BY status"))


async def wait_answered(db: Path, within: float) -> tuple[float, dict[str, int]]:
    """Wait until no inbox item is pending or processing; (when, counts)."""
    deadline = time.monotonic() + within
    while True:
        counts = await asyncio.to_thread(inbox_counts, db)
        if not counts.get("pending") and not counts.get("processing"):
            return time.monotonic(), counts
        if time.monotonic() > deadline:
            return time.monotonic(), counts
        await asyncio.sleep(0.1)


# --- the run ---------------------------------------------------------------------------------


async def bench(
    args: argparse.Namespace,
    workdir: Path,
    reference_url: str,
) -> dict[str, Any]:
    claude = StandinProcess(workdir / "claude", delay=args.claude_delay).start()
    numbers = itertools.count(10_000_000)  # update ids, never reused in a run
    telegram_sent: list[int] = []  # update ids the service acknowledged
    telegram = await asyncio.to_thread(TelegramProcess(workdir).start)
    try:
        env = service_env(
            workdir,
            anthropic_base_url=claude.base_url,
            DIGITALME_ENV="bench",
            DIGITALME_LOG_LEVEL=args.log_level,
            # Production's values, not the tests' quick-failure ones.
            DIGITALME_CLAUDE_TIMEOUT_SECONDS="60",
            DIGITALME_CLAUDE_MAX_RETRIES="2",
            # On, as in production, with a limit this load never reaches.
            DIGITALME_RATE_LIMIT_PER_MINUTE="1000000",
            DIGITALME_TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
            DIGITALME_TELEGRAM_SECRET_TOKEN=TELEGRAM_SECRET,
            DIGITALME_TELEGRAM_API_BASE=telegram.base_url,
            DIGITALME_GITHUB_WEBHOOK_SECRET=GITHUB_SECRET,
        )
        for command in (["migrate"], ["persona", "import", str(SAMPLE_PERSONA)]):
            prepared = run_cli(command, env)
            if prepared.returncode != 0:
                raise SystemExit(f"digitalme {' '.join(command)} failed: {prepared.stderr}")
        service = ServiceProcess(env, workdir)
        await service.start_async()
        try:
            result = await measure(args, service, reference_url, numbers, telegram_sent)
        finally:
            await service.stop_async()
        result["service_log_errors"] = service.log_text().count(" ERROR ")
    finally:
        replies = await asyncio.to_thread(telegram.stop)
        claude.stop()
    missing = [n for n in telegram_sent if replies[n] == 0]
    doubled = [n for n, count in replies.items() if count > 1]
    result["replies"] = {
        "deliveries": len(telegram_sent),
        "answered": len(telegram_sent) - len(missing),
        "missing": len(missing),
        "answered_twice": len(doubled),
    }
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    result["settings"] = vars(args)
    return result


async def measure(
    args: argparse.Namespace,
    service: ServiceProcess,
    reference_url: str,
    numbers: collections.abc.Iterator[int],
    telegram_sent: list[int],
) -> dict[str, Any]:
    def tracked(n: int) -> Request:
        telegram_sent.append(n)
        return telegram_update(n)

    connector = aiohttp.TCPConnector(limit=0)
    phases: dict[str, Phase] = {}
    async with aiohttp.ClientSession(connector=connector) as http:
        loop_args = {
            "concurrency": args.concurrency,
            "duration": args.duration,
            "max_requests": args.max_requests,
        }
        for url in (service.base_url, reference_url):  # warm up connections and code
            await closed_loop(
                "warmup",
                http,
                url,
                health if url == service.base_url else github_comment,
                numbers,
                concurrency=4,
                duration=0.5,
                max_requests=100,
                expect=200 if url == service.base_url else 202,
            )
        phases["health"] = await closed_loop(
            "GET /health", http, service.base_url, health, numbers, expect=200, **loop_args
        )
        for channel, make, expect in (("telegram", tracked, 200), ("github", github_comment, 202)):
            reference_make = telegram_update if channel == "telegram" else make
            phases[f"{channel}_reference"] = await closed_loop(
                f"{channel} ack, reference",
                http,
                reference_url,
                reference_make,
                numbers,
                expect=expect,
                **loop_args,
            )
            phases[channel] = await closed_loop(
                f"{channel} ack, DigitalMe",
                http,
                service.base_url,
                make,
                numbers,
                expect=expect,
                **loop_args,
            )
        phases["steady"] = await open_loop(
            f"telegram ack at {args.rate:g}/s",
            http,
            service.base_url,
            tracked,
            numbers,
            rate=args.rate,
            duration=args.rate_duration,
            expect=200,
        )
        # Answer what the phases above left, so the burst starts on an empty queue.
        _, before = await wait_answered(service.db_path, args.drain_timeout)
        burst_started = time.monotonic()
        phases["burst"] = await closed_loop(
            f"burst of {args.burst} (acks)",
            http,
            service.base_url,
            tracked,
            numbers,
            concurrency=args.concurrency,
            duration=args.drain_timeout,
            max_requests=args.burst,
            expect=200,
        )
        finished, after = await wait_answered(service.db_path, args.drain_timeout)
    await asyncio.sleep(0.5)  # a reply sent twice would show now
    drained = len(phases["burst"].latencies_ms)
    drain_seconds = finished - burst_started
    ratio = {
        channel: round(
            phases[channel].per_second / (phases[f"{channel}_reference"].per_second or 1), 3
        )
        for channel in ("telegram", "github")
    }
    return {
        "phases": [p.summary() for p in phases.values()],
        "ack_ratio_vs_reference": ratio,
        "steady": {"rate": args.rate, "p99_ms": round(phases["steady"].quantile(0.99), 2)},
        "drain": {
            "deliveries": drained,
            "seconds": round(drain_seconds, 2),
            "per_second": round(drained / drain_seconds, 1) if drain_seconds else 0,
            "inbox_before_burst": before,
            "inbox_after": after,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per closed-loop phase (default 5)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=50_000,
        help="upper bound of requests per closed-loop phase",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=500.0,
        help="deliveries per second of the steady phase (default 500)",
    )
    parser.add_argument(
        "--rate-duration", type=float, default=5.0, help="seconds of the steady phase (default 5)"
    )
    parser.add_argument(
        "--burst", type=int, default=10_000, help="deliveries in the burst (default 10000)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="longest wait for the worker to answer everything (default 600)",
    )
    parser.add_argument(
        "--claude-delay",
        type=float,
        default=0.0,
        help="seconds the Claude stand-in takes per answer (default 0)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        help="DigitalMe's DIGITALME_LOG_LEVEL (default info, as in production)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="digitalme-webhook-bench-") as tmp,
        reference_server(Path(tmp)) as reference_url,
    ):
        result = asyncio.run(bench(args, Path(tmp), reference_url))
    replies = result["replies"]
    failed = (
        sum(p["errors"] for p in result["phases"])
        or replies["missing"]
        or replies["answered_twice"]
        or result["service_log_errors"]
    )
    if args.json:
        print(json.dumps(result))
        return 1 if failed else 0
    print(
        f"{'phase':<30} {'count':>7} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'errors':>6}"
    )
    for p in result["phases"]:
        print(
            f"{p['phase']:<30} {p['requests']:>7} {p['per_second']:>9} {p['p50_ms']:>8} "
            f"{p['p99_ms']:>8} {p['max_ms']:>8} {p['errors']:>6}"
        )
    ratio = result["ack_ratio_vs_reference"]
    print(
        f"acks vs the reference: telegram {ratio['telegram']:.2f}x, github {ratio['github']:.2f}x"
    )
    print(f"steady {result['steady']['rate']:g}/s: p99 ack {result['steady']['p99_ms']} ms")
    drain = result["drain"]
    print(
        f"worker: answered a burst of {drain['deliveries']} in {drain['seconds']} s "
        f"({drain['per_second']}/s)"
    )
    print(
        f"replies: {replies['answered']} of {replies['deliveries']} deliveries answered, "
        f"{replies['missing']} missing, {replies['answered_twice']} answered twice"
    )
    if result["service_log_errors"]:
        print(f"the service logged {result['service_log_errors']} ERROR line(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
