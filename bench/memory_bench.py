"""The service's memory (RSS) after rounds of a bounded load, on 127.0.0.1: it must stay
small and stop growing once warm.

``digitalme serve`` runs as in bench/webhook_bench.py (Telegram channel on, instant Claude
stand-in, Telegram's Bot API stand-in in a process of its own, production settings). Each round
sends, one after the other:

1. ``--requests`` HTTP requests, half ``GET /health`` and half an authenticated
   ``GET /api/v1/conversations/{id}/messages``;
2. ``--turns`` chat turns (JSON) over ``--conversations`` conversations;
3. ``--deliveries`` Telegram deliveries (100 chats), then waits until the worker has
   answered every one;

and then reads the service's resident memory (``VmRSS`` in /proc). The first round warms
caches up (SQLite's page caches, the SDK's connection pool, the prompt); later rounds must
not add to it. Run from the repository root:

    .venv/bin/python -m bench.memory_bench [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests` and `bench` importable
    sys.path.insert(0, str(REPO))

from bench.http_bench import PRODUCTION, chat_load, closed_loop  # noqa: E402
from bench.webhook_bench import (  # noqa: E402
    TELEGRAM_SECRET,
    TELEGRAM_TOKEN,
    TelegramProcess,
    send,
    telegram_update,
    wait_answered,
)
from tests.support.process import (  # noqa: E402
    SAMPLE_PERSONA,
    ServiceProcess,
    StandinProcess,
    run_cli,
    service_env,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def one_round(
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    service: ServiceProcess,
    token: str,
    conversation: str,
    updates: itertools.count[int],
    sent: list[int],
) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}"}
    base = service.base_url
    targets = [
        (f"{base}/health", None),
        (f"{base}/api/v1/conversations/{conversation}/messages", auth),
    ]

    async def get(_worker: int, n: int) -> str | None:
        url, headers = targets[n % 2]
        async with http.get(url, headers=headers) as response:
            await response.read()
            return None if response.status == 200 else f"HTTP {response.status}"

    started = time.monotonic()
    requests = await closed_loop(
        "requests", total=args.requests, duration=args.timeout, concurrency=16, one=get
    )
    turns = await chat_load(
        http,
        "chat turns",
        base,
        token,
        total=args.turns,
        duration=args.timeout,
        concurrency=args.conversations,
    )

    async def deliver(_worker: int, _n: int) -> str | None:
        number = next(updates)
        sent.append(number)
        ok = await send(http, base, telegram_update(number), 200)
        return None if ok else "not acknowledged"

    deliveries = await closed_loop(
        "deliveries", total=args.deliveries, duration=args.timeout, concurrency=16, one=deliver
    )
    _, inbox = await wait_answered(service.db_path, args.timeout)
    return {
        "requests": requests.requests,
        "turns": turns.requests,
        "deliveries": deliveries.requests,
        "errors": requests.errors + turns.errors + deliveries.errors,
        "seconds": round(time.monotonic() - started, 1),
        "inbox": inbox,
        "rss_mb": round(rss_mb(service.pid), 1),
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    claude = StandinProcess(workdir / "claude").start()
    telegram = await asyncio.to_thread(TelegramProcess(workdir).start)
    try:
        env = service_env(
            workdir,
            anthropic_base_url=claude.base_url,
            DIGITALME_ENV="bench",
            DIGITALME_LOG_LEVEL="info",
            **PRODUCTION,
            DIGITALME_TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
            DIGITALME_TELEGRAM_SECRET_TOKEN=TELEGRAM_SECRET,
            DIGITALME_TELEGRAM_API_BASE=telegram.base_url,
        )
        for command in (
            ["migrate"],
            ["persona", "import", str(SAMPLE_PERSONA)],
            ["token", "create", "--name", "bench", "--scope", "chat", "--quiet"],
        ):
            prepared = run_cli(command, env)
            if prepared.returncode != 0:
                raise SystemExit(f"digitalme {' '.join(command)} failed: {prepared.stderr}")
        token = prepared.stdout.strip()
        service = ServiceProcess(env, workdir)
        await service.start_async()
        rounds = []
        sent: list[int] = []
        updates = itertools.count(20_000_000)
        try:
            started_mb = round(rss_mb(service.pid), 1)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), trust_env=False
            ) as http:
                async with http.post(
                    f"{service.base_url}/api/v1/conversations",
                    headers={"Authorization": f"Bearer {token}"},
                ) as r:
                    conversation = (await r.json())["id"]
                for number in range(args.rounds):
                    result = await one_round(
                        args, http, service, token, conversation, updates, sent
                    )
                    rounds.append({"round": number + 1, **result})
            await asyncio.sleep(0.5)  # a reply sent twice would show now
        finally:
            await service.stop_async()
        errors_logged = service.log_text().count(" ERROR ")
    finally:
        replies = await asyncio.to_thread(telegram.stop)
        claude.stop()
    warm = [r["rss_mb"] for r in rounds[1:]] or [rounds[-1]["rss_mb"]]
    return {
        "rss_mb_at_start": started_mb,
        "rounds": rounds,
        "rss_mb_max": max(r["rss_mb"] for r in rounds),
        "growth_after_first_round_mb": round(warm[-1] - warm[0], 1),
        "missing_replies": sum(1 for n in sent if replies[n] == 0),
        "double_replies": sum(1 for n in sent if replies[n] > 1),
        "service_log_errors": errors_logged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of load (default 3)")
    parser.add_argument(
        "--requests", type=int, default=10_000, help="HTTP requests per round (default 10000)"
    )
    parser.add_argument(
        "--turns", type=int, default=1_000, help="chat turns per round (default 1000)"
    )
    parser.add_argument(
        "--conversations",
        type=int,
        default=8,
        help="conversations the turns go to, at once (default 8)",
    )
    parser.add_argument(
        "--deliveries",
        type=int,
        default=10_000,
        help="webhook deliveries per round (default 10000)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="longest a phase of a round may take (default 600 s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="digitalme-memory-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    failed = (
        any(r["errors"] for r in result["rounds"])
        or result["missing_replies"]
        or result["double_replies"]
        or result["service_log_errors"]
    )
    if args.json:
        print(json.dumps(result))
        return 1 if failed else 0
    print(f"RSS at start {result['rss_mb_at_start']} MB")
    print(
        f"{'round':>5} {'requests':>9} {'turns':>6} {'deliveries':>10} {'errors':>6} "
        f"{'seconds':>8} {'RSS MB':>7}"
    )
    for r in result["rounds"]:
        print(
            f"{r['round']:>5} {r['requests']:>9} {r['turns']:>6} {r['deliveries']:>10} "
            f"{r['errors']:>6} {r['seconds']:>8} {r['rss_mb']:>7}"
        )
    print(
        f"largest RSS {result['rss_mb_max']} MB; growth after the first round "
        f"{result['growth_after_first_round_mb']} MB; replies missing "
        f"{result['missing_replies']}, doubled {result['double_replies']}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
