"""The database's size under a steady stream of deliveries, with and without retention,
and the cost of a large prune to the writer, in one run on 127.0.0.1.

Days are compressed into seconds: the service (create_app, served by digitalme.serve in a
child process, the same code as ``digitalme serve``) runs with the retention and the prune
interval in seconds (``--retention``, ``--interval``), which the settings' own lower bounds
forbid in production. Claude and Telegram are the stand-ins (standins/), so every
Telegram delivery is really answered: its question and reply are stored as messages.

Phases, each ``--duration`` seconds of deliveries at ``--rate`` per second (open loop), a
mix of one third each: Telegram messages (answered), GitHub ``issues`` events (recorded as
activity) and GitHub ``star`` events (stored, ignored):

1. **retention off** (the reference): everything is kept;
2. **retention on**: finished deliveries older than ``--retention`` seconds and activity
   that happened more than ``--retention`` seconds ago are pruned every ``--interval``.

Every second: the file's size (database + WAL); every five: bytes per table and index
(SQLite's ``dbstat``), rows, free pages. Messages are never pruned (the clone's
conversations): their bytes are reported apart. A phase prints the size over time and the
growth in its second half, when pruning has reached a steady state.

3. **a large prune**: ``--backlog`` old finished deliveries written into the database, then
   deliveries that need no answer (GitHub ``star`` events: each acknowledgement is one
   durable write, nothing else) at ``--rate`` while the service's scheduled prune deletes
   the backlog in batches: acknowledgement latency before, during and after the prune, and
   the prune's batches, seconds and longest batch in the writer thread (from its log).

Run from the repository root:

    .venv/bin/python -m bench.retention_bench [--duration 60] [--rate 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import multiprocessing
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO))

from digitalme.config import Settings, load_settings  # noqa: E402
from standins.anthropic_api import run_anthropic_standin  # noqa: E402
from standins.platform import running  # noqa: E402
from standins.telegram_api import TelegramStandin  # noqa: E402
from tests.support.process import SAMPLE_PERSONA, free_port  # noqa: E402

TELEGRAM_TOKEN = "123456:BENCH-token"
TELEGRAM_SECRET = "bench-secret-token"
GITHUB_SECRET = "bench-github-secret"
METRICS_TOKEN = "bench-metrics-token-" + "0" * 24
CHATS = 50
DAY = 86400.0


# --- the service, in a child process -----------------------------------------------------------


def _serve(settings: Settings, log_path: str) -> None:
    """The child: ``digitalme serve``'s code on the given settings."""
    from digitalme.serve import serve
    from digitalme.web import SHUTDOWN_GRACE_SECONDS, create_app

    logging.basicConfig(
        level="INFO", filename=log_path, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(
        serve(
            create_app(settings),
            settings.listen,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
            access_log_format='%a "%r" %s %b %Tfs',
        )
    )


async def _prepare(settings: Settings) -> None:
    from digitalme.db import Database
    from digitalme.persona import PersonaStore, load_persona_file

    db = Database(settings.db_path)
    await db.open()
    try:
        await db.migrate()
        persona, digest = load_persona_file(SAMPLE_PERSONA)
        await PersonaStore(db).save(persona, digest)
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def service(settings: Settings, workdir: Path, name: str):  # type: ignore[no-untyped-def]
    await _prepare(settings)
    log = workdir / f"{name}.log"
    child = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(settings, str(log)), daemon=True
    )
    child.start()
    base_url = f"http://127.0.0.1:{settings.listen[1]}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{base_url}/health") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline or not child.is_alive():
                    raise RuntimeError(f"the service did not start: {log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)
        yield base_url, log
    finally:
        child.terminate()
        await asyncio.to_thread(child.join, 30)


# --- deliveries --------------------------------------------------------------------------------

Request = tuple[str, dict[str, str], bytes]


def telegram_update(n: int) -> Request:
    update = {
        "update_id": n,
        "message": {
            "message_id": n,
            "date": int(time.time()),
            "text": f"bench question {n}",
            "from": {"id": 1000 + n % CHATS, "is_bot": False, "first_name": "Bench"},
            "chat": {"id": 1000 + n % CHATS, "type": "private"},
        },
    }
    return (
        "/webhooks/telegram",
        {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET},
        json.dumps(update).encode(),
    )


def github(event: str, n: int, payload: dict[str, Any]) -> Request:
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return (
        "/webhooks/github",
        {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": f"bench-{n}",
            "X-Hub-Signature-256": signature,
        },
        body,
    )


REPOSITORY = {
    "name": "bench",
    "full_name": "acme/bench",
    "owner": {"login": "acme"},
    "html_url": "https://github.com/acme/bench",
}


def star(n: int) -> Request:
    return github(
        "star",
        n,
        {
            "action": "created",
            "repository": REPOSITORY,
            "sender": {"login": "fan"},
            "starred_at": None,
        },
    )


def delivery(n: int) -> Request:
    kind = n % 3
    if kind == 0:
        return telegram_update(n)
    if kind == 1:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return github(
            "issues",
            n,
            {
                "action": "opened",
                "repository": REPOSITORY,
                "sender": {"login": "ada"},
                "issue": {
                    "number": n,
                    "title": f"Bench issue {n}",
                    "user": {"login": "ada"},
                    "body": "Something to look at. " * 20,
                    "created_at": now,
                    "updated_at": now,
                    "html_url": f"https://github.com/acme/bench/{n}",
                },
            },
        )
    return star(n)


@dataclasses.dataclass
class Latencies:
    ms: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (when, ms)
    errors: int = 0
    telegram: int = 0  # Telegram deliveries acknowledged (each must be answered once)

    def between(self, start: float, end: float) -> list[float]:
        return [ms for at, ms in self.ms if start <= at < end]


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    return {
        "count": len(values),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


async def stream(
    base_url: str,
    numbers: itertools.count[int],
    *,
    rate: float,
    duration: float,
    latencies: Latencies,
    make: Any = delivery,
) -> None:
    """One delivery every 1/rate seconds, each at its time (open loop)."""
    async with aiohttp.ClientSession() as http:
        begin = time.monotonic() + 0.05
        tasks = []

        async def one(due: float, request: Request) -> None:
            path, headers, body = request
            try:
                async with http.post(base_url + path, headers=headers, data=body) as answer:
                    await answer.read()
                    ok = answer.status in (200, 202)
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.ms.append((due, (time.monotonic() - due) * 1000))
                latencies.telegram += path == "/webhooks/telegram"
            else:
                latencies.errors += 1

        for i in range(int(rate * duration)):
            due = begin + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due, make(next(numbers)))))
        await asyncio.gather(*tasks)


