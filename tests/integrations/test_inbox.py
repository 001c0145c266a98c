"""The durable inbox and its worker: a Claude outage delays but never loses or fails a
delivery; a service killed mid-processing finishes the work after restart without double
replies; `digitalme inbox list|retry` work against a running service; channels without a
secret are off; oversized, unsigned and abusive requests are refused and counted."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from digitalme.keys import INBOX, WORKER
from standins import signing
from standins.anthropic_api import AnthropicStandin, Error
from standins.platform import Fail
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    TELEGRAM_SECRET,
    TELEGRAM_TOKEN,
    ChannelServiceFactory,
    Platforms,
    metric_value,
    post,
    wait_settled,
    wait_status,
)
from tests.support import peek
from tests.support.process import ServiceProcess, prepare_database, run_cli, service_env

TELEGRAM = "/webhooks/telegram"

# The tests that build the app in this process (make_settings) run on both engines; those
# that run `digitalme serve` as a process use SQLite.
pytestmark = pytest.mark.both_engines


async def telegram(service: Service, update: dict[str, Any]) -> int:
    headers, body = signing.telegram(TELEGRAM_SECRET, update)
    status, _, _ = await post(service, TELEGRAM, headers, body)
    return status


# --- Claude outages ------------------------------------------------------------------------


async def test_claude_outage_delays_but_never_loses_or_fails(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(
        inbox_max_attempts=2, breaker_failure_threshold=1, breaker_reset_seconds=0.1
    )
    service.standin.fail_all(Error(status=529))
    assert await telegram(service, payloads.telegram_message(1, "anyone home?")) == 200
    # Many more attempts than inbox_max_attempts, and the item is still pending.
    await service.standin.wait_for_requests(4, timeout=10)
    [item] = await service.app[INBOX].recent(limit=1)
    assert item.status in ("pending", "processing")
    assert item.attempts <= 1
    assert platforms.telegram.sent == []
    service.standin.recover()
    [item] = await wait_settled(service, timeout=10)
    assert item.status == "done"
    [sent] = platforms.telegram.sent
    assert sent["text"] == "Stand-in reply to: anyone home?"
    # The message was stored once, however many times Claude was asked.
    rows = peek.rows(service.settings.database, "SELECT role, text FROM messages ORDER BY id")
    assert rows == [("user", "anyone home?"), ("assistant", "Stand-in reply to: anyone home?")]
    assert (
        await metric_value(
            service, 'digitalme_inbox_processed_total{channel="telegram",result="deferred"}'
        )
        >= 3
    )


# --- crash recovery with a real process ------------------------------------------------------


def _channel_env(
    tmp_path: Path,
    standin: AnthropicStandin,
    platforms: Platforms,
) -> dict[str, str]:
    env = service_env(
        tmp_path,
        anthropic_base_url=standin.base_url,
        DIGITALME_TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
        DIGITALME_TELEGRAM_SECRET_TOKEN=TELEGRAM_SECRET,
        DIGITALME_TELEGRAM_API_BASE=platforms.telegram.base_url,
        DIGITALME_WORKER_POLL_SECONDS="0.2",
        DIGITALME_INBOX_RETRY_BASE_SECONDS="0.1",
        DIGITALME_INBOX_RETRY_MAX_SECONDS="0.5",
        DIGITALME_OUTBOUND_RETRIES="0",
        DIGITALME_CLAUDE_TIMEOUT_SECONDS="60",
        DIGITALME_CLAUDE_DEADLINE_SECONDS="120",
    )
    prepare_database(env)
    return env


async def _deliver(base_url: str, update: dict[str, Any]) -> int:
    headers, body = signing.telegram(TELEGRAM_SECRET, update)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base_url}{TELEGRAM}", data=body, headers=headers) as response,
    ):
        return response.status


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def test_killed_mid_processing_finishes_after_restart_without_double_replies(
    tmp_path: Path, standin: AnthropicStandin, platforms: Platforms
) -> None:
    env = _channel_env(tmp_path, standin, platforms)
    service = ServiceProcess(env, tmp_path)
    await service.start_async()
    try:
        standin.set_delay(60)  # every delivery is inside its Claude call when we kill
        updates = [
            payloads.telegram_message(100 + n, f"question {n}", chat_id=500 + n) for n in range(3)
        ]
        for update in updates:
            assert await _deliver(service.base_url, update) == 200
        await standin.wait_for_requests(3, timeout=10)
        assert service.kill() == -signal.SIGKILL
        assert _rows(service.db_path, "SELECT status FROM inbox") == [("processing",)] * 3
        assert platforms.telegram.sent == []

        standin.set_delay(0)
        await service.start_async()
        await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 3, timeout=15)
        # Telegram redelivers nothing we acknowledged; a stray redelivery is a no-op.
        assert await _deliver(service.base_url, updates[0]) == 200
        await asyncio.sleep(0.5)
        assert sorted(m["chat_id"] for m in platforms.telegram.sent) == [500, 501, 502]
        statuses = _rows(service.db_path, "SELECT status, attempts FROM inbox ORDER BY id")
        assert statuses == [("done", 2)] * 3
        # Each question stored once, each answered once.
        messages = _rows(service.db_path, "SELECT role, text FROM messages ORDER BY id")
        assert sorted(t for r, t in messages if r == "user") == [
            "question 0",
            "question 1",
            "question 2",
        ]
        assert len([r for r, _ in messages if r == "assistant"]) == 3
        assert "interrupted by a stop" in service.log_text()
    finally:
        await service.stop_async()


async def test_killed_after_the_reply_was_stored_sends_it_without_asking_claude_again(
    tmp_path: Path, standin: AnthropicStandin, platforms: Platforms
) -> None:
    env = _channel_env(tmp_path, standin, platforms)
    service = ServiceProcess(env, tmp_path)
    await service.start_async()
    try:
        platforms.telegram.fail_all(Fail(503))  # the reply is stored, sending keeps failing
        assert await _deliver(service.base_url, payloads.telegram_message(7, "hi")) == 200
        await platforms.telegram.wait_for(lambda: len(platforms.telegram.requests) >= 2)
        assert service.kill() == -signal.SIGKILL
        platforms.telegram.recover()
        await service.start_async()
        await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 1)
        await asyncio.sleep(0.5)
        assert len(platforms.telegram.sent) == 1
        assert len(standin.message_requests) == 1  # the stored reply was sent, not re-asked
    finally:
        await service.stop_async()


async def test_inbox_list_and_retry_work_against_the_running_service(
    tmp_path: Path, standin: AnthropicStandin, platforms: Platforms
) -> None:
    env = _channel_env(tmp_path, standin, platforms)
    service = ServiceProcess(env, tmp_path)
    await service.start_async()
    try:
        platforms.telegram.fail_all(Fail(403, body={"ok": False, "error_code": 403}))
        assert await _deliver(service.base_url, payloads.telegram_message(9, "hi")) == 200
        await platforms.telegram.wait_for(lambda: len(platforms.telegram.requests) == 1)
        await asyncio.sleep(0.3)
        listed = await asyncio.to_thread(run_cli, ["inbox", "list", "--status", "failed"], env)
        assert listed.returncode == 0, listed.stderr
        [header, line] = listed.stdout.strip().splitlines()
        assert header.split()[:4] == ["ID", "CHANNEL", "KIND", "STATUS"]
        assert line.split()[:5] == ["1", "telegram", "message", "failed", "1"]
        assert "HTTP 403" in line
        assert TELEGRAM_TOKEN not in listed.stdout

        platforms.telegram.recover()
        retried = await asyncio.to_thread(run_cli, ["inbox", "retry", "1"], env)
        assert retried.returncode == 0, retried.stderr
        assert "pending again" in retried.stdout
        await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 1)
        assert len(standin.message_requests) == 1

        again = await asyncio.to_thread(run_cli, ["inbox", "retry", "1"], env)
        assert again.returncode == 1 and "not failed" in again.stderr
        unknown = await asyncio.to_thread(run_cli, ["inbox", "retry", "99"], env)
        assert unknown.returncode == 1 and "no inbox item 99" in unknown.stderr
        everything = await asyncio.to_thread(run_cli, ["inbox", "list"], env)
        assert " done " in everything.stdout
    finally:
        await service.stop_async()


# --- channels that are off, and refusals -----------------------------------------------------


async def test_a_channel_without_its_secret_is_off(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(
        telegram_secret_token=None,
        slack_signing_secret=None,
        github_webhook_secret=None,
        clickup_webhook_secret=None,
    )
    for path in (
        "/webhooks/telegram",
        "/webhooks/slack/events",
        "/webhooks/slack/commands",
        "/webhooks/github",
        "/webhooks/clickup",
    ):
        response = await service.client.post(
            path,
            data=b"{}",
            headers={
                "Content-Type": "application/json",
                # Even a "valid-looking" header gets nowhere: there is nothing to compare with.
                "X-Telegram-Bot-Api-Secret-Token": "",
                "X-Signature": "",
            },
        )
        assert response.status == 404, path
        body = await response.json()
        assert body["error"] == "channel_not_configured"
        assert "is not set" in body["message"]
    ready = await service.client.get("/health/ready")
    body = await ready.json()
    assert ready.status == 200, body  # channels are not required
    checks = body["checks"]
    assert checks["telegram"] == {
        **checks["telegram"],
        "ok": True,
        "required": False,
        "detail": "off (DIGITALME_TELEGRAM_SECRET_TOKEN not set)",
    }
    assert checks["slack"]["detail"] == "off (DIGITALME_SLACK_SIGNING_SECRET not set)"
    assert checks["github"]["detail"] == "off (DIGITALME_GITHUB_WEBHOOK_SECRET not set)"
    assert checks["clickup"]["detail"] == "webhook off (DIGITALME_CLICKUP_WEBHOOK_SECRET not set)"
    assert checks["inbox"]["required"] is False
    assert await wait_settled(service) == []
    assert (
        await metric_value(
            service, 'digitalme_webhook_deliveries_total{channel="github",outcome="not_configured"}'
        )
        == 1
    )


async def test_configured_channels_missing_their_tokens_are_reported(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(telegram_bot_token=None, slack_bot_token=None)
    body = await (await service.client.get("/health/ready")).json()
    checks = body["checks"]
    assert checks["telegram"]["ok"] is False
    assert "DIGITALME_TELEGRAM_BOT_TOKEN is not set" in checks["telegram"]["detail"]
    assert checks["slack"]["ok"] is False
    assert checks["github"]["ok"] and "@clone-bot" in checks["github"]["detail"]
    assert checks["inbox"] == {**checks["inbox"], "ok": True, "required": True}


async def test_oversized_bodies_are_413_json_and_counted(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(max_body_bytes=4096)
    update = payloads.telegram_message(1, "x" * 5000)
    status = await telegram(service, update)
    assert status == 413
    response = await service.client.post(
        TELEGRAM,
        data=json.dumps(update).encode(),
        headers={
            "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET,
            "Content-Type": "application/json",
        },
    )
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"
    assert (
        await metric_value(
            service, 'digitalme_webhook_deliveries_total{channel="telegram",outcome="too_large"}'
        )
        == 2
    )


async def test_valid_deliveries_are_not_rate_limited_but_forgeries_are(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(rate_limit_per_minute=5)
    for n in range(12):
        assert await telegram(service, payloads.telegram_message(100 + n, "hi")) == 200
    headers, body = signing.telegram("forged", payloads.telegram_message(1, "x"))
    statuses = [(await post(service, TELEGRAM, headers, body))[0] for _ in range(8)]
    assert statuses[:5] == [401] * 5
    assert set(statuses[5:]) == {429}
    # The address is now limited for everything under /webhooks/ until its bucket refills.
    assert await telegram(service, payloads.telegram_message(999, "late")) == 429


async def test_metrics_show_the_queue_and_latencies(channel_service: Service) -> None:
    await telegram(channel_service, payloads.telegram_message(1, "hello"))
    await wait_settled(channel_service)
    text = await channel_service.metrics_text()
    assert 'digitalme_inbox_items{channel="telegram",status="done"} 1.0' in text
    assert 'digitalme_webhook_deliveries_total{channel="telegram",outcome="accepted"} 1.0' in text
    assert 'digitalme_inbox_completion_seconds_count{channel="telegram"} 1.0' in text
    assert 'digitalme_inbox_attempt_duration_seconds_count{channel="telegram"} 1.0' in text
    assert 'digitalme_outbound_requests_total{service="telegram"} 1.0' in text


async def test_an_unknown_channel_item_waits_and_items_are_claimed_once(
    channel_service: Service,
) -> None:
    inbox = channel_service.app[INBOX]
    first = await inbox.ingest("telegram", "x1", "message", {}, ignored=True)
    again = await inbox.ingest("telegram", "x1", "message", {})
    assert (first.duplicate, again.duplicate, again.item_id) == (False, True, first.item_id)
    item = await wait_status(channel_service, first.item_id, "ignored")
    assert item.attempts == 0


# --- order within a conversation, concurrency across them ------------------------------------


async def test_a_conversation_is_answered_in_order_while_others_go_on(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(worker_concurrency=8)
    service.standin.set_delay(0.3)
    for n, (chat, text) in enumerate([(1, "a1"), (1, "a2"), (1, "a3"), (2, "b1")]):
        assert (
            await telegram(service, payloads.telegram_message(500 + n, text, chat_id=chat)) == 200
        )
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 4, timeout=15)
    sent = [
        (m["chat_id"], m["text"].removeprefix("Stand-in reply to: "))
        for m in platforms.telegram.sent
    ]
    assert [text for chat, text in sent if chat == 1] == ["a1", "a2", "a3"]
    # Chat 2 did not wait for chat 1's queue: answered before chat 1's second reply.
    assert sent.index((2, "b1")) < sent.index((1, "a2"))
    # One Claude call at a time for chat 1, each seeing the turns before it.
    calls = [
        r
        for r in service.standin.message_requests
        if r.body["messages"][-1]["content"].startswith("a")
    ]
    assert [len(r.body["messages"]) for r in calls] == [1, 3, 5]
    assert all(b.time - a.time >= 0.25 for a, b in itertools.pairwise(calls))
    items = await wait_settled(service)
    assert [(i.status, i.attempts) for i in items] == [("done", 1)] * 4


async def test_a_stop_gives_back_items_that_did_not_start(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(worker_concurrency=8)
    worker = service.app[WORKER]
    service.standin.set_delay(60)
    for n in range(3):
        assert (
            await telegram(service, payloads.telegram_message(700 + n, f"q{n}", chat_id=9)) == 200
        )
    await service.standin.wait_for_requests(1, timeout=10)
    await asyncio.sleep(0.2)
    assert worker.busy == 3  # one asking Claude, two waiting for their turn in chat 9
    await worker.stop(grace_seconds=0.1)
    items = await service.app[INBOX].recent(limit=10)
    by_text = {i.data["message"]["text"]: (i.status, i.attempts) for i in items}
    # The one cut off mid-call stays processing (recovered at the next start); the two
    # that never started are pending again with their attempt given back.
    assert by_text == {"q0": ("processing", 1), "q1": ("pending", 0), "q2": ("pending", 0)}
    service.standin.set_delay(0)
    await worker.start()
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) == 3, timeout=15)
    await asyncio.sleep(0.3)
    assert [m["text"] for m in platforms.telegram.sent] == [
        f"Stand-in reply to: q{n}" for n in range(3)
    ]
    assert [(i.status, i.attempts) for i in await wait_settled(service)] == [
        ("done", 2),
        ("done", 1),
        ("done", 1),
    ]


async def test_the_worker_backs_off_while_requests_keep_the_loop_busy(
    channel_service: Service,
) -> None:
    worker = channel_service.app[WORKER]
    assert worker.slots == channel_service.settings.worker_concurrency == 16
    # The policy: halve while the loop is late and requests come, down to none; one back
    # when it is prompt, or when nobody waits (a busy machine, or the worker itself).
    for _ in range(4):
        worker.adjust(0.03, requests=12)
    assert worker.slots == 1
    worker.adjust(0.03, requests=12)
    worker.adjust(0.03, requests=12)
    assert worker.slots == 0
    worker.adjust(0.03, requests=0)
    worker.adjust(0.03, requests=0)
    worker.adjust(0.001, requests=40)
    worker.adjust(0.01, requests=40)  # neither late nor prompt: unchanged
    assert worker.slots == 3
    # The gauge says so (or one more, if the probe found the loop prompt meanwhile).
    assert await metric_value(channel_service, "digitalme_inbox_worker_slots") in (3, 4)
    await asyncio.sleep(1.2)  # the probe, on a prompt loop: back to all of them
    assert worker.slots == 16

    # The probe itself: the loop held 100 ms at a time while requests keep coming.
    seen = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.1)
        await channel_service.client.get("/health")
        seen.append(worker.slots)
    assert min(seen) < 16, seen
