"""Slack: v0 signatures within the five-minute window, url_verification, direct messages
and mentions answered in thread through slack_sdk against the Web API stand-in, the bot's
own messages ignored, retries deduplicated on event_id, and the /digitalme command
acknowledged at once and answered through its response_url."""

from __future__ import annotations

import time
from typing import Any

from standins import signing
from standins.anthropic_api import Slow
from standins.platform import Fail
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    ACK_BUDGET,
    SLACK_SECRET,
    ChannelServiceFactory,
    Platforms,
    metric_value,
    post,
    wait_settled,
)

EVENTS = "/webhooks/slack/events"
COMMANDS = "/webhooks/slack/commands"
SLACK_DEADLINE = 3.0


async def event(
    service: Service,
    payload: dict[str, Any],
    **kwargs: Any,
) -> tuple[int, dict[str, Any], float]:
    headers, body = signing.slack_event(SLACK_SECRET, payload, **kwargs)
    return await post(service, EVENTS, headers, body)


async def command(
    service: Service,
    fields: dict[str, str],
    **kwargs: Any,
) -> tuple[int, dict[str, Any], float]:
    headers, body = signing.slack_command(SLACK_SECRET, fields, **kwargs)
    return await post(service, COMMANDS, headers, body)


async def test_url_verification_is_answered_at_once(channel_service: Service) -> None:
    status, body, _ = await event(
        channel_service,
        {
            "token": "x",
            "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
            "type": "url_verification",
        },
    )
    assert status == 200
    assert body == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    assert await wait_settled(channel_service) == []


async def test_direct_message_is_answered_in_thread(
    channel_service: Service, platforms: Platforms
) -> None:
    status, _, _ = await event(
        channel_service,
        payloads.slack_event(
            "Ev001", payloads.slack_dm("Can you review my PR?", ts="1700000001.000100")
        ),
    )
    assert status == 200
    [item] = await wait_settled(channel_service)
    assert item.status == "done", item.to_json()
    [posted] = platforms.slack.posted
    assert posted["channel"] == "D0DM"
    assert posted["thread_ts"] == "1700000001.000100"
    assert posted["text"] == "Stand-in reply to: Can you review my PR?"
    auth = [r.headers["Authorization"] for r in platforms.slack.requests]
    assert auth == ["Bearer xoxb-test-slack-bot-token"]


async def test_mention_in_a_channel_thread_is_answered_in_that_thread(
    channel_service: Service, platforms: Platforms
) -> None:
    await event(
        channel_service,
        payloads.slack_event(
            "Ev002",
            payloads.slack_mention(
                "what do you think?", ts="1700000009.000900", thread_ts="1700000005.000500"
            ),
        ),
    )
    await event(
        channel_service,
        payloads.slack_event(
            "Ev003",
            payloads.slack_mention(
                "and now?", ts="1700000010.001000", thread_ts="1700000005.000500"
            ),
        ),
    )
    await wait_settled(channel_service)
    assert [p["thread_ts"] for p in platforms.slack.posted] == ["1700000005.000500"] * 2
    # The mention is stripped; both turns are one conversation (the thread).
    second = channel_service.standin.message_requests[1].body["messages"]
    assert [m["content"] for m in second] == [
        "what do you think?",
        "Stand-in reply to: what do you think?",
        "and now?",
    ]


async def test_the_bots_own_and_other_bot_messages_are_ignored(
    channel_service: Service, platforms: Platforms
) -> None:
    await event(
        channel_service,
        payloads.slack_event("Ev010", payloads.slack_dm("my own reply", user=payloads.BOT_USER)),
    )
    await event(
        channel_service,
        payloads.slack_event("Ev011", payloads.slack_dm("another bot", bot_id="B0OTHER")),
    )
    await event(
        channel_service,
        payloads.slack_event("Ev012", payloads.slack_dm("edited", subtype="message_changed")),
    )
    await event(
        channel_service,
        payloads.slack_event(
            "Ev013", {**payloads.slack_dm("in a channel"), "channel_type": "channel"}
        ),
    )
    await event(
        channel_service,
        payloads.slack_event(
            "Ev014", {"type": "reaction_added", "user": "U0ADA", "reaction": "tada"}
        ),
    )
    items = await wait_settled(channel_service)
    assert [i.status for i in items] == ["ignored"] * 5
    assert [i.kind for i in items] == [
        "message.bot",
        "message.bot",
        "message.message_changed",
        "message.channel",
        "reaction_added",
    ]
    assert platforms.slack.posted == []
    assert channel_service.standin.message_requests == []


async def test_retries_are_deduplicated_on_event_id_not_the_retry_header(
    channel_service: Service, platforms: Platforms
) -> None:
    payload = payloads.slack_event("Ev020", payloads.slack_dm("hello?"))
    await event(channel_service, payload)
    await event(channel_service, payload, retry_num=1)
    await event(channel_service, payload, retry_num=2)
    # A different event with no retry header is still its own delivery.
    await event(
        channel_service,
        payloads.slack_event("Ev021", payloads.slack_dm("second", ts="1700000003.000300")),
    )
    items = await wait_settled(channel_service)
    assert [i.delivery_id for i in items] == ["Ev020", "Ev021"]
    assert len(platforms.slack.posted) == 2
    assert len(channel_service.standin.message_requests) == 2


