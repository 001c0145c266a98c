"""Durability of the real service process: what it acknowledged survives ``kill -9``, and a
streamed reply is stored once complete even when its client has gone (or the service is
told to stop), and concurrent turns each get the reply that was stored.

The service runs as ``digitalme serve`` (tests/support/process.py); Claude is the
in-process stand-in, so its script and records are at hand.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from digitalme.conversations import ConversationStore
from digitalme.db import Database
from standins.anthropic_api import AnthropicStandin, Reply
from tests.conftest import ServiceFactory
from tests.support.process import (
    ServiceProcess,
    prepare_database,
    run_cli,
    running_service_async,
    service_env,
)

CONVERSATIONS = 2
TURNS = 20
WAIT_SECONDS = 60  # generous: a loaded 2-core CI machine is slow, a hang still fails
STREAM_CHUNKS = [f"part {i} of a slow reply. " for i in range(12)]
CHUNK_DELAY = 0.25  # the whole reply takes ~3 s to stream


def prepare(tmp_path: Path, standin: AnthropicStandin) -> tuple[dict[str, str], str]:
    """Environment, persona imported and a chat token created, all through the CLI."""
    env = service_env(tmp_path, anthropic_base_url=standin.base_url)
    prepare_database(env)
    created = run_cli(
        ["token", "create", "--name", "durability", "--scope", "chat", "--quiet"], env
    )
    assert created.returncode == 0, created.stderr
    return env, created.stdout.strip()


@asynccontextmanager
async def api(service: ServiceProcess, token: str) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(service.base_url, headers=headers) as http:
        yield http


async def new_conversation(http: aiohttp.ClientSession) -> str:
    async with http.post("/api/v1/conversations") as response:
        assert response.status == 201, await response.text()
        conversation_id: str = (await response.json())["id"]
        return conversation_id


async def messages(http: aiohttp.ClientSession, conversation_id: str) -> list[dict[str, Any]]:
    async with http.get(f"/api/v1/conversations/{conversation_id}/messages?limit=1000") as r:
        assert r.status == 200, await r.text()
        found: list[dict[str, Any]] = (await r.json())["messages"]
        return found


def stored_rows(db_path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db_path) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
        return [dict(row) for row in rows]


async def test_acknowledged_turns_survive_kill_9(
    tmp_path: Path,
    standin: AnthropicStandin,
) -> None:
    env, token = prepare(tmp_path, standin)
    acked: list[dict[str, Any]] = []
    async with running_service_async(env, tmp_path) as service:
        async with api(service, token) as http:
            conversations = [await new_conversation(http) for _ in range(CONVERSATIONS)]

            async def say(conversation_id: str, text: str) -> dict[str, Any]:
                async with http.post(
                    f"/api/v1/conversations/{conversation_id}/messages", json={"text": text}
                ) as response:
                    assert response.status == 201, await response.text()
                    turn: dict[str, Any] = await response.json()
                    return turn

            for n in range(TURNS):
                acked.append(await say(conversations[n % CONVERSATIONS], f"message {n}"))
            # One more turn, caught while it waits for Claude (its user message committed,
            # its answer not begun); then kill -9.
            standin.set_delay(60)
            cut = asyncio.create_task(say(conversations[0], "cut off"))
            async with asyncio.timeout(WAIT_SECONDS):
                while not any(r.outcome is None for r in standin.message_requests):
                    await standin.wait_for_requests(len(standin.requests) + 1, timeout=WAIT_SECONDS)
            assert service.kill() == -signal.SIGKILL
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await cut
            standin.set_delay(0)

        await service.start_async()
        async with api(service, token) as http:
            after = {c: await messages(http, c) for c in conversations}
            by_id = {m["id"]: m for stored in after.values() for m in stored}
            for turn in acked:
                user, reply = turn["message"], turn["reply"]
                assert by_id[user["id"]] == user
                assert by_id[reply["id"]] == reply
                assert reply["text"] == f"Stand-in reply to: {user['text']}"
                usage = reply["usage"]
                assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage
                assert reply["cost_usd"] > 0
            # The cut turn left its user message and nothing else.
            assert [m["text"] for m in after[conversations[0]][-2:]] == [
                acked[-CONVERSATIONS]["reply"]["text"],
                "cut off",
            ]
            assert len(by_id) == 2 * TURNS + 1

            # The restarted service carries on with the persisted history; the orphaned
            # message and the new one reach Claude as one user turn.
            before = len(standin.message_requests)
            async with http.post(
                f"/api/v1/conversations/{conversations[0]}/messages", json={"text": "still there?"}
            ) as response:
                assert response.status == 201, await response.text()
            sent = standin.message_requests[before].body["messages"]
            assert sent[0] == {"role": "user", "content": "message 0"}
            assert sent[-1] == {"role": "user", "content": "cut off\n\nstill there?"}
            assert len(sent) == 2 * TURNS // CONVERSATIONS + 1


async def test_concurrent_turns_all_get_their_stored_reply(
    make_service: ServiceFactory,
) -> None:
    """Chat turns alongside other reads (the web chat polls its conversation list) must
    each be answered 201 with the reply that was stored."""
    service = await make_service(rate_limit_per_minute=0)
    conversations = [await service.new_conversation() for _ in range(8)]
    statuses: list[int] = []

    async def talk(conversation_id: str) -> None:
        for n in range(15):
            response = await service.client.post(
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"text": f"m{n}"},
                headers=service.auth(),
            )
            statuses.append(response.status)
            await response.read()

    async def browse(stop: asyncio.Event) -> None:
        while not stop.is_set():
            response = await service.client.get("/api/v1/conversations", headers=service.auth())
            assert response.status == 200
            await response.read()

    stop = asyncio.Event()
    browsers = [asyncio.create_task(browse(stop)) for _ in range(4)]
    await asyncio.gather(*(talk(c) for c in conversations))
    stop.set()
    await asyncio.gather(*browsers)
    for conversation_id in conversations:
        response = await service.client.get(
            f"/api/v1/conversations/{conversation_id}/messages", headers=service.auth()
        )
        stored = (await response.json())["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant"] * 15
    assert statuses.count(201) == len(statuses) == 120, sorted(set(statuses))


async def test_a_stored_message_is_read_back_while_another_read_is_open(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "digitalme.db")
    await db.open()
    try:
        await db.migrate()
        store = ConversationStore(db)
        conversation = await store.create("api")
        for text in ("one", "two"):
            await store.add_message(conversation.id, "user", text)
        # Another request's read, between two of its awaits: its statement is still open.
        async with db.engine.reader.execute("SELECT id FROM messages") as cursor:
            await cursor.fetchone()
            stored = await store.add_message(conversation.id, "user", "three")
        assert stored.text == "three"
    finally:
        await db.close()


async def read_events(response: aiohttp.ClientResponse, until: str) -> list[tuple[str, Any]]:
    """Server-sent events up to and including the first ``until`` event."""
    events: list[tuple[str, Any]] = []
    name = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((str(name), json.loads(line[len("data: ") :])))
            if name == until:
                return events
    raise AssertionError(f"stream ended before a {until!r} event: {events}")


async def start_stream_and_leave(
    http: aiohttp.ClientSession,
    conversation_id: str,
) -> dict[str, Any]:
    """Post with ``Accept: text/event-stream``, read the first delta, hang up. Returns the
    stored user message (the ``message`` event)."""
    response = await http.post(
        f"/api/v1/conversations/{conversation_id}/messages",
        json={"text": "tell me slowly"},
        headers={"Accept": "text/event-stream"},
    )
    try:
        assert response.status == 200, await response.text()
        events = await read_events(response, until="delta")
    finally:
        response.close()  # drop the connection mid-stream
    assert [name for name, _ in events] == ["message", "delta"]
    assert events[1][1] == {"text": STREAM_CHUNKS[0]}
    user: dict[str, Any] = events[0][1]
    return user


async def test_streamed_reply_is_stored_when_the_client_leaves(
    tmp_path: Path, standin: AnthropicStandin
) -> None:
    env, token = prepare(tmp_path, standin)
    standin.script(Reply(chunks=STREAM_CHUNKS, chunk_delay=CHUNK_DELAY))
    async with running_service_async(env, tmp_path) as service, api(service, token) as http:
        conversation_id = await new_conversation(http)
        user = await start_stream_and_leave(http, conversation_id)
        # The reply is still being written ...
        assert [m["role"] for m in await messages(http, conversation_id)] == ["user"]
        # ... and is stored, whole and once, when Claude finishes.
        async with asyncio.timeout(WAIT_SECONDS):
            while len(stored := await messages(http, conversation_id)) < 2:
                await asyncio.sleep(0.05)
        assert stored[0] == user
        reply = stored[1]
        assert reply["role"] == "assistant"
        assert reply["text"] == "".join(STREAM_CHUNKS).strip()
        assert reply["usage"]["output_tokens"] > 0 and reply["stop_reason"] == "end_turn"
        assert standin.message_requests[-1].outcome == "streamed"
        assert len(stored) == 2
    assert "client left during a streamed reply" in service.log_text()


async def test_sigterm_lets_a_streamed_reply_finish_before_exiting(
    tmp_path: Path, standin: AnthropicStandin
) -> None:
    env, token = prepare(tmp_path, standin)
    standin.script(Reply(chunks=STREAM_CHUNKS, chunk_delay=CHUNK_DELAY))
    async with running_service_async(env, tmp_path) as service:
        async with api(service, token) as http:
            conversation_id = await new_conversation(http)
            await start_stream_and_leave(http, conversation_id)
        # Stopped while the reply is still streaming from Claude: it drains first.
        assert await service.stop_async(grace=30) == 0
        rows = [r for r in stored_rows(service.db_path) if r["conversation_id"] == conversation_id]
        assert [r["role"] for r in rows] == ["user", "assistant"]
        assert rows[1]["text"] == "".join(STREAM_CHUNKS).strip()
        assert rows[1]["output_tokens"] > 0 and rows[1]["input_tokens"] > 0
