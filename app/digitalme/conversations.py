"""Conversations and their messages.

A conversation is identified by (channel, external id): a Telegram chat, a Slack thread,
or an API conversation (whose external id is its own id). Messages keep their role, text,
time, the platform's message id and, for replies, the tokens and estimated cost.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .db import Database
from .engine import Connection, Row
from .models import message_answer
from .usage import Usage


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Conversation:
    id: str
    channel: str
    external_id: str
    title: str | None
    token_id: int | None
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: str
    role: str
    text: str
    created_at: str
    channel_message_id: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    cost_usd: float | None = None
    stop_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As the API shows it: models.UserMessage or models.AssistantMessage."""
        return message_answer(self).to_json()


_CONV_COLUMNS = "id, channel, external_id, title, token_id, created_at, updated_at"
_MSG_COLUMNS = (
    "id, conversation_id, role, text, created_at, channel_message_id, model,"
    " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,"
    " stop_reason"
)


# Message.to_json, built by the database: the API's list of messages is one JSON text per
# row, with no Python object per message (five times cheaper for a page of messages). The
# engine names its function that makes an object of key, value, ... (Database.json_object).
_MSG_JSON = (
    "CASE role WHEN 'assistant' THEN {json_object}("
    "'id', id, 'conversation_id', conversation_id, 'role', role, 'text', text,"
    " 'created_at', created_at, 'model', model, 'stop_reason', stop_reason,"
    " 'usage', {json_object}('input_tokens', input_tokens, 'output_tokens', output_tokens,"
    " 'cache_read_tokens', cache_read_tokens, 'cache_write_tokens', cache_write_tokens),"
    " 'cost_usd', cost_usd)"
    " ELSE {json_object}('id', id, 'conversation_id', conversation_id, 'role', role,"
    " 'text', text, 'created_at', created_at) END"
)


