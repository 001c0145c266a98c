"""The durable inbox: verified webhook deliveries, stored before they are acknowledged.

Each delivery is one row keyed by ``(channel, delivery_id)``, the platform's own id, so a
redelivery is a no-op insert. The background worker (:mod:`digitalme.worker`) moves rows
through these states::

    pending ──claim──▶ processing ──▶ done
       ▲                   │  ├─────▶ ignored   (nothing to do)
       │                   │  └─────▶ failed    (permanent error, or out of attempts)
       └───retry later─────┘                     `digitalme inbox retry ID` ──▶ pending

Deliveries that need no work at all (a bot's own message, an unknown update type) are
stored as ``ignored`` straight away, so their redeliveries are deduplicated too.

Progress within an item is persisted as it happens (the stored user message, Claude's
stored reply, how many reply parts the platform accepted, and when the send of the next
part began), so a retry after a crash or an outage resumes where the last attempt stopped
instead of asking Claude or sending again; a part whose send a crash interrupted is
checked with the platform where it allows (:func:`digitalme.integrations.channel.send_parts`).
Items a crash left ``processing`` are made due again by :meth:`InboxStore.recover`.

Several processes on one database (PostgreSQL): each claim records its claimer
(``claimed_by``), each worker keeps its row in ``workers`` fresh (:meth:`InboxStore.heartbeat`),
and a process takes back only the items of claimers not seen for :data:`LEASE_SECONDS`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .conversations import now_iso
from .db import Database
from .engine import Connection

STATUSES = ("pending", "processing", "done", "failed", "ignored")

_COLUMNS = (
    "id, channel, delivery_id, kind, payload, status, attempts, next_attempt_at,"
    " received_at, updated_at, last_error, user_message_id, reply_message_id,"
    " parts_sent, result, sending_since, lane"
)
_ERROR_LIMIT = 2000
# A worker not seen for this long is gone: its claimed items are taken back. Its heartbeat
# comes every third of it, so a live worker must miss two to lose its items.
LEASE_SECONDS = 30.0
# A worker row unseen for this long is deleted (crashed processes leave theirs).
FORGET_WORKERS_SECONDS = 86400.0


@dataclass(frozen=True)
class InboxItem:
    id: int
    channel: str
    delivery_id: str
    kind: str
    payload: str
    status: str
    attempts: int
    next_attempt_at: float
    received_at: str
    updated_at: str
    last_error: str | None
    user_message_id: int | None
    reply_message_id: int | None
    parts_sent: int
    result: str | None
    sending_since: float | None = None  # the next part's send began then (unix time)
    lane: str | None = None  # its conversation, "<channel>:<key>" (None: a conversation alone)

    @property
    def data(self) -> Any:
        return json.loads(self.payload)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "delivery_id": self.delivery_id,
            "kind": self.kind,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
            "last_error": self.last_error,
            "result": self.result,
        }


class ClaimLost(Exception):
    """This process's claim on an item is gone: it stalled past its lease, and another
    process took the item back (and may be answering it). The item is left to it."""

    def __init__(self, item_id: int) -> None:
        super().__init__(f"inbox item {item_id}: the claim was taken over by another worker")
        self.item_id = item_id


@dataclass(frozen=True)
class Ingested:
    """What :meth:`InboxStore.ingest` did: stored a new item, or found a duplicate."""

    item_id: int
    duplicate: bool


class InboxStore:
    """The inbox. The claims this process holds (:meth:`claim`) fence its writes to those
    items: each checks that the item is still its own, processing, and raises
    :class:`ClaimLost` when another process has taken it back since (a host whose event
    loop stalled past the lease), so that a reply is never stored or sent by both."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._held: dict[int, str] = {}  # item id -> the owner this process claimed it as

    async def ingest(
        self,
        channel: str,
        delivery_id: str,
        kind: str,
        payload: Any,
        *,
        ignored: bool = False,
        lane: str | None = None,
    ) -> Ingested:
        """Store a delivery (durably) unless one with the same id is already there.
        ``lane``: the conversation it belongs to (the channel's key), whose deliveries are
        processed one at a time, in order (:meth:`claim`)."""
        now = now_iso()
        values = (
            channel,
            delivery_id,
            kind,
            json.dumps(payload, ensure_ascii=False),
            "ignored" if ignored else "pending",
            time.time(),
            now,
            now,
            f"{channel}:{lane}" if lane is not None else None,
        )

        def insert(conn: Connection) -> Ingested:
            inserted = conn.execute(
                "INSERT INTO inbox (channel, delivery_id, kind, payload, status,"
                " next_attempt_at, received_at, updated_at, lane)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (channel, delivery_id) DO NOTHING RETURNING id",
                values,
            ).fetchall()
            if inserted:
                return Ingested(int(inserted[0][0]), duplicate=False)
            [row] = conn.execute(
                "SELECT id FROM inbox WHERE channel = ? AND delivery_id = ?", (channel, delivery_id)
            ).fetchall()
            return Ingested(int(row[0]), duplicate=True)

        return await self.db.write(insert)

    async def get(self, item_id: int) -> InboxItem | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM inbox WHERE id = ?", (item_id,))
        return InboxItem(**dict(row)) if row else None

    async def recent(self, *, status: str | None = None, limit: int = 50) -> list[InboxItem]:
        """Newest first, optionally only one status."""
        if status is None:
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS} FROM inbox ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS} FROM inbox WHERE status = ? ORDER BY id DESC LIMIT ?",
                (status, limit),
            )
        return [InboxItem(**dict(row)) for row in rows]

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self.db.fetchall(
            "SELECT channel, status, COUNT(*) AS n FROM inbox GROUP BY channel, status"
        )
        return {(row["channel"], row["status"]): int(row["n"]) for row in rows}

    async def oldest_due_age(self) -> float | None:
        """Seconds the longest-waiting pending item has been due, or None."""
        row = await self.db.lookup_one(  # the first entry of inbox_due
            "SELECT MIN(next_attempt_at) AS due FROM inbox WHERE status = 'pending'"
        )
        if row is None or row["due"] is None:
            return None
        return max(0.0, time.time() - float(row["due"]))

    async def next_due_in(self) -> float | None:
        """Seconds until the next pending item is due (0 if one is due now), or None."""
        row = await self.db.lookup_one(  # the first entry of inbox_due
            "SELECT MIN(next_attempt_at) AS due FROM inbox WHERE status = 'pending'"
        )
        if row is None or row["due"] is None:
            return None
        return max(0.0, float(row["due"]) - time.time())

    # --- the worker's transitions --------------------------------------------------------

    async def recover(self, *, alive_since: float | None = None) -> int:
        """Make items a crash left ``processing`` due again; returns how many.

        ``alive_since=None``: every such item (one process uses the database, and it is
        starting). Else only those whose claimer was not seen since then (unix time), or
        that no claimer recorded: other live processes keep theirs."""
        values: tuple[object, ...] = (time.time(), now_iso())
        whose = ""
        if alive_since is not None:
            whose = (
                " AND (claimed_by IS NULL OR claimed_by NOT IN"
                " (SELECT id FROM workers WHERE seen_at >= ?))"
            )
            values += (alive_since,)
        return await self.db.write(
            lambda conn: (
                conn.execute(
                    "UPDATE inbox SET status = 'pending', next_attempt_at = ?, updated_at = ?,"
                    " claimed_by = NULL,"
                    " last_error = COALESCE(last_error, 'interrupted (service stopped)')"
                    " WHERE status = 'processing'" + whose,
                    values,
                ).rowcount
            )
        )

    async def heartbeat(self, worker_id: str) -> None:
        """Note that ``worker_id`` is alive now (see :meth:`recover`); forget workers gone
        for long."""
        now = time.time()

        def beat(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO workers (id, started_at, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                (worker_id, now_iso(), now),
            )
            conn.execute("DELETE FROM workers WHERE seen_at < ?", (now - FORGET_WORKERS_SECONDS,))

        await self.db.write(beat)

    async def leave(self, worker_id: str) -> None:
        """A worker that stopped: it holds nothing any more."""
        await self.db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    async def claim(
        self, limit: int, *, exclude: frozenset[int] = frozenset(), owner: str | None = None
    ) -> list[InboxItem]:
        """Take up to ``limit`` due items, longest due first (deliveries in the order they
        came), and mark them processing (each claim counts as an attempt).

        Ordered by (next_attempt_at, id), which the ``inbox_due`` index (status,
        next_attempt_at, and the rowid every index ends with) yields as it is: a claim reads
        only the rows it takes, however long the queue (ordering by id alone made SQLite
        sort every due row, each claim, so a backlog slowed its own draining).

        Several processes may claim at once (PostgreSQL, several app hosts): the engine's
        ``skip_locked`` clause makes each skip the rows another has locked, and the status
        is checked again by the UPDATE itself, so a delivery is claimed by one only.
        ``owner`` (the worker's id) is recorded, for :meth:`recover`.

        A conversation's deliveries (one ``lane``) are taken one at a time, in order, by
        whichever process: a delivery waits while an earlier one of its conversation is due
        (even if another process has it locked at this very moment) or being processed by
        another process. The worker that holds one may take the next ones (its own lane
        keeps them in order). An earlier delivery set back to be retried later does not hold
        the conversation up."""
        if limit <= 0:
            return []
        skip = ",".join(str(int(i)) for i in exclude) or "0"
        now = time.time()
        values = (now, now, owner or "", limit, owner, now_iso())
        # The due rows are chosen once (a materialized CTE): PostgreSQL would otherwise run
        # a locking subquery again for each row it updates, and each run, skipping the rows
        # this very statement had locked, would take the next ones, past the LIMIT.
        rows = await self.db.write(
            lambda conn: conn.execute(
                "WITH due AS MATERIALIZED (SELECT i.id FROM inbox i WHERE i.status = 'pending'"
                f" AND i.next_attempt_at <= ? AND i.id NOT IN ({skip})"
                " AND (i.lane IS NULL OR NOT EXISTS (SELECT 1 FROM inbox j"
                " WHERE j.lane = i.lane AND j.id < i.id"
                " AND j.status IN ('pending', 'processing')"
                " AND ((j.status = 'pending' AND j.next_attempt_at <= ?)"
                " OR (j.status = 'processing' AND COALESCE(j.claimed_by, '') <> ?))))"
                f" ORDER BY i.next_attempt_at, i.id LIMIT ?{self.db.skip_locked})"
                " UPDATE inbox SET status = 'processing', attempts = attempts + 1,"
                " claimed_by = ?, updated_at = ?"
                " WHERE status = 'pending' AND id IN (SELECT id FROM due)"
                f" RETURNING {_COLUMNS}",
                values,
            ).fetchall()
        )
        items = sorted((InboxItem(**dict(row)) for row in rows), key=lambda i: i.id)
        if owner is not None:
            self._held.update((item.id, owner) for item in items)
        return items

    async def release(self, item_ids: list[int]) -> None:
        """Give claimed items that were never started back: pending, due now, the claim's
        attempt returned (the worker stopped before their turn came)."""
        for item_id in item_ids:
            self._held.pop(item_id, None)
        marks = ",".join("?" * len(item_ids))
        values = (time.time(), now_iso(), *item_ids)
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE inbox SET status = 'pending', next_attempt_at = ?, updated_at = ?,"
                " claimed_by = NULL,"
                f" attempts = attempts - 1 WHERE status = 'processing' AND id IN ({marks})",
                values,
            )
        )

    async def _update(
        self, item_id: int, assignments: str, values: tuple[Any, ...], *, last: bool = False
    ) -> None:
        """``UPDATE inbox SET <assignments>`` of one item; fenced by this process's claim
        when it holds one (ClaimLost if it is gone). ``last``: the claim ends with it."""
        owner = self._held.get(item_id)
        if owner is None:
            await self.db.execute(
                f"UPDATE inbox SET {assignments} WHERE id = ?", (*values, item_id)
            )
            return
        changed = await self.db.execute(
            f"UPDATE inbox SET {assignments}"
            " WHERE id = ? AND status = 'processing' AND claimed_by = ?",
            (*values, item_id, owner),
        )
        if not changed or last:
            self._held.pop(item_id, None)
        if not changed:
            raise ClaimLost(item_id)

    async def _finish(
        self, item_id: int, status: str, *, result: str | None = None, error: str | None = None
    ) -> None:
        await self._update(
            item_id,
            "status = ?, updated_at = ?, result = COALESCE(?, result), last_error = ?",
            (status, now_iso(), result, error[:_ERROR_LIMIT] if error else None),
            last=True,
        )

    async def complete(self, item_id: int, result: str | None = None) -> None:
        await self._finish(item_id, "done", result=result)

    async def ignore(self, item_id: int, reason: str) -> None:
        await self._finish(item_id, "ignored", result=reason)

    async def fail(self, item_id: int, error: str) -> None:
        await self._finish(item_id, "failed", error=error)

    async def retry_later(
        self, item_id: int, delay: float, error: str, *, count_attempt: bool = True
    ) -> None:
        """Back to pending, due in ``delay`` seconds. ``count_attempt=False`` gives the
        attempt back: an outage of Claude delays a delivery but never uses it up."""
        await self._update(
            item_id,
            "status = 'pending', next_attempt_at = ?, updated_at = ?, last_error = ?,"
            " attempts = attempts - ?",
            (time.time() + delay, now_iso(), error[:_ERROR_LIMIT], 0 if count_attempt else 1),
            last=True,
        )

    async def retry(self, item_id: int) -> InboxItem | None:
        """Set a failed (or ignored) item back to pending, due now, with fresh attempts;
        the running service's worker picks it up. Returns the item, or None if unknown."""
        await self.db.execute(
            "UPDATE inbox SET status = 'pending', attempts = 0, next_attempt_at = ?,"
            " updated_at = ? WHERE id = ? AND status IN ('failed', 'ignored')",
            (time.time(), now_iso(), item_id),
        )
        return await self.get(item_id)

    # --- progress within an item ---------------------------------------------------------

    async def set_user_message(self, item_id: int, message_id: int) -> None:
        await self._update(item_id, "user_message_id = ?", (message_id,))

    async def set_reply_message(self, item_id: int, message_id: int) -> None:
        await self._update(item_id, "reply_message_id = ?", (message_id,))

    async def begin_send(self, item_id: int) -> float:
        """Note, durably, that the send of the next reply part begins now; returns the
        time noted."""
        now = time.time()
        await self._update(item_id, "sending_since = ?", (now,))
        return now

    async def end_send(self, item_id: int) -> None:
        """The send failed with a definite answer: the part was not sent."""
        await self._update(item_id, "sending_since = NULL", ())

    async def set_parts_sent(
        self,
        item_id: int,
        parts: int,
        result: str | None = None,
    ) -> None:
        """The platform accepted part ``parts`` (1-based): nothing is in flight."""
        await self._update(
            item_id,
            "parts_sent = ?, result = COALESCE(?, result), sending_since = NULL",
            (parts, result),
        )
