"""Two app hosts on one PostgreSQL database, as several hosts behind Caddy run: deliveries
acknowledged by either are answered once each, by one host or the other; when a host dies
mid-reply, the other takes its deliveries over once its lease runs out and answers each
once. (Both hosts are apps in this process, each with its own connections.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from digitalme import inbox as inbox_module
from digitalme import worker as worker_module
from digitalme.keys import WORKER
from standins import signing
from standins.anthropic_api import Error
from tests.conftest import Service
from tests.integrations import payloads
from tests.integrations.conftest import (
    TELEGRAM_SECRET,
    ChannelServiceFactory,
    Platforms,
    post,
    wait_settled,
)
from tests.support import peek

pytestmark = pytest.mark.parametrize("db_engine", ["postgresql"], indirect=True)

DELIVERIES = 24


async def telegram(service: Service, update: dict[str, Any]) -> int:
    headers, body = signing.telegram(TELEGRAM_SECRET, update)
    return (await post(service, "/webhooks/telegram", headers, body))[0]


def replies(platforms: Platforms) -> list[str]:
    return sorted(str(m["text"]) for m in platforms.telegram.sent)


async def test_two_hosts_answer_each_delivery_once(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    hosts = [await make_channel_service(worker_concurrency=4) for _ in range(2)]
    for n in range(DELIVERIES):  # round robin, as Caddy spreads them
        update = payloads.telegram_message(2000 + n, f"q{n}", chat_id=900 + n)
        assert await telegram(hosts[n % 2], update) == 200
    await platforms.telegram.wait_for(
        lambda: len(platforms.telegram.sent) >= DELIVERIES, timeout=30
    )
    await asyncio.sleep(0.5)  # a second reply to any of them would have come by now
    assert replies(platforms) == sorted(f"Stand-in reply to: q{n}" for n in range(DELIVERIES))
    items = await wait_settled(hosts[0])
    assert [(i.status, i.attempts) for i in items] == [("done", 1)] * DELIVERIES
    owners = peek.rows(hosts[0].settings.database, "SELECT count(DISTINCT claimed_by) FROM inbox")
    assert owners == [(2,)], "one host did all the work: nothing was shared"


def said(request: Any) -> list[str]:
    """The texts of a Claude request's messages, in order."""
    texts = []
    for message in request.body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(block.get("text", "") for block in content if block["type"] == "text")
    return texts


async def test_a_conversations_deliveries_are_answered_in_order_across_hosts(
    make_channel_service: ChannelServiceFactory, platforms: Platforms
) -> None:
    """Messages of one chat, acknowledged by either host: each is answered after the one
    before it, whichever host takes it (never two of the chat at once, on two hosts), so
    each question reaches Claude with every earlier turn, and the replies come in order."""
    hosts = [await make_channel_service(worker_concurrency=4) for _ in range(2)]
    for host in hosts:
        host.standin.set_delay(0.2)  # one stand-in: both hosts' Claude
    count = 6
    for n in range(count):
        update = payloads.telegram_message(4000 + n, f"m{n}", chat_id=777)
        assert await telegram(hosts[n % 2], update) == 200
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) >= count, timeout=30)
    await asyncio.sleep(0.5)
    assert [m["text"] for m in platforms.telegram.sent] == [
        f"Stand-in reply to: m{n}" for n in range(count)
    ]
    asked = [said(r) for r in hosts[0].standin.message_requests]
    assert len(asked) == count
    for n, texts in enumerate(asked):
        assert texts[-1].endswith(f"m{n}"), texts
        for earlier in range(n):  # every earlier turn, question and answer, came before
            assert any(t.endswith(f"m{earlier}") for t in texts[:-1]), (n, texts)
            assert f"Stand-in reply to: m{earlier}" in texts, (n, texts)
    owners = peek.rows(hosts[0].settings.database, "SELECT count(DISTINCT claimed_by) FROM inbox")
    assert owners[0][0] >= 1


