"""What the clone's tools did: for per-day limits, and so that a retried chat turn does not
repeat an action (the same request in the same conversation on the same day)."""

from __future__ import annotations

from datetime import UTC, datetime

from .conversations import now_iso
from .db import Database


def start_of_day() -> str:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ToolActionLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def count_today(self, tool: str) -> int:
        row = await self.db.fetchone(
            "SELECT COUNT(*) AS n FROM tool_actions WHERE tool = ? AND created_at >= ?",
            (tool, start_of_day()),
        )
        return int(row["n"]) if row else 0

    async def find_today(
        self,
        tool: str,
        conversation_id: str,
        request_sha256: str,
    ) -> str | None:
        row = await self.db.fetchone(
            "SELECT result FROM tool_actions WHERE tool = ? AND conversation_id = ?"
            " AND request_sha256 = ? AND created_at >= ? ORDER BY id DESC LIMIT 1",
            (tool, conversation_id, request_sha256, start_of_day()),
        )
        return str(row["result"]) if row else None

    async def record(
        self, tool: str, conversation_id: str, request_sha256: str, result: str
    ) -> None:
        await self.db.execute(
            "INSERT INTO tool_actions (tool, conversation_id, request_sha256, result,"
            " created_at) VALUES (?, ?, ?, ?, ?)",
            (tool, conversation_id, request_sha256, result, now_iso()),
        )
