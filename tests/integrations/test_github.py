"""GitHub: X-Hub-Signature-256 verified, ping answered, events recorded as activity,
mentions of the clone's handle answered with one comment through the REST stand-in, and
redeliveries (same X-GitHub-Delivery) processed once."""

from __future__ import annotations

from typing import Any

from digitalme.keys import ACTIVITY
from standins import signing
from standins.anthropic_api import Slow
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    ACK_BUDGET,
    GITHUB_SECRET,
    ChannelServiceFactory,
    Platforms,
    post,
    wait_settled,
)

PATH = "/webhooks/github"
GITHUB_DEADLINE = 10.0


async def deliver(
    service: Service, event: str, payload: dict[str, Any], *, delivery: str | None = None
) -> tuple[int, dict[str, Any], float]:
    headers, body = signing.github(GITHUB_SECRET, event, payload, delivery=delivery)
    return await post(service, PATH, headers, body)


async def test_ping_is_answered(channel_service: Service) -> None:
    status, body, _ = await deliver(
        channel_service, "ping", {"zen": "Keep it logically awesome.", "hook_id": 42}
    )
    assert (status, body) == (200, {"status": "pong", "hook_id": 42})
    assert await wait_settled(channel_service) == []


async def test_events_are_recorded_as_activity(
    channel_service: Service, platforms: Platforms
) -> None:
    for event, payload in (
        ("issues", payloads.github_issues_opened()),
        ("push", payloads.github_push()),
        ("pull_request", payloads.github_pull_request("closed", merged=True)),
        ("issue_comment", payloads.github_comment("Looks good to me")),
    ):
        status, body, _ = await deliver(channel_service, event, payload)
        assert (status, body) == (202, {"status": "accepted"})
    status, _, _ = await deliver(
        channel_service, "star", {"action": "created", "repository": payloads.REPOSITORY}
    )
    assert status == 202
    items = await wait_settled(channel_service)
    assert [i.status for i in items] == ["done"] * 4 + ["ignored"]
    events = await channel_service.app[ACTIVITY].recent(days=3650, limit=10)
    summaries = sorted(e.summary for e in events)
    assert summaries == sorted(
        [
            'opened issue #7 "Flaky build on main" in acme/engine',
            "pushed 2 commit(s) to main in acme/engine: Fix the flaky build",
            'merged pull request #12 "Retry the flaky step" in acme/engine',
            'created a comment on issue #7 "Flaky build on main" in acme/engine: Looks good to me',
        ]
    )
    push = next(e for e in events if e.kind == "push")
    assert push.occurred_at == "2026-11-01T10:00:00.000Z"  # +01:00 normalised to UTC
    assert push.actor == "owner-login"
    assert platforms.github.requests == []  # no mention: no comment


async def test_a_mention_is_answered_with_one_comment(
    channel_service: Service, platforms: Platforms
) -> None:
    payload = payloads.github_comment("@clone-bot what is the plan for the release?")
    status, _, _ = await deliver(
        channel_service, "issue_comment", payload, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958"
    )
    assert status == 202
    [item] = await wait_settled(channel_service)
    assert item.status == "done", item.to_json()
    [posted] = platforms.github.posted
    [request] = [r for r in platforms.github.requests if r.method == "POST"]
    assert request.path == "/repos/acme/engine/issues/7/comments"
    assert request.headers["Authorization"] == "token ghp_testtoken"
    assert posted["body"].startswith("Stand-in reply to: ada mentioned you in a comment")
    assert posted["body"].endswith(
        "<!-- digitalme:delivery 72d3162e-cc78-11e3-81ab-4c9367dc0958 -->"
    )
    prompt = channel_service.standin.message_requests[0].body["messages"][-1]["content"]
    assert "issue #7" in prompt and "acme/engine" in prompt and "release?" in prompt