async def test_a_dead_hosts_deliveries_are_taken_over_and_answered_once(
    make_channel_service: ChannelServiceFactory,
    platforms: Platforms,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease = 0.6  # instead of 30 s; heartbeats every 0.2 s
    monkeypatch.setattr(inbox_module, "LEASE_SECONDS", lease)
    monkeypatch.setattr(worker_module, "LEASE_SECONDS", lease)
    dying, survivor = [await make_channel_service(worker_concurrency=4) for _ in range(2)]
    # The survivor takes nothing new for now: only the dying host claims.
    await survivor.app[WORKER].stop(grace_seconds=0)
    dying.standin.set_delay(60)  # every delivery is inside its Claude call when it dies
    for n in range(3):
        update = payloads.telegram_message(3000 + n, f"d{n}", chat_id=950 + n)
        assert await telegram(dying, update) == 200
    await dying.standin.wait_for_requests(3, timeout=10)
    # The host dies: its worker stops in its tracks, no sign-off, no heartbeat any more.
    worker = dying.app[WORKER]
    for task in [
        worker._loop_task,
        worker._probe_task,
        worker._lease_task,
        *worker._lane_tasks.values(),
    ]:
        if task is not None:
            task.cancel()
    await asyncio.sleep(0.1)
    assert peek.rows(
        dying.settings.database, "SELECT status, count(*) FROM inbox GROUP BY status"
    ) == [("processing", 3)]
    dying.standin.set_delay(0)
    await survivor.app[WORKER].start()  # a live host: it waits for the lease, then takes over
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) >= 3, timeout=15)
    await asyncio.sleep(0.5)
    assert replies(platforms) == [f"Stand-in reply to: d{n}" for n in range(3)]
    items = await wait_settled(survivor)
    assert [(i.status, i.attempts) for i in items] == [("done", 2)] * 3


async def test_a_host_that_stalls_past_its_lease_leaves_the_delivery_to_the_one_that_took_it(
    make_channel_service: ChannelServiceFactory,
    platforms: Platforms,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host whose heartbeat stops while it is inside a Claude call (its event loop
    stalled, say) loses the delivery to another host when its lease runs out; when its
    answer comes, it writes and sends nothing: the delivery is answered once, by the
    other."""
    lease = 0.6
    monkeypatch.setattr(inbox_module, "LEASE_SECONDS", lease)
    monkeypatch.setattr(worker_module, "LEASE_SECONDS", lease)
    stalled, other = [await make_channel_service(worker_concurrency=4) for _ in range(2)]
    await other.app[WORKER].stop(grace_seconds=0)  # only the first host claims, at first
    stalled.standin.set_delay(2.5)  # both hosts' Claude: one stand-in
    update = payloads.telegram_message(5000, "s0", chat_id=990)
    assert await telegram(stalled, update) == 200
    await stalled.standin.wait_for_requests(1, timeout=10)
    worker = stalled.app[WORKER]
    assert worker._lease_task is not None
    worker._lease_task.cancel()  # no heartbeat from now on; its work goes on
    await other.app[WORKER].start()  # takes the delivery back once the lease has run out
    await platforms.telegram.wait_for(lambda: len(platforms.telegram.sent) >= 1, timeout=20)
    await asyncio.sleep(3)  # the stalled host's answer has come by now
    assert replies(platforms) == ["Stand-in reply to: s0"]
    items = await wait_settled(other)
    assert [(i.status, i.attempts) for i in items] == [("done", 2)]
    assert (
        'digitalme_inbox_processed_total{channel="telegram",result="taken_over"} 1.0'
        in await stalled.metrics_text()
    )


async def test_rate_limits_and_the_circuit_breaker_are_per_host(
    make_channel_service: ChannelServiceFactory,
) -> None:
    """What docs/scale-out.md states: each host counts its own requests and Claude's
    failures; N hosts let a client make N times the limit."""
    first = await make_channel_service(
        rate_limit_per_minute=3, breaker_failure_threshold=1, breaker_reset_seconds=60
    )
    second = await make_channel_service(rate_limit_per_minute=3)
    token = first.chat_token  # a token of the shared database: valid on both hosts

    async def statuses(host: Service) -> list[int]:
        return [
            (await host.client.get("/api/v1/conversations", headers=host.auth(token))).status
            for _ in range(4)
        ]

    assert await statuses(first) == [200, 200, 200, 429]
    assert await statuses(second) == [200, 200, 200, 429]
    # Claude fails on the first host: its breaker opens; the second's stays closed.
    first.standin.fail_all(Error(status=529))
    conversation = await first.new_conversation(first.admin_token)
    response = await first.client.post(
        f"/api/v1/conversations/{conversation}/messages", json={"text": "hi"}, headers=first.admin
    )
    assert response.status == 503
    ready = [await (await host.client.get("/health/ready")).json() for host in (first, second)]
    assert [r["checks"]["claude"]["breaker"] for r in ready] == ["open", "closed"]
