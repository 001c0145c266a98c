"""When Claude misbehaves: retries, the circuit breaker, timeouts, refusals, budgets."""

from __future__ import annotations

import asyncio
import time

from digitalme.keys import CLAUDE, CONVERSATIONS
from tests.conftest import Service, ServiceFactory
from tests.standins.anthropic_api import Error, Hang, Reply, Slow


async def _post(service: Service, conversation: str, text: str = "hi",
                stream: bool = False) -> tuple[int, dict[str, str], dict[str, object]]:
    headers = service.auth()
    if stream:
        headers["Accept"] = "text/event-stream"
    response = await service.client.post(f"/api/v1/conversations/{conversation}/messages",
                                         json={"text": text}, headers=headers)
    body = await response.json() if response.content_type == "application/json" else {}
    return response.status, dict(response.headers), body


async def test_sdk_retries_a_429_then_succeeds(make_service: ServiceFactory) -> None:
    service = await make_service(claude_max_retries=2)
    service.standin.script(Error(status=429, retry_after=0.2), Reply(text="Worth the wait."))
    conversation = await service.new_conversation()
    body = await service.say(conversation, "hello")
    assert body["reply"]["text"] == "Worth the wait."
    assert [r.status for r in service.standin.message_requests] == [429, 200]


async def test_overload_answers_503_with_retry_after(service: Service) -> None:
    service.standin.script(Error(status=529))
    conversation = await service.new_conversation()
    status, headers, body = await _post(service, conversation)
    assert status == 503
    assert body["error"] == "claude_unavailable"
    assert "try again" in str(body["message"])
    assert int(headers["Retry-After"]) >= 1


async def test_breaker_opens_fails_fast_and_recovers(make_service: ServiceFactory) -> None:
    service = await make_service(breaker_failure_threshold=3, breaker_reset_seconds=0.6)
    conversation = await service.new_conversation()
    service.standin.fail_all(Error(status=529))
    for _ in range(3):
        status, _, _ = await _post(service, conversation)
        assert status == 503
    calls_before = len(service.standin.message_requests)

    # Open: answered at once, without calling Claude.
    started = time.monotonic()
    status, headers, body = await _post(service, conversation)
    assert status == 503
    assert time.monotonic() - started < 0.5
    assert len(service.standin.message_requests) == calls_before
    assert body["error"] == "claude_unavailable"
    assert 1 <= int(headers["Retry-After"]) <= 2
    metrics = await (await service.client.get("/metrics")).text()
    assert "digitalme_claude_breaker_state 2.0" in metrics
    assert "digitalme_claude_breaker_opened_total 1.0" in metrics
    ready = await (await service.client.get("/health/ready")).json()
    assert ready["checks"]["claude"]["breaker"] == "open"

    # After the reset time one trial goes through; Claude is back, so it closes.
    service.standin.recover()
    await asyncio.sleep(0.7)
    body_ok = await service.say(conversation, "are you back?")
    assert body_ok["reply"]["text"].startswith("Stand-in reply to:")
    metrics = await (await service.client.get("/metrics")).text()
    assert "digitalme_claude_breaker_state 0.0" in metrics


async def test_slow_claude_times_out_into_a_quick_503(make_service: ServiceFactory) -> None:
    service = await make_service(claude_timeout_seconds=1.0)
    service.standin.script(Slow(delay=10))
    conversation = await service.new_conversation()
    started = time.monotonic()
    status, _, body = await _post(service, conversation)
    assert status == 503
    assert time.monotonic() - started < 5
    assert body["error"] == "claude_unavailable"


async def test_deadline_bounds_retries_and_long_retry_after(make_service: ServiceFactory,
                                                            ) -> None:
    # A Retry-After of an hour must not hold the caller for an hour.
    service = await make_service(claude_max_retries=3, claude_deadline_seconds=1.5)
    service.standin.fail_all(Error(status=429, retry_after=3600))
    conversation = await service.new_conversation()
    started = time.monotonic()
    status, _, body = await _post(service, conversation)
    assert status == 503
    assert time.monotonic() - started < 5
    assert body["error"] == "claude_unavailable"


async def test_hanging_stream_times_out(make_service: ServiceFactory) -> None:
    service = await make_service(claude_timeout_seconds=1.0)
    service.standin.script(Hang())
    conversation = await service.new_conversation()
    started = time.monotonic()
    status, _, _ = await _post(service, conversation, stream=True)
    assert status == 503
    assert time.monotonic() - started < 5


async def test_claude_refusal_is_a_502_and_does_not_open_the_breaker(
        make_service: ServiceFactory) -> None:
    service = await make_service(breaker_failure_threshold=1)
    service.standin.script(Error(status=400, message="prompt is too long"))
    conversation = await service.new_conversation()
    status, _, body = await _post(service, conversation)
    assert status == 502
    assert body["error"] == "claude_rejected"
    assert service.app[CLAUDE].breaker.state.name == "CLOSED"
    assert (await service.say(conversation, "again"))["reply"]["text"]


async def test_daily_token_budget(make_service: ServiceFactory) -> None:
    service = await make_service(daily_token_budget=1)
    conversation = await service.new_conversation()
    await service.say(conversation, "first")  # spends more than 1 token
    status, headers, body = await _post(service, conversation, "second")
    assert status == 429
    assert body["error"] == "daily_budget_exhausted"
    assert int(headers["Retry-After"]) > 0
    assert len(service.standin.message_requests) == 1
    stored = await service.app[CONVERSATIONS].messages(conversation)
    assert [m.text for m in stored] == ["first", "Stand-in reply to: first"]


async def test_sdk_gets_the_key_and_base_url_from_settings(service: Service) -> None:
    conversation = await service.new_conversation()
    await service.say(conversation, "hi")
    [request] = service.standin.message_requests
    assert request.api_key_present
    assert request.headers.get("anthropic-version")