# --- measuring the database --------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


TABLE_GROUPS = {
    "inbox": ("inbox", "inbox_due", "inbox_finished", "sqlite_autoindex_inbox_1"),
    "activity": ("activity", "activity_by_time", "sqlite_autoindex_activity_1"),
    "messages": ("messages", "messages_by_conversation", "messages_by_day"),
}


def table_report(db: Path) -> dict[str, Any]:
    """Bytes in use per table (with its indexes), rows, and free pages (read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        used = dict(conn.execute("SELECT name, SUM(pgsize - unused) FROM dbstat GROUP BY name"))
        report: dict[str, Any] = {
            f"{group}_bytes": int(sum(used.get(name, 0) for name in names))
            for group, names in TABLE_GROUPS.items()
        }
        for table in ("inbox", "activity", "messages"):
            report[f"{table}_rows"] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        report["free_pages"] = conn.execute("PRAGMA freelist_count").fetchone()[0]
        report["pages"] = conn.execute("PRAGMA page_count").fetchone()[0]
        return report
    finally:
        conn.close()


async def sample(
    db: Path, stop: asyncio.Event, samples: list[dict[str, Any]], start: float
) -> None:
    second = 0
    while not stop.is_set():
        row: dict[str, Any] = {
            "t": round(time.monotonic() - start, 1),
            "file_bytes": file_bytes(db),
            "wal_bytes": file_bytes(Path(f"{db}-wal")),
        }
        if second % 5 == 0:
            row.update(await asyncio.to_thread(table_report, db))
        samples.append(row)
        second += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def settle(db: Path, within: float = 120) -> None:
    """Until no delivery is pending or processing: every Telegram message answered."""

    def unfinished() -> int:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return int(
                conn.execute(
                    "SELECT count(*) FROM inbox WHERE status IN ('pending', 'processing')"
                ).fetchone()[0]
            )
        finally:
            conn.close()

    deadline = time.monotonic() + within
    while await asyncio.to_thread(unfinished):
        if time.monotonic() > deadline:
            raise RuntimeError(f"deliveries still unanswered after {within}s")
        await asyncio.sleep(0.2)


async def metric(base_url: str, name: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as r,
    ):
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- phases ------------------------------------------------------------------------------------


def settings_for(
    workdir: Path,
    name: str,
    anthropic_url: str,
    telegram_url: str,
    *,
    retention: float | None,
    interval: float,
) -> Settings:
    base = load_settings(
        {
            "DIGITALME_DB_PATH": str(workdir / f"{name}.db"),
            "DIGITALME_LISTEN": f"127.0.0.1:{free_port()}",
            "DIGITALME_ENV": "bench",
            "DIGITALME_MODEL": "claude-bench",
            "ANTHROPIC_API_KEY": "sk-ant-bench-" + "k" * 24,
            "ANTHROPIC_BASE_URL": anthropic_url,
            "DIGITALME_CLAUDE_MAX_RETRIES": "0",
            "DIGITALME_RATE_LIMIT_PER_MINUTE": "0",
            "DIGITALME_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
            "DIGITALME_TELEGRAM_SECRET_TOKEN": TELEGRAM_SECRET,
            "DIGITALME_TELEGRAM_API_BASE": telegram_url,
            "DIGITALME_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
            "DIGITALME_ACTIVITY_DIGEST_DAYS": "1",
            "DIGITALME_METRICS_TOKEN": METRICS_TOKEN,
        }
    )
    # Seconds instead of days: below the settings' lower bounds, hence replace().
    days = (retention / DAY) if retention else 0.0
    return dataclasses.replace(
        base,
        inbox_retention_days=days,
        inbox_failed_retention_days=days,
        activity_retention_days=days,
        prune_interval_minutes=interval / 60,
    )


def growth(samples: list[dict[str, Any]], key: str) -> float:
    """Bytes per second of ``key`` over the second half of the run (least squares)."""
    points = [(s["t"], s[key]) for s in samples if key in s]
    points = points[len(points) // 2 :]
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


async def steady_phase(
    name: str,
    workdir: Path,
    urls: tuple[str, str],
    numbers: Any,
    args: argparse.Namespace,
    retention: float | None,
) -> dict[str, Any]:
    settings = settings_for(workdir, name, *urls, retention=retention, interval=args.interval)
    samples: list[dict[str, Any]] = []
    latencies = Latencies()
    async with service(settings, workdir, name) as (base_url, _log):
        stop = asyncio.Event()
        start = time.monotonic()
        sampler = asyncio.create_task(sample(settings.db_path, stop, samples, start))
        await stream(base_url, numbers, rate=args.rate, duration=args.duration, latencies=latencies)
        await settle(settings.db_path)
        stop.set()
        await sampler
        pruned = await metric(base_url, "digitalme_retention_deleted_rows_total")
    final = table_report(settings.db_path)
    return {
        "phase": name,
        "retention_seconds": retention,
        "deliveries": len(latencies.ms),
        "errors": latencies.errors,
        "acks": quantiles([ms for _, ms in latencies.ms]),
        "rows_pruned": int(pruned),
        "final": final,
        "telegram_acked": latencies.telegram,
        "file_bytes_final": samples[-1]["file_bytes"],
        "growth_bytes_per_second_second_half": {
            key: round(growth(samples, key))
            for key in ("file_bytes", "inbox_bytes", "activity_bytes", "messages_bytes")
        },
        "samples": samples,
    }


async def backlog_phase(
    workdir: Path, urls: tuple[str, str], numbers: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Old finished deliveries written in while acks go on; the scheduled prune takes them."""
    settings = settings_for(
        workdir, "backlog", *urls, retention=args.retention, interval=args.backlog_interval
    )
    latencies = Latencies()
    async with service(settings, workdir, "backlog") as (base_url, log):
        old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 3600))
        payload = json.dumps({"update_id": 0, "message": {"text": "x" * 300}})

        def write_backlog() -> None:
            with sqlite3.connect(settings.db_path, timeout=30) as conn:
                conn.executemany(
                    "INSERT INTO inbox (channel, delivery_id, kind, payload, status,"
                    " next_attempt_at, received_at, updated_at)"
                    " VALUES ('telegram', ?, 'message', ?, 'done', 0, ?, ?)",
                    ((f"backlog-{n}", payload, old, old) for n in range(args.backlog)),
                )

        await asyncio.to_thread(write_backlog)
        written = time.monotonic()

        async def watch() -> tuple[float, float]:
            """When the prune started deleting, and when it had deleted the backlog."""
            first = None
            while True:
                deleted = await metric(base_url, "digitalme_retention_deleted_rows_total")
                now = time.monotonic()
                if deleted and first is None:
                    first = now
                if deleted >= args.backlog:
                    return first or now, now
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        acks = asyncio.create_task(
            stream(
                base_url,
                numbers,
                rate=args.rate,
                duration=args.backlog_interval * 3,
                latencies=latencies,
                make=star,
            )
        )
        began, ended = await watcher
        await acks
        await settle(settings.db_path)
        log_text = log.read_text()
    runs = re.findall(
        r"pruned (\d+) deliveries and (\d+) activity events in (\d+) batches "
        r"\(([0-9.]+)s; the longest batch held the writer ([0-9.]+) ms\)",
        log_text,
    )
    big = max(runs, key=lambda r: int(r[0])) if runs else None
    return {
        "phase": "large prune",
        "backlog": args.backlog,
        "prune": {
            "deliveries": int(big[0]),
            "batches": int(big[2]),
            "seconds": float(big[3]),
            "longest_batch_ms": float(big[4]),
        }
        if big
        else None,
        "acks_before_prune": quantiles(latencies.between(written, began - 0.05)),
        "acks_during_prune": quantiles(latencies.between(began - 0.05, ended)),
        "acks_after_prune": quantiles(latencies.between(ended, float("inf"))),
        "errors": latencies.errors,
        "telegram_acked": latencies.telegram,
    }


