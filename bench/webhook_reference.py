"""The reference for webhook acknowledgements in bench/webhook_bench.py: the least a server
can do to accept a delivery durably, and nothing else.

``POST /webhooks/telegram``: compare the secret-token header in constant time, insert the
raw body into ``deliveries`` by its ``update_id``, commit, answer 200.
``POST /webhooks/github``: verify ``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body,
constant-time), insert the raw body by ``X-GitHub-Delivery``, commit, answer 202.

aiohttp and aiosqlite (one connection), DigitalMe's SQLite settings (WAL,
``synchronous=FULL``: every delivery is durable before its answer). A redelivery is a
no-op insert, as in DigitalMe's inbox.

    python -m bench.webhook_reference --port 8083 --db ref.db
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
from aiohttp import web

DB = web.AppKey("db", aiosqlite.Connection)
TELEGRAM_SECRET = web.AppKey("telegram_secret", bytes)
GITHUB_SECRET = web.AppKey("github_secret", bytes)


async def store(request: web.Request, channel: str, delivery_id: str, raw: bytes) -> None:
    db = request.app[DB]
    await db.execute(
        "INSERT INTO deliveries (channel, delivery_id, payload) VALUES (?, ?, ?)"
        " ON CONFLICT (channel, delivery_id) DO NOTHING",
        (channel, delivery_id, raw.decode()),
    )
    await db.commit()


async def telegram(request: web.Request) -> web.Response:
    given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "").encode()
    if not hmac.compare_digest(request.app[TELEGRAM_SECRET], given):
        return web.json_response({"error": "invalid_secret_token"}, status=401)
    raw = await request.read()
    await store(request, "telegram", str(json.loads(raw)["update_id"]), raw)
    return web.json_response({})


async def github(request: web.Request) -> web.Response:
    raw = await request.read()
    expected = "sha256=" + hmac.new(request.app[GITHUB_SECRET], raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("X-Hub-Signature-256", "")):
        return web.json_response({"error": "invalid_signature"}, status=401)
    await store(request, "github", request.headers["X-GitHub-Delivery"], raw)
    return web.json_response({"status": "accepted"}, status=202)


def make_app(db_path: Path, telegram_secret: str, github_secret: str) -> web.Application:
    app = web.Application()
    app[TELEGRAM_SECRET] = telegram_secret.encode()
    app[GITHUB_SECRET] = github_secret.encode()

    async def database(app: web.Application) -> AsyncIterator[None]:
        db = await aiosqlite.connect(db_path)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
            await db.execute_fetchall(f"PRAGMA {pragma}")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY,"
            " channel TEXT NOT NULL, delivery_id TEXT NOT NULL,"
            " payload TEXT NOT NULL, UNIQUE (channel, delivery_id))"
        )
        await db.commit()
        app[DB] = db
        yield
        await db.close()

    app.cleanup_ctx.append(database)
    app.router.add_post("/webhooks/telegram", telegram)
    app.router.add_post("/webhooks/github", github)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.db, os.environ["BENCH_TELEGRAM_SECRET"], os.environ["BENCH_GITHUB_SECRET"]),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