async def test_bad_and_stale_signatures_are_401(channel_service: Service) -> None:
    payload = payloads.slack_event("Ev030", payloads.slack_dm("forged"))
    headers, body = signing.slack_event("not-the-secret", payload)
    status, answer, _ = await post(channel_service, EVENTS, headers, body)
    assert (status, answer["error"]) == (401, "invalid_signature")
    headers, body = signing.slack_event(SLACK_SECRET, payload)
    status, _, _ = await post(channel_service, EVENTS, headers, body + b" ")  # body changed
    assert status == 401
    headers, body = signing.slack_event(SLACK_SECRET, payload, timestamp=time.time() - 301)
    status, answer, _ = await post(channel_service, EVENTS, headers, body)
    assert (status, answer["error"]) == (401, "stale_timestamp")
    headers, body = signing.slack_event(SLACK_SECRET, payload, timestamp=time.time() + 301)
    status, answer, _ = await post(channel_service, EVENTS, headers, body)
    assert (status, answer["error"]) == (401, "stale_timestamp")
    # Within the window is fine.
    headers, body = signing.slack_event(SLACK_SECRET, payload, timestamp=time.time() - 250)
    status, _, _ = await post(channel_service, EVENTS, headers, body)
    assert status == 200
    response = await channel_service.client.post(EVENTS, json=payload)  # unsigned
    assert response.status == 401
    fields = payloads.slack_command("hi", "https://hooks.slack.com/commands/1/2/3")
    headers, body = signing.slack_command(SLACK_SECRET, fields, timestamp=time.time() - 600)
    status, answer, _ = await post(channel_service, COMMANDS, headers, body)
    assert (status, answer["error"]) == (401, "stale_timestamp")
    assert (
        await metric_value(
            channel_service,
            'digitalme_webhook_deliveries_total{channel="slack",outcome="stale_timestamp"}',
        )
        == 3
    )
    assert (
        await metric_value(
            channel_service,
            'digitalme_webhook_deliveries_total{channel="slack",outcome="bad_signature"}',
        )
        == 3
    )
    assert len(await wait_settled(channel_service)) == 1


async def test_malformed_events_are_400(channel_service: Service) -> None:
    for payload in (
        {"type": "event_callback", "event": {"type": "message"}},
        {"type": "event_callback", "event_id": "Ev1", "event": "text"},
        {"type": "url_verification"},
    ):
        status, answer, _ = await event(channel_service, payload)
        assert status == 400, payload
        assert answer["error"] == "malformed_payload"
    headers, _ = signing.slack_event(SLACK_SECRET, {})
    headers["X-Slack-Signature"] = signing.slack_signature(
        SLACK_SECRET, headers["X-Slack-Request-Timestamp"], b"{not json"
    )
    status, answer, _ = await post(channel_service, EVENTS, headers, b"{not json")
    assert (status, answer["error"]) == (400, "invalid_json")


async def test_slash_command_acks_at_once_and_answers_through_response_url(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(claude_timeout_seconds=15)
    service.standin.script(Slow(5, then=None))
    fields = payloads.slack_command("summarise my week", platforms.slack.response_url("c1"))
    status, body, elapsed = await command(service, fields)
    assert status == 200
    assert body["response_type"] == "ephemeral" and "Thinking" in body["text"]
    assert elapsed < ACK_BUDGET < SLACK_DEADLINE
    [item] = await wait_settled(service, timeout=15)
    assert item.status == "done"
    [response] = platforms.slack.responses
    assert response == {
        "response_type": "ephemeral",
        "replace_original": False,
        "text": "Stand-in reply to: summarise my week",
    }
    # A repeated trigger (same trigger_id) is not answered twice.
    await command(service, fields)
    assert len(await wait_settled(service)) == 1
    assert len(platforms.slack.responses) == 1


async def test_slash_command_help_and_foreign_response_url(
    channel_service: Service, platforms: Platforms
) -> None:
    fields = payloads.slack_command("", platforms.slack.response_url())
    status, body, _ = await command(channel_service, fields)
    assert status == 200 and "/digitalme" in body["text"]
    fields = payloads.slack_command("hi", "https://evil.example/steal")
    status, body, _ = await command(channel_service, fields)
    assert status == 400 and "response_url" in body["message"]
    assert await wait_settled(channel_service) == []


async def test_acks_stay_fast_while_claude_is_slow(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(claude_timeout_seconds=15, worker_concurrency=2)
    service.standin.set_delay(5)
    timings = []
    for n in range(6):
        status, _, elapsed = await event(
            service,
            payloads.slack_event(
                f"Ev1{n:02d}",
                payloads.slack_dm(f"slow {n}", ts=f"17000001{n:02d}.000100", channel=f"D0DM{n}"),
            ),
        )
        assert status == 200
        timings.append(elapsed)
    assert max(timings) < ACK_BUDGET, timings
    service.standin.set_delay(0)


async def test_429_from_slack_is_retried_after_its_retry_after(
    channel_service: Service, platforms: Platforms
) -> None:
    platforms.slack.script(Fail(429, retry_after=0.3), Fail(503))
    await event(channel_service, payloads.slack_event("Ev040", payloads.slack_dm("hi")))
    [item] = await wait_settled(channel_service)
    assert item.status == "done"
    assert [r.status for r in platforms.slack.requests] == [429, 503, 200]
    assert platforms.slack.requests[1].time - platforms.slack.requests[0].time >= 0.3
    assert len(channel_service.standin.message_requests) == 1


async def test_invalid_bot_token_fails_the_item_with_the_error(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(slack_bot_token="xoxb-wrong")
    await event(service, payloads.slack_event("Ev050", payloads.slack_dm("hi")))
    [item] = await wait_settled(service)
    assert item.status == "failed" and item.attempts == 1
    assert "invalid_auth" in (item.last_error or "")