async def test_redelivery_is_processed_once(channel_service: Service, platforms: Platforms) -> None:
    payload = payloads.github_comment("@Clone-Bot ping me when it is fixed")
    delivery = "11111111-2222-3333-4444-555555555555"
    first, _, _ = await deliver(channel_service, "issue_comment", payload, delivery=delivery)
    await wait_settled(channel_service)
    again, body, _ = await deliver(channel_service, "issue_comment", payload, delivery=delivery)
    assert (first, again, body) == (202, 200, {"status": "duplicate"})
    assert len(await wait_settled(channel_service)) == 1
    assert len(platforms.github.posted) == 1
    assert len(await channel_service.app[ACTIVITY].recent(days=3650, limit=10)) == 1


async def test_no_answer_to_itself_edits_or_other_handles(
    channel_service: Service, platforms: Platforms
) -> None:
    await deliver(
        channel_service,
        "issue_comment",
        payloads.github_comment("As @clone-bot I said...", author="clone-bot", comment_id=1),
    )
    await deliver(
        channel_service,
        "issue_comment",
        payloads.github_comment("@clone-bot edited", action="edited", comment_id=2),
    )
    await deliver(
        channel_service,
        "issue_comment",
        payloads.github_comment("@clone-bot-2 and email x@clone-bot.io", comment_id=3),
    )
    items = await wait_settled(channel_service)
    assert [i.status for i in items] == ["done"] * 3
    assert platforms.github.posted == []
    assert channel_service.standin.message_requests == []


async def test_a_retry_finds_the_posted_comment_instead_of_posting_again(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    # GitHub stores the comment but its answer is lost (a 502 after the write): the retry
    # finds the hidden marker among the issue's comments and does not post again.
    service = await make_channel_service(outbound_retries=0)
    platforms.github.lose_answers = 1
    await deliver(
        service,
        "issue_comment",
        payloads.github_comment("@clone-bot status?"),
        delivery="99999999-0000-0000-0000-000000000001",
    )
    [item] = await wait_settled(service)
    assert item.status == "done", item.to_json()
    assert item.attempts == 2
    assert "already posted" in (item.result or "") or "comment" in (item.result or "")
    assert [(r.method, r.status) for r in platforms.github.requests] == [
        ("POST", 502),
        ("GET", 200),
    ]
    assert len(platforms.github.comments["acme/engine/7"]) == 1
    assert len(service.standin.message_requests) == 1  # the stored reply was reused


async def test_bad_signatures_and_malformed_deliveries(channel_service: Service) -> None:
    payload = payloads.github_issues_opened()
    headers, body = signing.github("wrong", "issues", payload)
    status, answer, _ = await post(channel_service, PATH, headers, body)
    assert (status, answer["error"]) == (401, "invalid_signature")
    headers, body = signing.github(GITHUB_SECRET, "issues", payload)
    legacy = {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}
    legacy["X-Hub-Signature"] = "sha1=" + "0" * 40  # the legacy header alone is refused
    status, _, _ = await post(channel_service, PATH, legacy, body)
    assert status == 401
    no_delivery = {k: v for k, v in headers.items() if k != "X-GitHub-Delivery"}
    status, answer, _ = await post(channel_service, PATH, no_delivery, body)
    assert (status, answer["error"]) == (400, "malformed_payload")
    headers, body = signing.github(GITHUB_SECRET, "issues", payload)
    headers["Content-Type"] = "text/plain"
    status, _, _ = await post(channel_service, PATH, headers, body)
    assert status == 400
    assert await wait_settled(channel_service) == []


async def test_ack_is_fast_while_claude_is_slow(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(claude_timeout_seconds=15)
    service.standin.script(Slow(5))
    status, _, elapsed = await deliver(
        service, "issue_comment", payloads.github_comment("@clone-bot slow one")
    )
    assert status == 202
    assert elapsed < ACK_BUDGET < GITHUB_DEADLINE
    await wait_settled(service, timeout=15)
    assert len(platforms.github.posted) == 1


async def test_without_a_token_mentions_are_recorded_not_answered(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(github_token=None)
    await deliver(service, "issue_comment", payloads.github_comment("@clone-bot hello"))
    [item] = await wait_settled(service)
    assert item.status == "done" and "DIGITALME_GITHUB_TOKEN" in (item.result or "")
    assert platforms.github.requests == []
    ready = await (await service.client.get("/health/ready")).json()
    assert "activity only" in ready["checks"]["github"]["detail"]
