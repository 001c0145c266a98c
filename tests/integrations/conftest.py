"""Fixtures for the channel tests: the four platform stand-ins, and the real app with every
channel configured against them (fast retries, so failure paths run in milliseconds)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from digitalme.inbox import InboxItem
from digitalme.keys import INBOX
from standins.clickup_api import ClickUpStandin
from standins.github_api import GitHubStandin
from standins.platform import running
from standins.slack_api import SlackStandin
from standins.telegram_api import TelegramStandin
from tests.conftest import Service, ServiceFactory

TELEGRAM_TOKEN = "123456:TEST-telegram-bot-token"
TELEGRAM_SECRET = "telegram-secret_token-1"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TOKEN = "xoxb-test-slack-bot-token"
GITHUB_SECRET = "github-webhook-secret"
GITHUB_TOKEN = "ghp_testtoken"
GITHUB_HANDLE = "clone-bot"
CLICKUP_SECRET = "clickup-webhook-secret"
CLICKUP_TOKEN = "pk_test_clickup"
CLICKUP_LIST = "901"


@dataclass
class Platforms:
    telegram: TelegramStandin
    slack: SlackStandin
    github: GitHubStandin
    clickup: ClickUpStandin

    def settings(self) -> dict[str, Any]:
        return {
            "telegram_bot_token": TELEGRAM_TOKEN,
            "telegram_secret_token": TELEGRAM_SECRET,
            "telegram_api_base": self.telegram.base_url,
            "slack_signing_secret": SLACK_SECRET,
            "slack_bot_token": SLACK_TOKEN,
            "slack_api_base": self.slack.api_base,
            "github_webhook_secret": GITHUB_SECRET,
            "github_token": GITHUB_TOKEN,
            "github_api_base": self.github.base_url,
            "github_handle": GITHUB_HANDLE,
            "clickup_webhook_secret": CLICKUP_SECRET,
            "clickup_token": CLICKUP_TOKEN,
            "clickup_api_base": self.clickup.base_url,
            "clickup_list_id": CLICKUP_LIST,
        }


# The acknowledgement budget the tests hold every channel to while Claude takes 5 s: a third
# of Slack's 3 s deadline (the tightest), with room for a loaded CI machine; in practice an
# ack takes a few milliseconds (bench/webhook_bench.py).
ACK_BUDGET = 1.0

FAST = {
    "worker_poll_seconds": 0.1,
    "inbox_retry_base_seconds": 0.05,
    "inbox_retry_max_seconds": 0.5,
    "outbound_timeout_seconds": 2.0,
    "outbound_retries": 1,
    "rate_limit_per_minute": 0,
}


@pytest.fixture
async def platforms() -> AsyncIterator[Platforms]:
    async with (
        running(TelegramStandin(TELEGRAM_TOKEN)) as telegram,
        running(SlackStandin(SLACK_TOKEN)) as slack,
        running(GitHubStandin(GITHUB_TOKEN, GITHUB_HANDLE)) as github,
        running(ClickUpStandin(CLICKUP_TOKEN, (CLICKUP_LIST, "902"))) as clickup,
    ):
        yield Platforms(telegram, slack, github, clickup)


ChannelServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
def make_channel_service(
    make_service: ServiceFactory,
    platforms: Platforms,
) -> ChannelServiceFactory:
    """The app with every channel on (override any setting, e.g. one secret to None)."""

    async def make(**overrides: Any) -> Service:
        return await make_service(**{**platforms.settings(), **FAST, **overrides})

    return make


@pytest.fixture
async def channel_service(make_channel_service: ChannelServiceFactory) -> Service:
    return await make_channel_service()


async def post(
    service: Service,
    path: str,
    headers: dict[str, str],
    body: bytes,
) -> tuple[int, dict[str, Any], float]:
    """POST a delivery; (status, JSON body, seconds to the answer)."""
    started = time.monotonic()
    response = await service.client.post(path, data=body, headers=headers)
    elapsed = time.monotonic() - started
    payload = await response.json() if response.content_type == "application/json" else {}
    return response.status, payload, elapsed


async def wait_settled(
    service: Service, channel: str | None = None, *, timeout: float = 10.0
) -> list[InboxItem]:
    """Wait until no inbox item is pending or processing; return all items, oldest first."""
    inbox = service.app[INBOX]
    deadline = time.monotonic() + timeout
    while True:
        items = [
            i for i in await inbox.recent(limit=1000) if channel is None or i.channel == channel
        ]
        if all(i.status not in ("pending", "processing") for i in items):
            return sorted(items, key=lambda i: i.id)
        if time.monotonic() > deadline:
            raise TimeoutError(f"inbox not settled: {[i.to_json() for i in items]}")
        await asyncio.sleep(0.02)


async def wait_status(
    service: Service, item_id: int, *statuses: str, timeout: float = 10.0
) -> InboxItem:
    inbox = service.app[INBOX]
    deadline = time.monotonic() + timeout
    while True:
        item = await inbox.get(item_id)
        if item is not None and item.status in statuses:
            return item
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"item {item_id} never reached {statuses}: {item.to_json() if item else None}"
            )
        await asyncio.sleep(0.02)


async def metric_value(service: Service, line_prefix: str) -> float:
    text = await service.metrics_text()
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
