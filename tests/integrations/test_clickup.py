"""ClickUp: X-Signature verified, task events recorded as activity (deduplicated on history
item ids, or a body hash), the activity digest reaching Claude after the persona, and the
create-task tool: only in the configured list, within the daily limit, once per request."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from digitalme.activity import digest_header
from digitalme.chat import estimate_tokens
from digitalme.keys import ACTIVITY, CHAT, INBOX
from standins import signing
from standins.anthropic_api import Reply
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    ACK_BUDGET,
    CLICKUP_SECRET,
    GITHUB_SECRET,
    ChannelServiceFactory,
    Platforms,
    post,
    wait_settled,
)

PATH = "/webhooks/clickup"
CLICKUP_DEADLINE = 7.0


async def deliver(
    service: Service,
    payload: dict[str, Any],
) -> tuple[int, dict[str, Any], float]:
    headers, body = signing.clickup(CLICKUP_SECRET, payload)
    return await post(service, PATH, headers, body)


async def test_task_events_are_recorded_once(
    channel_service: Service, platforms: Platforms
) -> None:
    platforms.clickup.tasks["86c00042"] = {"id": "86c00042", "name": "Ship the beta"}
    moved = payloads.clickup_event(
        "taskStatusUpdated",
        history=[
            payloads.clickup_history(
                "2800763136717140857", before={"status": "to do"}, after={"status": "in progress"}
            )
        ],
    )
    status, body, _ = await deliver(channel_service, moved)
    assert (status, body) == (200, {"status": "accepted"})
    await deliver(channel_service, moved)  # ClickUp's retry: same history item
    await deliver(channel_service, payloads.clickup_event("taskCreated", "86c00043"))
    await deliver(channel_service, payloads.clickup_event("taskCreated", "86c00043"))
    await deliver(channel_service, payloads.clickup_event("listCreated"))
    items = await wait_settled(channel_service)
    assert [(i.delivery_id, i.status) for i in items] == [
        ("history:2800763136717140857", "done"),
        (items[1].delivery_id, "done"),
        (items[2].delivery_id, "ignored"),
    ]
    assert items[1].delivery_id.startswith("sha256:")
    events = await channel_service.app[ACTIVITY].recent(days=1, limit=10)
    summaries = sorted(e.summary for e in events)
    assert summaries == [
        "created task 86c00043",
        'moved task "Ship the beta" (86c00042) from to do to in progress',
    ]
    assert {e.actor for e in events} == {"Owner", None}


async def test_bad_signature_is_401_and_malformed_is_400(channel_service: Service) -> None:
    headers, body = signing.clickup("wrong", payloads.clickup_event("taskCreated"))
    status, answer, _ = await post(channel_service, PATH, headers, body)
    assert (status, answer["error"]) == (401, "invalid_signature")
    del headers["X-Signature"]
    status, _, _ = await post(channel_service, PATH, headers, body)
    assert status == 401
    headers, body = signing.clickup(CLICKUP_SECRET, {"task_id": "1"})
    status, answer, _ = await post(channel_service, PATH, headers, body)
    assert (status, answer["error"]) == (400, "malformed_payload")
    assert await wait_settled(channel_service) == []


async def test_activity_digest_reaches_claude_after_the_persona(
    channel_service: Service, platforms: Platforms
) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    push = payloads.github_push("Speed up the importer")
    push["head_commit"]["timestamp"] = now
    headers, body = signing.github(GITHUB_SECRET, "push", push)
    await post(channel_service, "/webhooks/github", headers, body)
    await deliver(
        channel_service,
        payloads.clickup_event(
            "taskCreated", history=[payloads.clickup_history("1", field="task_creation")]
        ),
    )
    await wait_settled(channel_service)
    conversation = await channel_service.new_conversation()
    await channel_service.say(conversation, "What have you been up to?")
    system = channel_service.standin.message_requests[-1].body["system"]
    assert len(system) == 2
    assert "cache_control" in system[0]  # the persona, cached
    digest = system[1]
    assert "cache_control" not in digest  # changes with every event
    lines = digest["text"].splitlines()
    assert lines[0] == (
        "Recent activity of the person you speak for, from their GitHub and ClickUp "
        "(newest first, times in UTC). Use it as background when it is relevant; do not "
        "recite it unprompted."
    )
    assert digest_header(["GitHub"]).startswith(
        "Recent activity of the person you speak for, from their GitHub ("
    )
    assert lines[1].endswith("ClickUp by Owner: created task 86c00042")
    assert (
        "GitHub by owner-login: pushed 2 commit(s) to main in acme/engine: Speed up the "
        "importer" in lines[2]
    )


async def test_digest_is_bounded_and_deterministic(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(
        activity_digest_max_events=5, activity_digest_max_tokens=300
    )
    store = service.app[INBOX]
    activity = service.app[ACTIVITY]
    for n in range(30):
        ingested = await store.ingest("clickup", f"d{n}", "taskCreated", {}, ignored=True)
        await activity.record(
            "clickup",
            ingested.item_id,
            "taskCreated",
            f"created task number {n} " + "x" * 300,
            actor="Owner",
        )
    first = await activity.digest()
    assert first == await activity.digest()
    assert first is not None
    lines = first.splitlines()
    assert 1 < len(lines) < 6  # the token cap bites before the event cap
    assert lines[1].startswith("- ") and "created task number 29 " in lines[1]  # newest first
    assert all(len(line) < 300 for line in lines[1:])  # each summary is cut short
    assert sum(estimate_tokens(line) for line in lines) <= 300


async def test_claude_creates_a_task_in_the_configured_list_only(
    channel_service: Service, platforms: Platforms
) -> None:
    tool = {
        "name": "create_clickup_task",
        "input": {"name": "Review the Q3 roadmap", "description": "Asked by Ada"},
    }
    channel_service.standin.script(Reply(tool_use=tool), Reply(text="Done, it's tracked."))
    conversation = await channel_service.new_conversation()
    body = await channel_service.say(conversation, "Please remind the owner to review Q3")
    assert body["reply"]["text"] == "Done, it's tracked."
    [(list_id, task)] = platforms.clickup.created
    assert list_id == "901"
    assert task["name"] == "Review the Q3 roadmap"
    assert task["description"].startswith("Asked by Ada")
    assert [r.headers["Authorization"] for r in platforms.clickup.requests] == ["pk_test_clickup"]
    tools = channel_service.standin.message_requests[0].body["tools"]
    assert [t["name"] for t in tools] == ["create_clickup_task"]
    result = channel_service.standin.message_requests[1].body["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and "Created ClickUp task" in result["content"]
    # Claude has no way to name another list: the schema has no list, the URL is fixed.
    assert "list" not in tools[0]["input_schema"]["properties"]


async def test_the_tool_keeps_its_daily_limit_and_does_not_repeat(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    service = await make_channel_service(clickup_max_tasks_per_day=2)
    conversation = await service.new_conversation()
    for name in ("one", "two", "three", "two"):
        service.standin.script(
            Reply(tool_use={"name": "create_clickup_task", "input": {"name": name}}),
            Reply(text="ok"),
        )
        await service.say(conversation, f"task {name}")
    assert [t["name"] for _, t in platforms.clickup.created] == ["one", "two"]
    results = [
        r.body["messages"][-1]["content"][0]
        for r in service.standin.message_requests
        if r.body["messages"][-1]["role"] == "user"
        and isinstance(r.body["messages"][-1]["content"], list)
    ]
    assert results[2]["is_error"] is True and "daily limit of 2" in results[2]["content"]
    assert results[3]["is_error"] is False and "already created" in results[3]["content"]


async def test_no_tool_without_token_or_list(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(clickup_list_id=None)
    assert service.app[CHAT].tools == {}
    ready = await (await service.client.get("/health/ready")).json()
    assert "DIGITALME_CLICKUP_LIST_ID not set" in ready["checks"]["clickup"]["task_tool"]


async def test_ack_is_fast_while_claude_is_slow(
    make_channel_service: ChannelServiceFactory,
) -> None:
    service = await make_channel_service(claude_timeout_seconds=15)
    service.standin.set_delay(5)
    conversation = await service.new_conversation()
    chat = asyncio.create_task(service.say(conversation, "keep Claude busy"))
    await service.standin.wait_for_requests(1)
    status, _, elapsed = await deliver(service, payloads.clickup_event("taskCreated"))
    assert status == 200
    assert elapsed < ACK_BUDGET < CLICKUP_DEADLINE
    await chat
