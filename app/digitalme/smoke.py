"""A smoke chat turn: one question through the running service, the way a person asks it.

``digitalme smoke-test --url http://127.0.0.1:8080`` creates a throw-away chat token,
opens a conversation and sends one message through the HTTP API, so the answer goes
through everything a real turn does (authentication, the database, the persona, Claude);
then it deletes the conversation and the token, leaving nothing in the owner's history.
The deploy's health gate runs it after ``/health/ready`` (docs/operations/upgrades.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from .conversations import ConversationStore
from .db import Database
from .tokens import TokenStore

QUESTION = "This is an automatic check after a deployment: please answer with one short line."


class SmokeTestFailed(Exception):
    """The turn did not come back as a reply; the message says what came back instead."""


@dataclass(frozen=True)
class SmokeResult:
    seconds: float
    reply_chars: int
    model: str | None


async def smoke_test(db: Database, url: str, timeout_seconds: float) -> SmokeResult:
    tokens, conversations = TokenStore(db), ConversationStore(db)
    secret, token = await tokens.create(
        f"smoke-test {datetime.now(UTC).isoformat(timespec='seconds')}", "chat"
    )
    conversation_id = None
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(
            base_url=url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {secret}"},
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
        ) as http:
            async with http.post("api/v1/conversations") as response:
                body = await response.json(content_type=None)
                if response.status != 201:
                    raise SmokeTestFailed(
                        f"creating a conversation answered {response.status}: {body}"
                    )
                conversation_id = body["id"]
            async with http.post(
                f"api/v1/conversations/{conversation_id}/messages", json={"text": QUESTION}
            ) as response:
                body = await response.json(content_type=None)
                if response.status != 201:
                    raise SmokeTestFailed(f"the chat turn answered {response.status}: {body}")
        reply = body.get("reply") or {}
        if not str(reply.get("text", "")).strip():
            raise SmokeTestFailed(f"the chat turn came back without a reply: {body}")
        return SmokeResult(
            round(time.monotonic() - started, 3), len(reply["text"]), reply.get("model")
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SmokeTestFailed(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        if conversation_id is not None:
            await conversations.delete(conversation_id)
        await tokens.delete(token.id)