def kib(value: float) -> str:
    return f"{value / 1024:,.0f} KiB"


def report(result: dict[str, Any]) -> None:
    for phase in result["steady"]:
        print(
            f"\n{phase['phase']}: {phase['deliveries']} deliveries at {result['rate']}/s "
            f"({phase['errors']} errors), retention "
            f"{phase['retention_seconds'] or 'off'}"
            f"{' s' if phase['retention_seconds'] else ''}, {phase['rows_pruned']} rows pruned"
        )
        print(
            f"{'t (s)':>6} {'db file':>11} {'WAL':>11} {'inbox':>11} {'activity':>11} "
            f"{'messages':>11} {'inbox rows':>10} {'free pages':>10}"
        )
        for s in phase["samples"]:
            if "inbox_bytes" in s:
                print(
                    f"{s['t']:>6.0f} {kib(s['file_bytes']):>11} {kib(s['wal_bytes']):>11} "
                    f"{kib(s['inbox_bytes']):>11} "
                    f"{kib(s['activity_bytes']):>11} {kib(s['messages_bytes']):>11} "
                    f"{s['inbox_rows']:>10} {s['free_pages']:>10}"
                )
        g = phase["growth_bytes_per_second_second_half"]
        print(
            "growth over the second half (bytes/s): "
            + ", ".join(f"{k.removesuffix('_bytes')} {v:+,}" for k, v in g.items())
        )
        print(
            f"acks: p50 {phase['acks']['p50_ms']} ms, p99 {phase['acks']['p99_ms']} ms, "
            f"max {phase['acks']['max_ms']} ms"
        )
    print(f"\nTelegram deliveries: {result['telegram']}")
    big = result["backlog"]
    print(f"\nlarge prune: {big['backlog']} old deliveries: {big['prune']}")
    for when in ("before", "during", "after"):
        q = big[f"acks_{when}_prune"]
        print(
            f"  acks {when:>6} the prune: {q['count']:>5}, p50 {q['p50_ms']} ms, "
            f"p99 {q['p99_ms']} ms, max {q['max_ms']} ms"
        )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    numbers = itertools.count(1)
    with tempfile.TemporaryDirectory(prefix="retention-bench-") as tmp:
        workdir = Path(tmp)
        async with (
            run_anthropic_standin("127.0.0.1", 0) as claude,
            running(TelegramStandin(TELEGRAM_TOKEN)) as telegram,
        ):
            urls = (claude.base_url, telegram.base_url)
            steady = [
                await steady_phase("retention off", workdir, urls, numbers, args, None),
                await steady_phase("retention on", workdir, urls, numbers, args, args.retention),
            ]
            backlog = await backlog_phase(workdir, urls, numbers, args)
            replies = [body["reply_parameters"]["message_id"] for body in telegram.sent]
    acked = sum(phase["telegram_acked"] for phase in [*steady, backlog])
    return {
        "rate": args.rate,
        "duration": args.duration,
        "steady": steady,
        "backlog": backlog,
        "telegram": {
            "acknowledged": acked,
            "answered": len(set(replies)),
            "answered_twice": len(replies) - len(set(replies)),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=60,
        help="seconds of deliveries per steady phase (default 60)",
    )
    parser.add_argument("--rate", type=float, default=60, help="deliveries per second")
    parser.add_argument(
        "--retention",
        type=float,
        default=10,
        help="retention of the 'retention on' phase, seconds (default 10)",
    )
    parser.add_argument(
        "--interval", type=float, default=2, help="seconds between prunes (default 2)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=50_000,
        help="old deliveries of the large prune (default 50,000)",
    )
    parser.add_argument(
        "--backlog-interval",
        type=float,
        default=5,
        help="seconds between prunes in the large prune's phase",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    os.environ.setdefault("NO_PROXY", "*")
    result = asyncio.run(main_async(args))
    report(result)
    if args.json:
        for phase in result["steady"]:
            phase["samples"] = phase["samples"][::5]
        print(json.dumps(result))


if __name__ == "__main__":
    main()
