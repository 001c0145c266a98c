"""The Anthropic stand-in, proven against the real ``anthropic`` SDK (2.14, on httpx2)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import pytest

from standins.anthropic_api import (
    AnthropicStandin,
    Error,
    Hang,
    Reply,
    Slow,
    StreamThenError,
    StreamThenHang,
    default_reply_text,
    run_anthropic_standin,
)

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-ant-standin-test-key-0123456789"
MODEL = "claude-standin-test"
HELLO = [{"role": "user", "content": "Hello, stand-in!"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

# The SDK's environment is cleaned, and `standin` provided, by tests/conftest.py.


@pytest.fixture
async def make_client(standin: AnthropicStandin) -> AsyncIterator[Callable[..., Any]]:
    clients: list[anthropic.AsyncAnthropic] = []

    def make(**options: Any) -> anthropic.AsyncAnthropic:
        options = {
            "api_key": KEY,
            "base_url": standin.base_url,
            "max_retries": 0,
            "timeout": 10.0,
            **options,
        }
        client = anthropic.AsyncAnthropic(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_plain_reply_usage_and_recorded_request(standin, make_client) -> None:
    client = make_client()
    message = await client.messages.create(model=MODEL, max_tokens=256, messages=HELLO)

    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Stand-in reply to: Hello, stand-in!"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.output_tokens == 9  # ceil(len(text) / 4)
    assert message._request_id and message._request_id.startswith("req_")

    counted = await client.messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens == message.usage.input_tokens == 4 + 3 + 4

    (first, second) = standin.requests
    assert (first.method, first.path, second.path) == (
        "POST",
        "/v1/messages",
        "/v1/messages/count_tokens",
    )
    assert first.body["messages"] == HELLO and first.body["max_tokens"] == 256
    assert first.api_key_present and first.auth_scheme == "bearer"  # 2.14 sends a bearer token
    assert first.api_key_sha256 == hashlib.sha256(KEY.encode()).hexdigest()
    assert "authorization" not in first.headers and "x-api-key" not in first.headers
    assert KEY not in repr(standin.requests)
    assert first.headers["anthropic-version"] == "2026-10-21"
    assert first.status == 200 and first.outcome == "replied" and first.retry_count == 0


async def test_prompt_caching_creation_then_read(standin, make_client) -> None:
    client = make_client()
    persona = "You are DigitalMe, speaking in your owner's voice. " * 40
    system = [
        {"type": "text", "text": persona, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Today is Tuesday."},
    ]
    first = await client.messages.create(model=MODEL, max_tokens=64, system=system, messages=HELLO)
    second = await client.messages.create(
        model=MODEL,
        max_tokens=64,
        system=system,
        messages=[{"role": "user", "content": "A different question"}],
    )
    counted = await client.messages.count_tokens(model=MODEL, system=system, messages=HELLO)

    cached = (len(persona) + 3) // 4
    assert first.usage.cache_creation_input_tokens == cached
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == cached
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == cached
    assert (
        first.usage.input_tokens
        + first.usage.cache_creation_input_tokens
        + first.usage.cache_read_input_tokens
    ) == counted.input_tokens

    # A changed prefix is a cache miss; a different model has its own cache.
    other = [{**system[0], "text": persona + "!"}, system[1]]
    third = await client.messages.create(model=MODEL, max_tokens=64, system=other, messages=HELLO)
    fourth = await client.messages.create(
        model=MODEL + "-b", max_tokens=64, system=system, messages=HELLO
    )
    assert third.usage.cache_read_input_tokens == 0 and third.usage.cache_creation_input_tokens
    assert fourth.usage.cache_read_input_tokens == 0
    assert fourth.usage.cache_creation_input_tokens == cached


async def test_stream_helper_text_deltas_and_final_usage(standin, make_client) -> None:
    client = make_client()
    prompt = "Tell me something about the weather in Lisbon in spring"
    messages = [{"role": "user", "content": prompt}]
    deltas: list[str] = []
    async with client.messages.stream(model=MODEL, max_tokens=256, messages=messages) as stream:
        async for text in stream.text_stream:
            deltas.append(text)
        final = await stream.get_final_message()

    expected = f"Stand-in reply to: {prompt}"
    assert len(deltas) >= 3 and "".join(deltas) == expected
    assert final.content[0].text == expected and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == (len(expected) + 3) // 4
    plain = await client.messages.create(model=MODEL, max_tokens=256, messages=messages)
    assert final.usage.input_tokens == plain.usage.input_tokens > 0
    assert standin.requests[0].stream and standin.requests[0].outcome == "streamed"


async def test_create_stream_true_raw_events_in_order(standin, make_client) -> None:
    client = make_client()
    standin.script(Reply(chunks=["One, ", "two, ", "three."]))
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO, stream=True)
    events = [event async for event in stream]

    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].message.usage.input_tokens == 11 and events[0].message.content == []
    assert [e.delta.text for e in events[2:5]] == ["One, ", "two, ", "three."]
    assert events[6].delta.stop_reason == "end_turn" and events[6].usage.output_tokens == 4


async def test_wire_format_has_event_lines_and_ping(standin) -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": HELLO, "stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{standin.base_url}/v1/messages", json=body, headers=headers) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = (await response.read()).decode()

    frames = [f for f in raw.split("\n\n") if f]
    names = [f.splitlines()[0] for f in frames]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names[-4:] == [
        "event: content_block_delta",
        "event: content_block_stop",
        "event: message_delta",
        "event: message_stop",
    ]
    for frame in frames:  # each data line is JSON whose type matches its event line
        event, data = frame.splitlines()
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")
    assert standin.requests[0].auth_scheme == "x-api-key"


async def test_tool_use_round_trip_json_and_stream(standin, make_client) -> None:
    client = make_client()
    question = [{"role": "user", "content": "Weather in Porto?"}]
    standin.script(
        Reply(tool_use={"name": "get_weather", "input": {"city": "Porto"}}),
        Reply(text="Looking it up.", tool_use={"name": "get_weather", "input": {"city": "Braga"}}),
    )
    first = await client.messages.create(
        model=MODEL, max_tokens=256, messages=question, tools=[WEATHER_TOOL]
    )
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"city": "Porto"} and call.id.startswith("toolu_")

    async with client.messages.stream(
        model=MODEL, max_tokens=256, messages=question, tools=[WEATHER_TOOL]
    ) as stream:
        streamed = await stream.get_final_message()
    assert [b.type for b in streamed.content] == ["text", "tool_use"]
    assert streamed.content[0].text == "Looking it up."
    assert streamed.content[1].input == {"city": "Braga"} and streamed.stop_reason == "tool_use"

    follow_up = [
        *question,
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "14C and raining"}
            ],
        },
    ]
    answer = await client.messages.create(
        model=MODEL, max_tokens=256, messages=follow_up, tools=[WEATHER_TOOL]
    )
    assert answer.content[0].text == "Stand-in reply to: 14C and raining"
    assert standin.requests[-1].body["messages"][2]["content"][0]["tool_use_id"] == call.id

    # A client that forgets the tool_result, or answers the wrong id, is told so.
    with pytest.raises(anthropic.BadRequestError, match="without `tool_result` blocks"):
        await client.messages.create(
            model=MODEL,
            max_tokens=64,
            tools=[WEATHER_TOOL],
            messages=[*follow_up[:2], {"role": "user", "content": "and?"}],
        )
    wrong = [
        *follow_up[:2],
        {
            "role": "user",
            "content": [
                *follow_up[2]["content"],
                {"type": "tool_result", "tool_use_id": "toolu_nope"},
            ],
        },
    ]
    with pytest.raises(anthropic.BadRequestError, match="unexpected `tool_use_id`"):
        await client.messages.create(
            model=MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=wrong
        )


async def test_rate_limit_with_retry_after_is_retried(standin, make_client) -> None:
    client = make_client(max_retries=1)
    standin.script(Error(status=429, retry_after=1), Reply(text="after the wait"))
    started = time.monotonic()
    message = await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    elapsed = time.monotonic() - started

    assert message.content[0].text == "after the wait"
    assert [r.status for r in standin.requests] == [429, 200]
    assert [r.retry_count for r in standin.requests] == [0, 1]
    assert elapsed >= 0.95  # the SDK honoured retry-after: 1
    assert standin.pending == 0


async def test_error_statuses_map_to_sdk_exceptions(standin, make_client) -> None:
    client = make_client(max_retries=0)
    standin.script(Error(status=529), Error(status=500), Error(status=429, retry_after=3))

    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert overloaded.value.status_code == 529 and overloaded.value.type == "overloaded_error"
    assert isinstance(overloaded.value, anthropic.InternalServerError)
    assert overloaded.value.request_id and overloaded.value.request_id.startswith("req_")

    with pytest.raises(anthropic.InternalServerError) as internal:
        await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert internal.value.status_code == 500 and internal.value.type == "api_error"

    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert limited.value.response.headers["retry-after"] == "3"
    assert limited.value.type == "rate_limit_error"
    assert len(standin.requests) == 3


async def test_slow_answer_beyond_client_timeout(standin, make_client) -> None:
    client = make_client(timeout=0.5, max_retries=0)
    standin.script(Slow(delay=5.0))
    started = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert time.monotonic() - started < 3.0
    for _ in range(50):  # the server notices the client leaving
        if standin.requests[0].outcome == "disconnected":
            break
        await asyncio.sleep(0.02)
    assert standin.requests[0].outcome == "disconnected"


async def test_slow_but_successful_answers(standin, make_client) -> None:
    client = make_client(timeout=5.0)
    standin.set_delay(0.3)
    started = time.monotonic()
    message = await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert time.monotonic() - started >= 0.3
    assert message.content[0].text == default_reply_text({"messages": HELLO})


async def test_mid_stream_error_surfaces_from_the_stream(standin, make_client) -> None:
    client = make_client()
    standin.script(StreamThenError(after_chunks=2, then=Reply(chunks=["a ", "b ", "c ", "d"])))
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model=MODEL, max_tokens=64, messages=HELLO) as stream:
            async for text in stream.text_stream:
                received.append(text)

    assert received == ["a ", "b "]
    # The HTTP status was 200 when the error arrived, so the SDK raises the base class.
    assert type(caught.value) is anthropic.APIStatusError and caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"
    assert caught.value.body["error"]["message"] == "Overloaded"
    assert standin.requests[0].outcome == "stream_error"


async def test_invalid_requests_are_rejected_like_the_api(standin, make_client) -> None:
    client = make_client()
    cases = [
        (
            {"messages": [{"role": "assistant", "content": "hi"}, *HELLO]},
            'first message must use the "user" role',
        ),
        ({"messages": [*HELLO, *HELLO]}, "roles must alternate"),
        ({"messages": []}, "at least one message"),
        ({"max_tokens": -1}, "max_tokens: Input should be greater than or equal to 0"),
        ({"messages": [{"role": "user", "content": "  "}]}, "non-whitespace text"),
        (
            {"system": [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}]},
            "cache_control.type",
        ),
        ({"tools": [{"name": "bad name", "input_schema": {"type": "object"}}]}, "pattern"),
        ({"extra_body": {"temprature": 0.5}}, "temprature: Extra inputs are not permitted"),
    ]
    for change, message in cases:
        args = {"model": MODEL, "max_tokens": 64, "messages": HELLO, **change}
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(**args)
        assert caught.value.status_code == 400
        assert caught.value.type == "invalid_request_error"
        assert message in caught.value.api_message, (change, caught.value.api_message)
    assert [r.status for r in standin.requests] == [400] * len(cases)


async def test_authentication_errors() -> None:
    async with run_anthropic_standin(api_keys=["sk-right"]) as server:
        async with anthropic.AsyncAnthropic(
            api_key="sk-wrong", base_url=server.base_url, max_retries=0
        ) as client:
            with pytest.raises(anthropic.AuthenticationError) as caught:
                await client.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
        assert caught.value.type == "authentication_error"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{server.base_url}/v1/messages",
                headers={"anthropic-version": "2023-06-01"},
                json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
            ) as response,
        ):
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "authentication_error"
        async with anthropic.AsyncAnthropic(
            api_key="sk-right", base_url=server.base_url, max_retries=0
        ) as client:
            ok = await client.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
        assert ok.stop_reason == "max_tokens" and ok.usage.output_tokens == 8
        assert [r.status for r in server.requests] == [401, 401, 200]


async def test_sticky_failures_and_recovery(standin, make_client) -> None:
    client = make_client()
    standin.script(Reply(text="queued"))
    standin.fail_all(Error(status=529))
    for _ in range(3):
        with pytest.raises(anthropic.OverloadedError):
            await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.count_tokens(model=MODEL, messages=HELLO)
    standin.recover()
    message = await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert message.content[0].text == "queued"  # the queue was left alone meanwhile
    assert [r.status for r in standin.requests] == [529, 529, 529, 529, 200]


async def test_hang_until_the_server_closes() -> None:
    server = AnthropicStandin()
    await server.start("127.0.0.1", 0)
    server.script(Hang())
    async with anthropic.AsyncAnthropic(
        api_key=KEY, base_url=server.base_url, max_retries=0, timeout=10.0
    ) as client:
        call = asyncio.ensure_future(
            client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        )
        await server.wait_for_requests(1)
        await asyncio.sleep(0.2)
        assert not call.done()
        started = time.monotonic()
        await server.close()
        with pytest.raises(anthropic.APIConnectionError):
            await call
        assert time.monotonic() - started < 2.0
    assert server.requests[0].outcome == "hung"


def test_standalone_process_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = dict(os.environ)  # already cleaned of SDK variables by tests/conftest.py
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "standins.anthropic_api",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--delay",
            "0.05",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("anthropic-standin listening on http://127.0.0.1:"), line
        base_url = line.rsplit(" ", 1)[1]
        client = anthropic.Anthropic(api_key=KEY, base_url=base_url, max_retries=0, timeout=5)
        with client:
            message = client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        assert message.content[0].text == "Stand-in reply to: Hello, stand-in!"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "POST /v1/messages -> 200 replied" in err and "key=present" in err
    assert KEY not in err and KEY not in out


async def test_stream_that_stalls_raises_a_raw_httpx2_timeout(standin, make_client) -> None:
    # Surprise worth knowing: a read timeout *inside* a stream is not wrapped by the SDK.
    client = make_client(timeout=0.5)
    standin.script(StreamThenHang(after_chunks=1, then=Reply(chunks=["first ", "second"])))
    received: list[str] = []
    with pytest.raises(httpx2.ReadTimeout):
        async with client.messages.stream(model=MODEL, max_tokens=64, messages=HELLO) as stream:
            async for text in stream.text_stream:
                received.append(text)
    assert received == ["first "]
    assert standin.requests[0].behaviour == "StreamThenHang"


async def test_api_details_clients_rely_on(make_client) -> None:
    async with run_anthropic_standin(strict_alternation=False) as lenient:
        client = make_client(base_url=lenient.base_url)
        # Consecutive user turns are merged, as the API documents.
        merged = await client.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        )
        assert merged.content[0].text == "Stand-in reply to: two"

        # max_tokens=0 pre-warms the cache: no content, the prefix is written.
        system = [
            {
                "type": "text",
                "text": "persona " * 50,
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            }
        ]
        warm = await client.messages.create(
            model=MODEL, max_tokens=0, system=system, messages=HELLO
        )
        assert warm.content == [] and warm.stop_reason == "max_tokens"
        assert warm.usage.output_tokens == 0
        assert warm.usage.cache_creation.ephemeral_1h_input_tokens == 100
        hot = await client.messages.create(
            model=MODEL, max_tokens=64, system=system, messages=HELLO
        )
        assert hot.usage.cache_read_input_tokens == 100

        # Top-level cache_control caches the whole conversation so far.
        auto = await client.messages.create(
            model=MODEL, max_tokens=64, messages=HELLO, cache_control={"type": "ephemeral"}
        )
        assert auto.usage.input_tokens == 4 and auto.usage.cache_creation_input_tokens == 7

        # Stop sequences cut the text and are reported.
        lenient.script(Reply(text="alpha. STOP beta"))
        stopped = await client.messages.create(
            model=MODEL, max_tokens=64, messages=HELLO, stop_sequences=["STOP"]
        )
        assert stopped.content[0].text == "alpha. "
        assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "STOP")

        # count_tokens has its own parameter set; unknown routes get the JSON error shape.
        with pytest.raises(anthropic.BadRequestError, match="max_tokens: Extra inputs"):
            await client.messages.count_tokens(
                model=MODEL, messages=HELLO, extra_body={"max_tokens": 5}
            )
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.models.list()
        assert missing.value.type == "not_found_error"

        # A script mistake (tool not declared by the request) is reported, not papered over.
        lenient.script(Reply(tool_use={"name": "get_weather", "input": {}}))
        with pytest.raises(anthropic.BadRequestError, match=r"\[stand-in script\]"):
            await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
