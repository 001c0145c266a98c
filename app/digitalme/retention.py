"""Retention: finished deliveries and old activity, pruned on a schedule.

Every verified delivery stays in the inbox after it is answered (its id is what makes a
redelivery a no-op), and every GitHub or ClickUp event becomes a row of activity; without
pruning both grow for as long as the service runs. :class:`Retention` deletes, every
``DIGITALME_PRUNE_INTERVAL_MINUTES``:

1. activity whose event happened more than ``DIGITALME_ACTIVITY_RETENTION_DAYS`` ago (the
   digest never reads back further than ``DIGITALME_ACTIVITY_DIGEST_DAYS``);
2. deliveries that finished (``done`` or ``ignored``) more than
   ``DIGITALME_INBOX_RETENTION_DAYS`` ago, and ``failed`` ones after
   ``DIGITALME_INBOX_FAILED_RETENTION_DAYS``, except those an activity row still points at
   (``activity.inbox_id``): they go with their activity. ``pending`` and ``processing``
   deliveries are never touched, whatever their age: the status is checked by the delete
   itself, in the writer thread, so a delivery set back to pending meanwhile stays.

Messages are not pruned: a delivery points at its user message and reply
(``inbox.user_message_id``/``reply_message_id``), never the other way round, so deleting
a delivery leaves the conversation whole.

The deletes go through the group-commit writer like every write, :data:`BATCH_ROWS` rows
per job, found through an index oldest first (``inbox_finished``, ``activity_by_time``),
with a pause between jobs: the writer's other jobs (acknowledgements, the worker's steps,
chat turns) are committed between two batches and never wait for a whole prune.
SQLite reuses the pages deleted rows leave, so under a steady stream of deliveries the
file stops growing once the oldest rows start going (bench/retention_bench.py measures it).

What a deleted delivery means for deduplication: a platform that sends the same delivery
id again after its row is gone gets it processed, and answered, again. Hence the lower
bound of the inbox retention, above every platform's redelivery window
(docs/channels.md#retention-and-redeliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import Settings
from .db import Database
from .engine import Connection
from .metrics import Metrics

log = logging.getLogger(__name__)

# Rows deleted per write job. A write queued behind a batch waits for it: 200 rows take
# about 10-20 ms in the writer thread on the (shared, 2-core) bench machine, as long as a
# group commit of a busy moment (bench/retention_bench.py).
BATCH_ROWS = 200
# Pause between two batches, so the writer commits what queued meanwhile on its own.
BATCH_PAUSE_SECONDS = 0.01
FIRST_RUN_DELAY_SECONDS = 60.0
DAY = 86400.0


def _iso(moment: float) -> str:
    """A unix time in the form the tables keep (ISO 8601, UTC, milliseconds)."""
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True)
class Pruned:
    """What one run deleted, and how long it took."""

    inbox: int
    activity: int
    batches: int
    seconds: float
    longest_batch_seconds: float  # one batch's time in the writer thread


def _delete_activity(cutoff: str, limit: int) -> tuple[str, tuple[object, ...]]:
    return (
        "DELETE FROM activity WHERE id IN (SELECT id FROM activity WHERE occurred_at < ?"
        " ORDER BY occurred_at LIMIT ?)",
        (cutoff, limit),
    )


def _delete_inbox(status: str, cutoff: str, limit: int) -> tuple[str, tuple[object, ...]]:
    # inbox_finished (status, updated_at) yields the oldest finished rows first; the status
    # is part of the statement, so a row that left it meanwhile is not deleted.
    return (
        "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE status = ?"
        " AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM activity"
        " WHERE activity.inbox_id = inbox.id) ORDER BY updated_at LIMIT ?)",
        (status, cutoff, limit),
    )


def _deleting(
    sql: str,
    params: tuple[object, ...],
) -> Callable[[Connection], tuple[int, float]]:
    """The write job of one batch: (rows deleted, seconds it took in the writer thread)."""

    def job(conn: Connection) -> tuple[int, float]:
        started = time.perf_counter()
        count = int(conn.execute(sql, params).rowcount)
        return count, time.perf_counter() - started

    return job


class Retention:
    """Owned by the app's cleanup context: :meth:`start` schedules runs, :meth:`stop` ends
    them (a run in progress stops between two batches). :meth:`prune` runs once (the
    ``digitalme inbox prune`` command and tests)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        *,
        batch_rows: int = BATCH_ROWS,
        batch_pause_seconds: float = BATCH_PAUSE_SECONDS,
    ) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.batch_pause_seconds = batch_pause_seconds
        self._task: asyncio.Task[None] | None = None
        # What a failed run raises: the engine's errors, or the file system's.
        self.errors: tuple[type[Exception], ...] = (*db.errors, OSError)

    async def start(self, first_run_delay: float | None = None) -> None:
        """Schedule runs: the first a minute after start (or one interval, if shorter),
        then every ``DIGITALME_PRUNE_INTERVAL_MINUTES``."""
        if first_run_delay is None:
            first_run_delay = min(
                FIRST_RUN_DELAY_SECONDS, self.settings.prune_interval_minutes * 60
            )
        self._task = asyncio.create_task(self._loop(first_run_delay), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = self.settings.prune_interval_minutes * 60
            try:
                pruned = await self.prune()
            except self.errors as exc:
                # e.g. the disk full: the next run tries again; nothing is half-deleted
                # (each batch is its own transaction).
                log.error(
                    "pruning old deliveries and activity failed: %s; trying again in %.0f minutes",
                    exc,
                    self.settings.prune_interval_minutes,
                )
                continue
            if pruned.inbox or pruned.activity:
                log.info(
                    "pruned %d deliveries and %d activity events in %d batches "
                    "(%.2fs; the longest batch held the writer %.1f ms)",
                    pruned.inbox,
                    pruned.activity,
                    pruned.batches,
                    pruned.seconds,
                    pruned.longest_batch_seconds * 1000,
                )

    def plan(self, now: float) -> list[tuple[str, str, str]]:
        """(table, status or '', cutoff) of each delete a run makes at ``now``, in order:
        activity first, so that the deliveries it held become prunable in the same run."""
        s = self.settings
        steps = []
        if s.activity_retention_days:
            steps.append(("activity", "", _iso(now - s.activity_retention_days * DAY)))
        if s.inbox_retention_days:
            cutoff = _iso(now - s.inbox_retention_days * DAY)
            steps += [("inbox", "done", cutoff), ("inbox", "ignored", cutoff)]
        if s.inbox_failed_retention_days:
            steps.append(("inbox", "failed", _iso(now - s.inbox_failed_retention_days * DAY)))
        return steps

    async def prune(self, now: float | None = None) -> Pruned:
        """Delete what is past its retention at ``now`` (default: the present), in
        batches; return the counts."""
        started = time.monotonic()
        moment = time.time() if now is None else now
        deleted = {"inbox": 0, "activity": 0}
        batches, longest = 0, 0.0
        for table, status, cutoff in self.plan(moment):
            while True:
                sql, params = (
                    _delete_activity(cutoff, self.batch_rows)
                    if table == "activity"
                    else _delete_inbox(status, cutoff, self.batch_rows)
                )
                count, took = await self.db.write(_deleting(sql, params))
                batches += 1
                longest = max(longest, took)
                deleted[table] += count
                if count:
                    self.metrics.retention_deleted.labels(table).inc(count)
                if count < self.batch_rows:
                    break
                await asyncio.sleep(self.batch_pause_seconds)
        self.metrics.retention_last_run.set(time.time())
        return Pruned(
            deleted["inbox"], deleted["activity"], batches, time.monotonic() - started, longest
        )
