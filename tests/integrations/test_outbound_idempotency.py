"""Outbound idempotency: a reply part whose send was interrupted after the request went out
(the service killed, or a timeout) is sent once where the platform can say whether it
arrived (Slack: the thread, looked up by the metadata key each part carries), and sent
again, counted, where it cannot (Telegram's Bot API, Slack's response_url).

The crashes are real: the service process is SIGKILLed while the platform stand-in holds
back its answer to a reply part it has (or has not) taken in, then started again."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from digitalme.inbox import InboxItem
from digitalme.integrations.channel import split_text
from digitalme.integrations.slack import act as slack_act
from digitalme.integrations.telegram import act as telegram_act
from standins import signing
from standins.anthropic_api import AnthropicStandin, Reply
from standins.platform import Hold, Lose, PlatformStandin
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    SLACK_SECRET,
    SLACK_TOKEN,
    TELEGRAM_SECRET,
    TELEGRAM_TOKEN,
    ChannelServiceFactory,
    Platforms,
    metric_value,
    post,
    wait_settled,
)
from tests.support.process import ServiceProcess, prepare_database, service_env

# A reply in two parts on both platforms (Slack cuts at 3,900 characters, Telegram 4,096).
LONG_REPLY = " ".join(["word"] * 1500)
PARTS = {
    "slack": split_text(LONG_REPLY, slack_act.MESSAGE_LIMIT),
    "telegram": split_text(LONG_REPLY, telegram_act.MESSAGE_LIMIT),
}
DM_TS = "1700000001.000100"


@pytest.fixture
async def released() -> AsyncIterator[asyncio.Event]:
    """The event a Lose waits for; set at the end so no stand-in handler is left waiting."""
    event = asyncio.Event()
    yield event
    event.set()


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def _env(tmp_path: Path, standin: AnthropicStandin, platforms: Platforms) -> dict[str, str]:
    env = service_env(
        tmp_path,
        anthropic_base_url=standin.base_url,
        DIGITALME_TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
        DIGITALME_TELEGRAM_SECRET_TOKEN=TELEGRAM_SECRET,
        DIGITALME_TELEGRAM_API_BASE=platforms.telegram.base_url,
        DIGITALME_SLACK_SIGNING_SECRET=SLACK_SECRET,
        DIGITALME_SLACK_BOT_TOKEN=SLACK_TOKEN,
        DIGITALME_SLACK_API_BASE=platforms.slack.api_base,
        DIGITALME_WORKER_POLL_SECONDS="0.2",
        DIGITALME_INBOX_RETRY_BASE_SECONDS="0.1",
        DIGITALME_INBOX_RETRY_MAX_SECONDS="0.5",
        DIGITALME_OUTBOUND_RETRIES="0",
        DIGITALME_MAX_TOKENS="4000",  # room for LONG_REPLY
        # Long enough that the part is still in flight when the test kills the service.
        DIGITALME_OUTBOUND_TIMEOUT_SECONDS="60",
    )
    prepare_database(env)
    return env


async def _deliver(base_url: str, channel: str) -> None:
    """One message that Claude answers in two parts."""
    if channel == "slack":
        headers, body = signing.slack_event(
            SLACK_SECRET,
            payloads.slack_event("Ev900", payloads.slack_dm("tell me everything", ts=DM_TS)),
        )
        path = "/webhooks/slack/events"
    else:
        headers, body = signing.telegram(
            TELEGRAM_SECRET, payloads.telegram_message(900, "tell me everything")
        )
        path = "/webhooks/telegram"
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base_url}{path}", data=body, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()


def _accepted(platforms: Platforms, channel: str) -> list[str]:
    """The texts of the reply parts the platform accepted, in order."""
    if channel == "slack":
        return [b["text"] for b in platforms.slack.posted]
    return [b["text"] for b in platforms.telegram.sent]


def _standin(platforms: Platforms, channel: str) -> PlatformStandin:
    return platforms.slack if channel == "slack" else platforms.telegram


@pytest.mark.parametrize(
    ("channel", "arrived", "copies"),
    [
        ("slack", True, 1),  # found in the thread: not sent again
        ("slack", False, 1),  # not in the thread: sent
        ("telegram", False, 1),  # the stand-in refused it: sent once
        ("telegram", True, 2),  # the Bot API cannot say: sent again, it shows twice
    ],
)
async def test_killed_with_a_reply_part_in_flight(
    tmp_path: Path,
    standin: AnthropicStandin,
    platforms: Platforms,
    released: asyncio.Event,
    channel: str,
    arrived: bool,
    copies: int,
) -> None:
    env = _env(tmp_path, standin, platforms)
    assert len(PARTS[channel]) == 2
    standin.script(Reply(text=LONG_REPLY))
    passed = asyncio.Event()
    passed.set()
    # Part one goes through; part two is taken in (or refused) but never answered.
    _standin(platforms, channel).script(Hold(passed), Lose(released, accept=arrived))
    service = ServiceProcess(env, tmp_path)
    await service.start_async()
    try:
        await _deliver(service.base_url, channel)
        platform = _standin(platforms, channel)
        await platform.wait_for(lambda: len(platform.requests) == 2)
        # The part's send was recorded before its request: that is what the restart sees.
        [(parts_sent, in_flight)] = _rows(
            service.db_path, "SELECT parts_sent, sending_since FROM inbox"
        )
        assert parts_sent == 1 and in_flight is not None
        assert service.kill() == -signal.SIGKILL
        released.set()

        await service.start_async()
        deadline = asyncio.get_running_loop().time() + 15
        while _rows(service.db_path, "SELECT status FROM inbox") != [("done",)]:
            assert asyncio.get_running_loop().time() < deadline, service.log_text()[-3000:]
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        first, second = PARTS[channel]
        assert _accepted(platforms, channel) == [first] + [second] * copies
        assert _rows(service.db_path, "SELECT parts_sent, sending_since FROM inbox") == [(2, None)]
        assert len(standin.message_requests) == 1  # Claude was asked once
        log = service.log_text()
        if channel == "slack":
            # Asked once after the restart; each part is in the thread once, by its key.
            assert len(platforms.slack.lookups) == 1
            [thread] = platforms.slack.threads.values()
            keys = [m["metadata"]["event_payload"]["key"] for m in thread]
            assert keys == ["Ev900:0", "Ev900:1"]
            assert ("an earlier send had arrived" in log) == arrived
        else:
            assert "may show twice" in log
    finally:
        released.set()
        await service.stop_async()


async def test_a_slack_part_whose_answer_timed_out_is_found_not_resent(
    make_channel_service: ChannelServiceFactory, platforms: Platforms, released: asyncio.Event
) -> None:
    """No crash: the answer to a part Slack took in never comes (a timeout), and the retry
    finds the part in the thread instead of posting it again."""
    service = await make_channel_service(outbound_timeout_seconds=1.0, outbound_retries=1)
    platforms.slack.script(Lose(released))
    status, _, _ = await post(
        service,
        "/webhooks/slack/events",
        *signing.slack_event(
            SLACK_SECRET, payloads.slack_event("Ev901", payloads.slack_dm("hi", ts=DM_TS))
        ),
    )
    assert status == 200
    [item] = await wait_settled(service)
    assert item.status == "done", item.to_json()
    assert len(platforms.slack.posted) == 1
    [thread] = platforms.slack.threads.values()
    assert len(thread) == 1 and len(platforms.slack.lookups) == 1
    assert (
        await metric_value(
            service, 'digitalme_outbound_reconciled_total{result="found",service="slack"}'
        )
        == 1
    )


async def _deliver_in_process(
    service: Service, path: str, headers: dict[str, str], body: bytes
) -> InboxItem:
    status, _, _ = await post(service, path, headers, body)
    assert status == 200
    [item] = await wait_settled(service)
    return item


async def test_without_history_scopes_a_slack_part_is_sent_again_and_counted(
    make_channel_service: ChannelServiceFactory, platforms: Platforms, released: asyncio.Event
) -> None:
    service = await make_channel_service(outbound_timeout_seconds=1.0, outbound_retries=1)
    platforms.slack.history_scope = False
    platforms.slack.script(Lose(released))
    item = await _deliver_in_process(
        service,
        "/webhooks/slack/events",
        *signing.slack_event(
            SLACK_SECRET, payloads.slack_event("Ev902", payloads.slack_dm("hi", ts=DM_TS))
        ),
    )
    assert item.status == "done", item.to_json()
    assert len(platforms.slack.posted) == 2  # the platform would not say: it shows twice
    assert len(platforms.slack.lookups) == 1  # asked; Slack answered missing_scope
    assert (
        await metric_value(
            service, 'digitalme_outbound_reconciled_total{result="unknowable",service="slack"}'
        )
        == 1
    )


async def test_a_telegram_part_whose_answer_timed_out_is_sent_again_and_counted(
    make_channel_service: ChannelServiceFactory, platforms: Platforms, released: asyncio.Event
) -> None:
    service = await make_channel_service(outbound_timeout_seconds=1.0, outbound_retries=1)
    platforms.telegram.script(Lose(released))
    item = await _deliver_in_process(
        service,
        "/webhooks/telegram",
        *signing.telegram(TELEGRAM_SECRET, payloads.telegram_message(903, "hi")),
    )
    assert item.status == "done", item.to_json()
    assert len(platforms.telegram.sent) == 2
    assert (
        await metric_value(
            service, 'digitalme_outbound_reconciled_total{result="unknowable",service="telegram"}'
        )
        == 1
    )


async def test_a_refused_connection_is_retried_without_asking(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    """A request that never left (connection refused) is definitely not delivered: retried
    at once, nothing to reconcile."""
    service = await make_channel_service(
        telegram_api_base="http://127.0.0.1:9", outbound_retries=1, inbox_max_attempts=1
    )
    status, _, _ = await post(
        service,
        "/webhooks/telegram",
        *signing.telegram(TELEGRAM_SECRET, payloads.telegram_message(904, "hi")),
    )
    assert status == 200
    [item] = await wait_settled(service)
    assert item.status == "failed" and item.attempts == 1
    assert "ClientConnectorError" in (item.last_error or ""), item.last_error
    assert item.sending_since is None  # known not sent: nothing to ask next time
    assert await metric_value(service, "digitalme_outbound_reconciled_total{") == 0
