"""Retention: finished deliveries and old activity are pruned, in batches between other
writes; unfinished deliveries, recent ones, deliveries an activity event still points at,
and conversations are kept; a redelivery is a no-op while its row is kept, and answered
again once the row is gone (the window docs/channels.md documents)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from digitalme.keys import DATABASE, INBOX, RETENTION
from digitalme.retention import DAY, Retention, _iso
from standins import signing
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    GITHUB_SECRET,
    TELEGRAM_SECRET,
    ChannelServiceFactory,
    Platforms,
    metric_value,
    post,
    wait_settled,
)
from tests.support import peek

pytestmark = pytest.mark.both_engines


async def telegram(service: Service, update: dict[str, Any]) -> int:
    headers, body = signing.telegram(TELEGRAM_SECRET, update)
    return (await post(service, "/webhooks/telegram", headers, body))[0]


async def github(service: Service, event: str, payload: dict[str, Any]) -> int:
    headers, body = signing.github(GITHUB_SECRET, event, payload)
    return (await post(service, "/webhooks/github", headers, body))[0]


def rows(db: peek.Target, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return peek.rows(db, sql, params)


def age(db: peek.Target, table: str, column: str, ids: list[int], days: float) -> None:
    """Make rows look ``days`` old (as if they had finished, or happened, back then)."""
    marks = ",".join("?" * len(ids))
    peek.rows(
        db,
        f"UPDATE {table} SET {column} = ? WHERE id IN ({marks})",
        (_iso(time.time() - days * DAY), *ids),
    )


async def test_old_finished_deliveries_and_activity_go_the_rest_stays(
    channel_service: Service, platforms: Platforms
) -> None:
    service, db = channel_service, channel_service.settings.database
    inbox = service.app[INBOX]
    s = service.settings
    assert (s.inbox_retention_days, s.inbox_failed_retention_days, s.activity_retention_days) == (
        14,
        30,
        30,
    )  # the defaults
    for n in range(4):
        assert await telegram(service, payloads.telegram_message(10 + n, f"q{n}")) == 200
    assert await github(service, "issues", payloads.github_issues_opened(number=1)) == 202
    assert await github(service, "issues", payloads.github_issues_opened(number=2)) == 202
    assert (
        await github(service, "star", {"action": "created", "repository": payloads.REPOSITORY})
        == 202
    )
    items = await wait_settled(service)
    by_kind = [(i.channel, i.status) for i in items]
    assert by_kind == [("telegram", "done")] * 4 + [("github", "done")] * 2 + [
        ("github", "ignored")
    ]
    t0, t1, t2, t3, issue1, issue2, star = (i.id for i in items)
    # Three more that are not finished, or failed, all of them old.
    pending = (await inbox.ingest("telegram", "p1", "message", {})).item_id
    processing = (await inbox.ingest("telegram", "p2", "message", {})).item_id
    failed = (await inbox.ingest("telegram", "f1", "message", {})).item_id
    failed_recent = (await inbox.ingest("telegram", "f2", "message", {})).item_id
    peek.rows(
        db,
        "UPDATE inbox SET status = 'processing', next_attempt_at = 1e12 WHERE id = ?",
        (processing,),
    )
    peek.rows(db, "UPDATE inbox SET next_attempt_at = 1e12 WHERE id = ?", (pending,))
    peek.rows(db, "UPDATE inbox SET status = 'failed' WHERE id IN (?, ?)", (failed, failed_recent))
    age(db, "inbox", "updated_at", [t0, t1, star, pending, processing], days=15)
    age(db, "inbox", "updated_at", [t2], days=13)  # within the retention
    age(db, "inbox", "updated_at", [issue1, issue2], days=40)
    activity = dict(rows(db, "SELECT inbox_id, id FROM activity"))
    age(db, "activity", "occurred_at", [activity[issue1]], days=31)
    age(db, "activity", "occurred_at", [activity[issue2]], days=1)
    age(db, "inbox", "updated_at", [failed], days=31)
    age(db, "inbox", "updated_at", [failed_recent], days=20)
    messages_before = rows(db, "SELECT id, role, text FROM messages ORDER BY id")

    pruned = await service.app[RETENTION].prune()

    kept = {row[0] for row in rows(db, "SELECT id FROM inbox")}
    # Gone: old done and ignored ones, the failed one past 30 days, and the GitHub event
    # whose activity went first.
    assert kept == {t2, t3, issue2, pending, processing, failed_recent}
    assert (pruned.inbox, pruned.activity) == (5, 1)
    # Issue 2's delivery stays, however old, while its activity event does.
    assert rows(db, "SELECT inbox_id FROM activity") == [(issue2,)]
    # Conversations are untouched: the pruned deliveries pointed at them, not the reverse.
    assert rows(db, "SELECT id, role, text FROM messages ORDER BY id") == messages_before
    assert len(messages_before) == 8
    assert await metric_value(service, 'digitalme_retention_deleted_rows_total{table="inbox"}') == 5
    assert (
        await metric_value(service, 'digitalme_retention_deleted_rows_total{table="activity"}') == 1
    )
    assert (
        abs(
            await metric_value(service, "digitalme_retention_last_run_timestamp_seconds")
            - time.time()
        )
        < 60
    )
    # A second run finds nothing more; the schema's foreign keys still hold.
    again = await service.app[RETENTION].prune()
    assert (again.inbox, again.activity) == (0, 0)
    assert peek.foreign_key_violations(db) == []


async def test_zero_keeps_everything(make_channel_service: ChannelServiceFactory) -> None:
    service = await make_channel_service(
        inbox_retention_days=0, inbox_failed_retention_days=0, activity_retention_days=0
    )
    assert await github(service, "issues", payloads.github_issues_opened()) == 202
    assert await telegram(service, payloads.telegram_message(1, "hi")) == 200
    await wait_settled(service)
    pruned = await service.app[RETENTION].prune(now=time.time() + 3650 * DAY)
    assert (pruned.inbox, pruned.activity) == (0, 0)
    assert len(rows(service.settings.database, "SELECT id FROM inbox")) == 2


async def test_a_redelivery_is_a_no_op_while_kept_and_answered_again_once_pruned(
    channel_service: Service, platforms: Platforms
) -> None:
    """What deduplication relies on: the delivery's row. While it is kept, the same
    update_id is acknowledged and dropped; once the prune deleted it, the same update is a
    new delivery. The inbox retention's floor (8 days) is above every platform's
    redelivery window, so only a redelivery no platform makes is answered twice."""
    service = channel_service
    update = payloads.telegram_message(77, "once?")
    assert await telegram(service, update) == 200
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 1)
    [item] = await wait_settled(service)
    assert await telegram(service, update) == 200
    await asyncio.sleep(0.3)
    assert len(platforms.telegram.sent) == 1
    assert (
        await metric_value(
            service, 'digitalme_webhook_deliveries_total{channel="telegram",outcome="duplicate"}'
        )
        == 1
    )
    # 13 days later it is still kept; 15 days later it is gone.
    assert (await service.app[RETENTION].prune(now=time.time() + 13 * DAY)).inbox == 0
    assert (await service.app[RETENTION].prune(now=time.time() + 15 * DAY)).inbox == 1
    assert await service.app[INBOX].get(item.id) is None
    assert await telegram(service, update) == 200
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 2)
    [again] = await wait_settled(service)
    # A new row (SQLite gave it the freed id: the newest rows were the pruned ones), whose
    # question was stored and answered again.
    assert again.delivery_id == item.delivery_id == "77" and again.status == "done"
    assert again.user_message_id is not None and item.user_message_id is not None
    assert again.user_message_id > item.user_message_id


async def test_batches_leave_the_writer_to_other_writes(channel_service: Service) -> None:
    """A prune of thousands of rows goes in batches, each its own short write: writes
    queued meanwhile are committed between two batches, long before the prune ends."""
    service, db = channel_service, channel_service.settings.database
    old = _iso(time.time() - 60 * DAY)
    peek.many(
        db,
        "INSERT INTO inbox (channel, delivery_id, kind, payload, status, next_attempt_at,"
        " received_at, updated_at) VALUES ('telegram', ?, 'message', ?, 'done', 0, ?, ?)",
        [(f"old-{n}", json.dumps({"update_id": n}), old, old) for n in range(3000)],
    )
    retention = Retention(
        service.app[DATABASE],
        service.settings,
        service.app[RETENTION].metrics,
        batch_rows=200,
        batch_pause_seconds=0.005,
    )
    inbox = service.app[INBOX]
    prune = asyncio.create_task(retention.prune())
    waits = []
    while not prune.done():
        started = time.monotonic()
        await inbox.ingest("telegram", f"new-{len(waits)}", "message", {}, ignored=True)
        waits.append(time.monotonic() - started)
        await asyncio.sleep(0.002)
    pruned = await prune
    # Done ones: 15 full batches and an empty one; one each for activity, ignored, failed.
    assert (pruned.inbox, pruned.batches) == (3000, 19)
    assert len(waits) >= 10, waits  # writes went through during the prune
    assert max(waits) < pruned.seconds / 3, (max(waits), pruned.seconds)
    assert rows(db, "SELECT count(*) FROM inbox WHERE delivery_id LIKE 'new-%'") == [(len(waits),)]


async def test_the_service_prunes_on_its_schedule(channel_service: Service) -> None:
    service = channel_service
    item = await service.app[INBOX].ingest("telegram", "ancient", "message", {}, ignored=True)
    age(service.settings.database, "inbox", "updated_at", [item.item_id], days=100)
    retention = service.app[RETENTION]
    await retention.stop()  # the app's, due a minute after start; now at once instead
    await retention.start(first_run_delay=0.05)
    deadline = time.monotonic() + 60  # a bound, not a timing: the suite runs beside it
    while await service.app[INBOX].get(item.item_id) is not None:
        assert time.monotonic() < deadline, "the scheduled prune did not run"
        await asyncio.sleep(0.05)
    assert await metric_value(service, "digitalme_retention_last_run_timestamp_seconds") > 0
