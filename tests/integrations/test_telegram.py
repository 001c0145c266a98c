"""Telegram: the secret-token header, text messages answered in their chat through the
Bot API stand-in, /start and /help, duplicates answered once, fast acks, and failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

from digitalme.keys import CONVERSATIONS
from standins import signing
from standins.anthropic_api import Slow
from standins.platform import Fail
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    ACK_BUDGET,
    TELEGRAM_SECRET,
    TELEGRAM_TOKEN,
    ChannelServiceFactory,
    Platforms,
    metric_value,
    post,
    wait_settled,
)
from tests.support.process import run_cli, service_env

PATH = "/webhooks/telegram"


async def deliver(
    service: Service, update: dict[str, object], secret: str = TELEGRAM_SECRET
) -> tuple[int, dict[str, object], float]:
    headers, body = signing.telegram(secret, update)
    return await post(service, PATH, headers, body)


async def test_a_text_message_is_answered_in_its_chat(
    channel_service: Service, platforms: Platforms
) -> None:
    status, body, _ = await deliver(
        channel_service,
        payloads.telegram_message(1001, "What are you working on?", chat_id=777, message_id=55),
    )
    assert (status, body) == (200, {})
    [item] = await wait_settled(channel_service)
    assert item.status == "done", item.to_json()
    [sent] = platforms.telegram.sent
    assert sent["chat_id"] == 777
    assert sent["text"] == "Stand-in reply to: What are you working on?"
    assert sent["reply_parameters"]["message_id"] == 55
    # Claude saw the persona and the message, and the turn is stored in the chat's
    # conversation with Telegram's message id.
    [call] = channel_service.standin.message_requests
    assert call.body["messages"][-1]["content"] == "What are you working on?"
    conversation = await channel_service.app[CONVERSATIONS].get_or_create("telegram", "777")
    stored = await channel_service.app[CONVERSATIONS].messages(conversation.id)
    assert [(m.role, m.text) for m in stored] == [
        ("user", "What are you working on?"),
        ("assistant", "Stand-in reply to: What are you working on?"),
    ]
    assert stored[0].channel_message_id == "55"


async def test_start_and_help_answer_without_claude(
    channel_service: Service, platforms: Platforms
) -> None:
    await deliver(channel_service, payloads.telegram_message(2001, "/start"))
    await deliver(channel_service, payloads.telegram_message(2002, "/help@CloneBot"))
    await wait_settled(channel_service)
    texts = [m["text"] for m in platforms.telegram.sent]
    assert len(texts) == 2
    assert all("digital clone of" in t and "/help" in t for t in texts)
    assert channel_service.standin.message_requests == []


async def test_duplicate_update_is_answered_once(
    channel_service: Service, platforms: Platforms
) -> None:
    update = payloads.telegram_message(3001, "Hello twice")
    results = await asyncio.gather(*(deliver(channel_service, update) for _ in range(3)))
    assert [r[0] for r in results] == [200, 200, 200]
    await wait_settled(channel_service)
    await deliver(channel_service, update)  # a late redelivery
    items = await wait_settled(channel_service)
    assert len(items) == 1
    assert len(platforms.telegram.sent) == 1
    assert len(channel_service.standin.message_requests) == 1
    assert (
        await metric_value(
            channel_service,
            'digitalme_webhook_deliveries_total{channel="telegram",outcome="duplicate"}',
        )
        == 3
    )


async def test_wrong_or_missing_secret_is_401_and_stores_nothing(
    channel_service: Service,
    platforms: Platforms,
) -> None:
    update = payloads.telegram_message(4001, "let me in")
    status, body, _ = await deliver(channel_service, update, secret="wrong")
    assert status == 401 and body["error"] == "invalid_secret_token"
    response = await channel_service.client.post(PATH, json=update)
    assert response.status == 401
    assert await wait_settled(channel_service) == []
    assert (
        await metric_value(
            channel_service,
            'digitalme_webhook_deliveries_total{channel="telegram",outcome="bad_signature"}',
        )
        == 2
    )


async def test_malformed_updates_are_400(channel_service: Service) -> None:
    headers, _ = signing.telegram(TELEGRAM_SECRET, {})
    for body in (b"not json", b"[1, 2]", b'{"update_id": "7"}', b'{"message": {}}'):
        status, answer, _ = await post(channel_service, PATH, headers, body)
        assert status == 400, body
        assert answer["error"] in ("invalid_json", "malformed_payload")


async def test_updates_without_text_and_bot_messages_are_recorded_but_not_answered(
    channel_service: Service, platforms: Platforms
) -> None:
    sticker = payloads.telegram_message(5001, "x")
    del sticker["message"]["text"]  # type: ignore[attr-defined]
    await deliver(channel_service, sticker)
    await deliver(channel_service, payloads.telegram_message(5002, "beep", is_bot=True))
    await deliver(channel_service, {"update_id": 5003, "edited_message": {}})
    items = await wait_settled(channel_service)
    assert [i.status for i in items] == ["ignored"] * 3
    assert platforms.telegram.sent == []


async def test_slow_claude_does_not_slow_the_acknowledgement(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    channel_service = await make_channel_service(claude_timeout_seconds=15)
    channel_service.standin.script(Slow(5), Slow(5), Slow(5))
    timings = []
    for n in range(3):
        status, _, elapsed = await deliver(
            channel_service, payloads.telegram_message(6000 + n, f"slow {n}", chat_id=n)
        )
        assert status == 200
        timings.append(elapsed)
    assert max(timings) < ACK_BUDGET, timings  # Telegram waits ~60 s; we answer in milliseconds
    await channel_service.standin.wait_for_requests(3)
    await wait_settled(channel_service, timeout=15)
    assert len(platforms.telegram.sent) == 3


async def test_429_with_retry_after_then_success(
    channel_service: Service, platforms: Platforms
) -> None:
    platforms.telegram.script(Fail(429, retry_after=0.3))
    await deliver(channel_service, payloads.telegram_message(7001, "rate limited?"))
    [item] = await wait_settled(channel_service)
    assert item.status == "done"
    calls = [r for r in platforms.telegram.requests if r.path.endswith("/sendMessage")]
    assert [r.status for r in calls] == [429, 200]
    assert calls[1].time - calls[0].time >= 0.3  # Retry-After was honoured
    assert len(channel_service.standin.message_requests) == 1


async def test_outbound_outage_retries_with_the_stored_reply_then_fails_visibly(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(inbox_max_attempts=3)
    platforms.telegram.fail_all(Fail(502))
    await deliver(service, payloads.telegram_message(8001, "is anyone there?"))
    [item] = await wait_settled(service)
    assert item.status == "failed"
    assert item.attempts == 3
    assert "gave up after 3 attempts" in (item.last_error or "")
    assert "HTTP 502" in (item.last_error or "")
    assert TELEGRAM_SECRET not in (item.last_error or "")
    # Claude was asked once: every retry reused the stored reply.
    assert len(service.standin.message_requests) == 1
    assert platforms.telegram.sent == []
    assert (
        await metric_value(
            service, 'digitalme_outbound_errors_total{kind="server_error",service="telegram"}'
        )
        >= 3
    )


async def test_a_permanent_error_fails_at_once(
    channel_service: Service, platforms: Platforms
) -> None:
    platforms.telegram.script(Fail(403))  # e.g. the user blocked the bot
    await deliver(channel_service, payloads.telegram_message(9001, "hi"))
    [item] = await wait_settled(channel_service)
    assert item.status == "failed" and item.attempts == 1
    assert "HTTP 403" in (item.last_error or "")


async def test_bot_token_never_appears_in_errors(
    make_channel_service: ChannelServiceFactory,
) -> None:
    # Nothing listens on this port: a connection error whose text could carry the URL.
    service = await make_channel_service(
        telegram_api_base="http://127.0.0.1:9", inbox_max_attempts=1
    )
    await deliver(service, payloads.telegram_message(9101, "hi"))
    [item] = await wait_settled(service)
    assert item.status == "failed"
    assert "123456:TEST" not in (item.last_error or "")


async def test_set_webhook_registers_url_secret_and_update_types(
    tmp_path: Path, platforms: Platforms
) -> None:
    env = service_env(
        tmp_path,
        DIGITALME_TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
        DIGITALME_TELEGRAM_SECRET_TOKEN=TELEGRAM_SECRET,
        DIGITALME_TELEGRAM_API_BASE=platforms.telegram.base_url,
    )
    url = "https://clone.example.org/webhooks/telegram"
    result = await asyncio.to_thread(run_cli, ["telegram", "set-webhook", url], env)
    assert result.returncode == 0, result.stderr
    assert "webhook set to https://clone.example.org/webhooks/telegram" in result.stdout
    assert platforms.telegram.webhook == {
        "url": url,
        "secret_token": TELEGRAM_SECRET,
        "allowed_updates": ["message"],
    }
    assert TELEGRAM_SECRET not in result.stdout + result.stderr
    assert TELEGRAM_TOKEN not in result.stdout + result.stderr

    platforms.telegram.script(Fail(401))
    refused = await asyncio.to_thread(run_cli, ["telegram", "set-webhook", url], env)
    assert refused.returncode == 1
    assert "Telegram refused setWebhook" in refused.stderr and "Traceback" not in refused.stderr
    assert TELEGRAM_TOKEN not in refused.stderr

    del env["DIGITALME_TELEGRAM_BOT_TOKEN"]
    missing = await asyncio.to_thread(run_cli, ["telegram", "set-webhook", url], env)
    assert missing.returncode == 1
    assert "DIGITALME_TELEGRAM_BOT_TOKEN is not set" in missing.stderr