# Pages of messages kept rendered (messages_json): how many, and how large one may be.
PAGE_CACHE_ENTRIES = 256
PAGE_CACHE_MAX_CHARS = 64 * 1024


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # (conversation, its newest message id, limit, before) -> the page as JSON
        self._pages: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
        self._msg_json = _MSG_JSON.format(json_object=db.json_object)

    async def create(
        self,
        channel: str,
        *,
        external_id: str | None = None,
        title: str | None = None,
        token_id: int | None = None,
    ) -> Conversation:
        conversation_id = uuid.uuid4().hex
        now = now_iso()
        row = await self.db.write_returning(
            f"INSERT INTO conversations ({_CONV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            f" RETURNING {_CONV_COLUMNS}",
            (conversation_id, channel, external_id or conversation_id, title, token_id, now, now),
        )
        assert row is not None  # an INSERT without conflict clause returns its row
        return Conversation(**dict(row))

    async def get_or_create(
        self, channel: str, external_id: str, title: str | None = None
    ) -> Conversation:
        """The conversation of a channel's chat or thread, made on first contact."""
        found = await self.db.lookup_one(
            f"SELECT {_CONV_COLUMNS} FROM conversations WHERE channel = ? AND external_id = ?",
            (channel, external_id),
        )
        if found is not None:
            return Conversation(**dict(found))
        now = now_iso()

        def create(conn: Connection) -> Row:
            conn.execute(
                f"INSERT INTO conversations ({_CONV_COLUMNS}) VALUES (?, ?, ?, ?, NULL, ?, ?)"
                " ON CONFLICT (channel, external_id) DO NOTHING",
                (uuid.uuid4().hex, channel, external_id, title, now, now),
            )
            rows: list[Row] = conn.execute(
                f"SELECT {_CONV_COLUMNS} FROM conversations WHERE channel = ? AND external_id = ?",
                (channel, external_id),
            ).fetchall()
            return rows[0]

        return Conversation(**dict(await self.db.write(create)))

    async def delete(self, conversation_id: str) -> None:
        """Remove a conversation and its messages (the smoke test's own, afterwards)."""
        await self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    async def get(self, conversation_id: str) -> Conversation | None:
        row = await self.db.lookup_one(
            f"SELECT {_CONV_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
        )
        return Conversation(**dict(row)) if row else None

    async def get_with_newest(self, conversation_id: str) -> tuple[Conversation, int] | None:
        """The conversation and its newest message id (0 with none), in one read: what
        :meth:`messages_json` needs to answer from a page already rendered."""
        row = await self.db.lookup_one(
            f"SELECT {_CONV_COLUMNS}, (SELECT MAX(id) FROM messages"
            " WHERE conversation_id = conversations.id)"
            " FROM conversations WHERE id = ?",
            (conversation_id,),
        )
        if row is None:
            return None
        return (Conversation(row[0], row[1], row[2], row[3], row[4], row[5], row[6]), row[7] or 0)

    async def list_for(self, *, token_id: int | None, limit: int = 100) -> list[Conversation]:
        """Newest first; only the token's own unless token_id is None (admin)."""
        if token_id is None:
            rows = await self.db.fetchall(
                f"SELECT {_CONV_COLUMNS} FROM conversations ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self.db.fetchall(
                f"SELECT {_CONV_COLUMNS} FROM conversations WHERE token_id = ?"
                " ORDER BY updated_at DESC LIMIT ?",
                (token_id, limit),
            )
        return [Conversation(**dict(row)) for row in rows]

    async def add_message(
        self,
        conversation_id: str,
        role: str,
        text: str,
        *,
        channel_message_id: str | None = None,
        model: str | None = None,
        usage: Usage | None = None,
        cost_usd: float | None = None,
        stop_reason: str | None = None,
    ) -> Message:
        now = now_iso()
        u = usage or Usage()
        values = (
            conversation_id,
            role,
            text,
            now,
            channel_message_id,
            model,
            u.input_tokens if usage else None,
            u.output_tokens if usage else None,
            u.cache_read_tokens if usage else None,
            u.cache_write_tokens if usage else None,
            cost_usd,
            stop_reason,
        )

        def insert(conn: Connection) -> Row:
            rows: list[Row] = conn.execute(
                "INSERT INTO messages (conversation_id, role, text, created_at,"
                " channel_message_id, model, input_tokens, output_tokens, cache_read_tokens,"
                " cache_write_tokens, cost_usd, stop_reason)"
                f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_MSG_COLUMNS}",
                values,
            ).fetchall()
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            return rows[0]

        return Message(**dict(await self.db.write(insert)))

    async def messages(
        self, conversation_id: str, *, limit: int = 200, before_id: int | None = None
    ) -> list[Message]:
        """Oldest first: the last ``limit`` messages (before ``before_id`` if given)."""
        rows = await self.db.lookup(  # bounded by its LIMIT, through messages_by_conversation
            f"SELECT {_MSG_COLUMNS} FROM messages WHERE conversation_id = ? AND id < ?"
            " ORDER BY id DESC LIMIT ?",
            (conversation_id, before_id if before_id is not None else 2**62, limit),
        )
        return [Message(**dict(row)) for row in reversed(rows)]

    async def messages_json(
        self,
        conversation_id: str,
        *,
        limit: int = 200,
        before_id: int | None = None,
        newest: int | None = None,
    ) -> str:
        """:meth:`messages` as the API shows them: a JSON array of ``Message.to_json()``
        objects, oldest first.

        Messages are only ever added (with a larger id), never changed; so a page is known
        by its conversation's newest message id, and a client that reads an unchanged
        conversation again (the web chat does, often) is answered from the last rendering
        after one indexed lookup of that id (none when the caller read it with the
        conversation: ``newest``, from :meth:`get_with_newest`)."""
        before = before_id if before_id is not None else 2**62
        if newest is None:
            row = await self.db.lookup_one(
                "SELECT MAX(id) FROM messages WHERE conversation_id = ?", (conversation_id,)
            )
            newest = (row[0] if row else None) or 0
        key = (conversation_id, newest, limit, before)
        page = self._pages.get(key)
        if page is not None:
            self._pages.move_to_end(key)
            return page
        rows = await self.db.lookup(
            f"SELECT {self._msg_json} FROM messages WHERE conversation_id = ? AND id < ?"
            " ORDER BY id DESC LIMIT ?",
            (conversation_id, before, limit),
        )
        page = "[" + ",".join(row[0] for row in reversed(rows)) + "]"
        if len(page) <= PAGE_CACHE_MAX_CHARS:
            self._pages[key] = page
            if len(self._pages) > PAGE_CACHE_ENTRIES:
                self._pages.popitem(last=False)
        return page

    async def turns(self, conversation_id: str, *, limit: int) -> list[tuple[str, str]]:
        """Oldest first: (role, text) of the last ``limit`` messages, what Claude is sent."""
        rows = await self.db.lookup(
            "SELECT role, text FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT ?",
            (conversation_id, limit),
        )
        return [(row[0], row[1]) for row in reversed(rows)]

    async def tokens_used_since(self, since_iso: str) -> int:
        row = await self.db.fetchone(
            "SELECT COALESCE(SUM(COALESCE(input_tokens,0) + COALESCE(output_tokens,0)"
            " + COALESCE(cache_read_tokens,0) + COALESCE(cache_write_tokens,0)), 0) AS used"
            " FROM messages WHERE role = 'assistant' AND created_at >= ?",
            (since_iso,),
        )
        return int(row["used"]) if row else 0
