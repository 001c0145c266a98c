"""The owner's recent activity (GitHub and ClickUp events) and its digest for Claude.

Integrations record one event per webhook delivery (idempotently: the inbox item id is
unique). :meth:`ActivityStore.digest` turns the newest events into a short, deterministic
system block that :class:`~digitalme.chat.ChatService` adds after the persona, bounded by
``DIGITALME_ACTIVITY_DIGEST_*`` in days, events and estimated tokens. It is not marked for
caching: it changes whenever something happens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .chat import estimate_tokens
from .config import Settings
from .conversations import now_iso
from .db import Database

SUMMARY_LIMIT = 240  # characters of one event's summary in the digest


def digest_header(sources: Iterable[str]) -> str:
    """The digest's first line, naming where the activity comes from ("GitHub and
    ClickUp")."""
    names = list(sources)
    where = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
    return (
        f"Recent activity of the person you speak for, from their {where} "
        "(newest first, times in UTC). Use it as background when it is relevant; do not "
        "recite it unprompted."
    )


@dataclass(frozen=True)
class ActivityEvent:
    id: int
    source: str
    kind: str
    actor: str | None
    summary: str
    url: str | None
    occurred_at: str

    def line(self, source: str) -> str:
        """The event as a line of the digest; ``source``: its platform's name."""
        when = self.occurred_at[:16].replace("T", " ")
        summary = " ".join(self.summary.split())
        if len(summary) > SUMMARY_LIMIT:
            summary = summary[: SUMMARY_LIMIT - 1] + "…"
        actor = f" by {self.actor}" if self.actor else ""
        return f"- {when} {source}{actor}: {summary}"


def iso_utc(value: str | None) -> str:
    """A platform timestamp (ISO 8601 or unix seconds/milliseconds) as our ISO form."""
    if value:
        try:
            if value.isdigit():
                seconds = int(value) / (1000 if len(value) > 11 else 1)
                moment = datetime.fromtimestamp(seconds, UTC)
            else:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
            return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        except (ValueError, OverflowError, OSError):
            pass
    return now_iso()


class ActivityStore:
    def __init__(self, db: Database, settings: Settings, sources: Mapping[str, str]) -> None:
        """``sources``: the channels that record activity, name -> the platform's name."""
        self.db = db
        self.settings = settings
        self.sources = dict(sources)
        self.header = digest_header(self.sources.values())

    async def record(
        self,
        source: str,
        inbox_id: int,
        kind: str,
        summary: str,
        *,
        actor: str | None = None,
        url: str | None = None,
        occurred_at: str | None = None,
    ) -> None:
        """Store an event; recording the same inbox item again does nothing."""
        await self.db.execute(
            "INSERT INTO activity (source, inbox_id, kind, actor, summary, url, occurred_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (inbox_id) DO NOTHING",
            (source, inbox_id, kind, actor, summary, url, iso_utc(occurred_at)),
        )

    async def recent(self, *, days: int, limit: int) -> list[ActivityEvent]:
        since = (
            (datetime.now(UTC) - timedelta(days=days))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        rows = await self.db.lookup(  # activity_by_time, newest first, bounded by LIMIT
            "SELECT id, source, kind, actor, summary, url, occurred_at FROM activity"
            " WHERE occurred_at >= ? ORDER BY occurred_at DESC, id DESC LIMIT ?",
            (since, limit),
        )
        return [ActivityEvent(**dict(row)) for row in rows]

    async def digest(self) -> str | None:
        """The system block, or None when there is nothing recent (or it is turned off)."""
        s = self.settings
        if s.activity_digest_days == 0:
            return None
        events = await self.recent(days=s.activity_digest_days, limit=s.activity_digest_max_events)
        if not events:
            return None
        lines = [self.header]
        used = estimate_tokens(self.header)
        for event in events:
            line = event.line(self.sources.get(event.source, event.source))
            cost = estimate_tokens(line)
            if used + cost > s.activity_digest_max_tokens:
                break
            lines.append(line)
            used += cost
        return "\n".join(lines) if len(lines) > 1 else None
