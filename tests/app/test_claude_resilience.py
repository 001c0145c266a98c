"""When Claude misbehaves: retries, the circuit breaker, timeouts, refusals, budgets."""

from __future__ import annotations

import asyncio
import time

import pytest

from digitalme.keys import CLAUDE, CONVERSATIONS
from standins.anthropic_api import Error, Hang, Reply, Slow
from tests.conftest import Service, ServiceFactory


async def _post(
    service: Service, conversation: str, text: str = "hi", stream: bool = False
) -> tuple[int, dict[str, str], dict[str, object]]:
    headers = service.auth()
    if stream:
        headers["Accept"] = "text/event-stream"
    response = await service.client.post(
        f"/api/v1/conversations/{conversation}/messages", json={"text": text}, headers=headers
    )
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
    metrics = await service.metrics_text()
    assert "digitalme_claude_breaker_state 2.0" in metrics
    assert "digitalme_claude_breaker_opened_total 1.0" in metrics
    ready = await (await service.client.get("/health/ready")).json()
    assert ready["checks"]["claude"]["breaker"] == "open"

    # After the reset time one trial goes through; Claude is back, so it closes.
    service.standin.recover()
    await asyncio.sleep(0.7)
    body_ok = await service.say(conversation, "are you back?")
    assert body_ok["reply"]["text"].startswith("Stand-in reply to:")
    metrics = await service.metrics_text()
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


async def test_deadline_bounds_retries_and_long_retry_after(
    make_service: ServiceFactory,
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
    make_service: ServiceFactory,
) -> None:
    service = await make_service(breaker_failure_threshold=1)
    service.standin.script(Error(status=400, message="prompt is too long"))
    conversation = await service.new_conversation()
    status, _, body = await _post(service, conversation)
    assert status == 502
    assert body["error"] == "claude_rejected"
    assert service.app[CLAUDE].breaker.state.name == "CLOSED"
    assert (await service.say(conversation, "again"))["reply"]["text"]


@pytest.mark.both_engines
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


# --- whole answers: a caller that reads no deltas asks for the answer in one response -------

# max_tokens small enough that the whole answer fits the (short) test read timeout.
WHOLE = {"max_tokens": 64, "claude_timeout_seconds": 5.0}


async def test_json_turns_ask_for_the_whole_answer_and_streams_stream(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(**WHOLE)
    conversation = await service.new_conversation()
    body = await service.say(conversation, "one")
    assert body["reply"]["text"] == "Stand-in reply to: one"
    assert body["reply"]["usage"]["output_tokens"] > 0 and body["reply"]["cost_usd"] > 0
    status, _, _ = await _post(service, conversation, "two", stream=True)
    assert status == 200
    assert [r.body.get("stream", False) for r in service.standin.message_requests] == [False, True]
    metrics = await service.metrics_text()
    assert 'digitalme_claude_calls_total{outcome="ok"} 2.0' in metrics


async def test_large_max_tokens_keep_streaming_whole_answers(make_service: ServiceFactory) -> None:
    # 4096 tokens may take longer than half of a 60 s read timeout: stream, whose chunks
    # keep the connection alive, even for a caller that only wants the whole answer.
    service = await make_service(max_tokens=4096, claude_timeout_seconds=60.0)
    conversation = await service.new_conversation()
    await service.say(conversation, "long one")
    [request] = service.standin.message_requests
    assert request.body.get("stream") is True


async def test_whole_answers_fail_like_streamed_ones(make_service: ServiceFactory) -> None:
    service = await make_service(**WHOLE, breaker_failure_threshold=2, claude_max_retries=0)
    conversation = await service.new_conversation()
    service.standin.script(Error(status=400, message="prompt is too long"))
    status, _, body = await _post(service, conversation)
    assert (status, body["error"]) == (502, "claude_rejected")
    service.standin.script(Slow(delay=10))
    started = time.monotonic()
    status, _, body = await _post(service, conversation)
    assert (status, body["error"]) == (503, "claude_unavailable")
    assert time.monotonic() - started < 9
    service.standin.script(Error(status=529))
    status, headers, _ = await _post(service, conversation)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert service.app[CLAUDE].breaker.state.name == "OPEN"  # the timeout and the 529
    assert not any(r.body.get("stream") for r in service.standin.message_requests)
