"""The reference for chat turns in bench/http_bench.py: the least a server can do for a turn
with the libraries DigitalMe uses, and nothing else.

``POST /api/v1/conversations/{id}/messages`` with ``{"text": ...}``: verify the bearer
token (its SHA-256 looked up in ``api_tokens``), insert the user message and commit, call
Claude through the ``anthropic`` SDK (``messages.create``: the persona prompt and the new
message), insert the reply and commit, answer 201 with both. aiohttp, aiosqlite (one
connection) and the SDK, on a database migrated by ``digitalme migrate`` with DigitalMe's
SQLite settings (WAL, ``synchronous=FULL``: each commit is durable before the answer).
``POST /api/v1/conversations`` makes a conversation (the bench does it before it times).

    python -m bench.chat_reference --port 8082 --db ref.db --persona-prompt prompt.txt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite
import anthropic
from aiohttp import web

DB = web.AppKey("db", aiosqlite.Connection)
CLAUDE = web.AppKey("claude", anthropic.AsyncAnthropic)
PROMPT = web.AppKey("prompt", str)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def token_id(request: web.Request) -> int | None:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    digest = hashlib.sha256(secret.strip().encode()).hexdigest()
    rows = await request.app[DB].execute_fetchall(
        "SELECT id FROM api_tokens WHERE token_sha256 = ? AND revoked_at IS NULL", (digest,)
    )
    return next((int(row[0]) for row in rows), None)


async def create_conversation(request: web.Request) -> web.Response:
    owner = await token_id(request)
    if owner is None:
        return web.json_response({"error": "invalid_token"}, status=401)
    db = request.app[DB]
    conversation_id, stamp = uuid.uuid4().hex, now()
    await db.execute(
        "INSERT INTO conversations (id, channel, external_id, token_id, created_at,"
        " updated_at) VALUES (?, 'api', ?, ?, ?, ?)",
        (conversation_id, conversation_id, owner, stamp, stamp),
    )
    await db.commit()
    return web.json_response({"id": conversation_id}, status=201)


async def post_message(request: web.Request) -> web.Response:
    if await token_id(request) is None:
        return web.json_response({"error": "invalid_token"}, status=401)
    text = (await request.json())["text"]
    conversation_id = request.match_info["conversation_id"]
    db = request.app[DB]
    cursor = await db.execute(
        "INSERT INTO messages (conversation_id, role, text, created_at) VALUES (?, 'user', ?, ?)",
        (conversation_id, text, now()),
    )
    user_id = cursor.lastrowid
    await db.commit()
    reply = await request.app[CLAUDE].messages.create(
        model=os.environ.get("DIGITALME_MODEL", "claude-test"),
        max_tokens=1024,
        system=[
            {"type": "text", "text": request.app[PROMPT], "cache_control": {"type": "ephemeral"}}
        ],
        messages=[{"role": "user", "content": text}],
    )
    answer = "".join(block.text for block in reply.content if block.type == "text")
    cursor = await db.execute(
        "INSERT INTO messages (conversation_id, role, text, created_at, model, input_tokens,"
        " output_tokens, stop_reason) VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?)",
        (
            conversation_id,
            answer,
            now(),
            reply.model,
            reply.usage.input_tokens,
            reply.usage.output_tokens,
            reply.stop_reason,
        ),
    )
    await db.commit()
    return web.json_response(
        {
            "message": {"id": user_id, "text": text},
            "reply": {"id": cursor.lastrowid, "text": answer},
        },
        status=201,
    )


def make_app(db_path: Path, prompt: str) -> web.Application:
    app = web.Application()
    app[PROMPT] = prompt

    async def resources(app: web.Application) -> AsyncIterator[None]:
        db = await aiosqlite.connect(db_path)
        db.row_factory = sqlite3.Row
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "busy_timeout=5000",
            "foreign_keys=ON",
        ):
            await db.execute_fetchall(f"PRAGMA {pragma}")
        app[DB] = db
        app[CLAUDE] = anthropic.AsyncAnthropic(max_retries=0)  # ANTHROPIC_* from the env
        yield
        await app[CLAUDE].close()
        await db.close()

    app.cleanup_ctx.append(resources)
    app.router.add_post("/api/v1/conversations", create_conversation)
    app.router.add_post("/api/v1/conversations/{conversation_id}/messages", post_message)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, required=True, help="a migrated DigitalMe database")
    parser.add_argument(
        "--persona-prompt",
        type=Path,
        required=True,
        help="file with the system prompt (DigitalMe's, built once)",
    )
    args = parser.parse_args()
    web.run_app(
        make_app(args.db, args.persona_prompt.read_text()),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
