"""Conversations through the API: what is stored, what Claude is sent, streaming."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from digitalme.chat import estimate_tokens
from digitalme.keys import CONVERSATIONS, TOKENS
from digitalme.persona import build_prompt, load_persona_file
from standins.anthropic_api import Error, Reply, StreamThenError
from tests.conftest import SAMPLE_PERSONA, Service, ServiceFactory

# Conversations, messages and their usage: stored, so on both engines.
pytestmark = pytest.mark.both_engines


def _sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.split("\n\n"):
        if not chunk.strip():
            continue
        name, data = "message", []
        for line in chunk.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append((name, json.loads("\n".join(data))))
    return events


async def test_create_conversation(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/conversations", json={"title": "Roadmap"}, headers=service.auth()
    )
    assert response.status == 201
    body = await response.json()
    assert body["title"] == "Roadmap"
    assert body["channel"] == "api"
    assert response.headers["Location"] == f"/api/v1/conversations/{body['id']}"
    got = await service.client.get(f"/api/v1/conversations/{body['id']}", headers=service.auth())
    assert (await got.json())["id"] == body["id"]


async def test_reply_is_stored_with_usage_and_persona_goes_first_cached(
    service: Service,
) -> None:
    conversation = await service.new_conversation()
    body = await service.say(conversation, "What do you think of microservices?")
    reply = body["reply"]
    assert body["message"]["role"] == "user"
    assert body["message"]["text"] == "What do you think of microservices?"
    assert reply["role"] == "assistant"
    assert reply["text"] == "Stand-in reply to: What do you think of microservices?"
    assert reply["model"] == "claude-test"
    usage = reply["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["cache_write_tokens"] > 0  # first call writes the persona to the cache
    assert reply["cost_usd"] > 0

    [request] = service.standin.message_requests
    system = request.body["system"]
    persona, _ = load_persona_file(SAMPLE_PERSONA)
    assert system[0] == {
        "type": "text",
        "text": build_prompt(persona),
        "cache_control": {"type": "ephemeral"},
    }
    assert request.body["messages"] == [
        {"role": "user", "content": "What do you think of microservices?"}
    ]
    assert request.body["model"] == "claude-test"
    assert request.body["max_tokens"] == service.settings.max_tokens

    # The second call reads the persona from the cache.
    second = await service.say(conversation, "And monoliths?")
    assert second["reply"]["usage"]["cache_read_tokens"] > 0

    listed = await service.client.get(
        f"/api/v1/conversations/{conversation}/messages", headers=service.auth()
    )
    messages = (await listed.json())["messages"]
    assert [(m["role"], m["text"]) for m in messages] == [
        ("user", "What do you think of microservices?"),
        ("assistant", "Stand-in reply to: What do you think of microservices?"),
        ("user", "And monoliths?"),
        ("assistant", "Stand-in reply to: And monoliths?"),
    ]
    assert messages[1]["usage"] == reply["usage"]


async def test_earlier_turns_are_sent(service: Service) -> None:
    conversation = await service.new_conversation()
    await service.say(conversation, "My name is Sam.")
    await service.say(conversation, "What is my name?")
    last = service.standin.message_requests[-1].body["messages"]
    assert last == [
        {"role": "user", "content": "My name is Sam."},
        {"role": "assistant", "content": "Stand-in reply to: My name is Sam."},
        {"role": "user", "content": "What is my name?"},
    ]


async def test_history_respects_the_token_budget(make_service: ServiceFactory) -> None:
    budget = 400
    service = await make_service(context_token_budget=budget)
    conversation = await service.new_conversation()
    for i in range(12):
        await service.say(conversation, f"Message number {i}: " + "lorem ipsum " * 12)
    sent = service.standin.message_requests[-1].body["messages"]
    assert sent[-1]["content"].startswith("Message number 11:")
    assert sent[0]["role"] == "user"
    assert sum(estimate_tokens(m["content"]) for m in sent) <= budget
    # It is a budget, not a fixed count: more than the newest turn fits, not everything.
    assert 3 <= len(sent) < 23
    roles = [m["role"] for m in sent]
    assert all(a != b for a, b in itertools.pairwise(roles))


async def test_a_failed_turn_keeps_the_message_and_the_next_turn_merges_it(
    make_service: ServiceFactory,
) -> None:
    service = await make_service()
    conversation = await service.new_conversation()
    service.standin.script(Error(status=529))
    failed = await service.client.post(
        f"/api/v1/conversations/{conversation}/messages",
        json={"text": "First try"},
        headers=service.auth(),
    )
    assert failed.status == 503
    await service.say(conversation, "Second try")
    sent = service.standin.message_requests[-1].body["messages"]
    assert sent == [{"role": "user", "content": "First try\n\nSecond try"}]
    stored = await service.app[CONVERSATIONS].messages(conversation)
    assert [m.role for m in stored] == ["user", "user", "assistant"]


async def test_streamed_reply_as_server_sent_events(service: Service) -> None:
    service.standin.script(Reply(chunks=["Hel", "lo, ", "friend."]))
    conversation = await service.new_conversation()
    response = await service.client.post(
        f"/api/v1/conversations/{conversation}/messages",
        json={"text": "Hi"},
        headers={**service.auth(), "Accept": "text/event-stream"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _sse_events(await response.text())
    names = [name for name, _ in events]
    assert names[0] == "message" and names[-1] == "done"
    assert [data["text"] for name, data in events if name == "delta"] == ["Hel", "lo, ", "friend."]
    done = events[-1][1]["reply"]
    assert done["text"] == "Hello, friend."
    assert done["usage"]["output_tokens"] > 0
    stored = await service.app[CONVERSATIONS].messages(conversation)
    assert [m.text for m in stored] == ["Hi", "Hello, friend."]


async def test_mid_stream_failure_is_an_error_event(service: Service) -> None:
    service.standin.script(StreamThenError(after_chunks=1))
    conversation = await service.new_conversation()
    response = await service.client.post(
        f"/api/v1/conversations/{conversation}/messages",
        json={"text": "Hi"},
        headers={**service.auth(), "Accept": "text/event-stream"},
    )
    assert response.status == 200
    events = _sse_events(await response.text())
    assert events[-1][0] == "error"
    assert events[-1][1]["error"] == "claude_unavailable"
    assert "done" not in [name for name, _ in events]


async def test_tokens_see_only_their_own_conversations(service: Service) -> None:
    mine = await service.new_conversation()
    other_token, _ = await service.app[TOKENS].create("other", "chat")
    theirs = await service.new_conversation(other_token)
    response = await service.client.get(
        f"/api/v1/conversations/{theirs}/messages", headers=service.auth()
    )
    assert response.status == 404
    response = await service.client.post(
        f"/api/v1/conversations/{theirs}/messages", json={"text": "peek"}, headers=service.auth()
    )
    assert response.status == 404
    listed = await (
        await service.client.get("/api/v1/conversations", headers=service.auth())
    ).json()
    assert [c["id"] for c in listed["conversations"]] == [mine]
    # An admin sees both.
    listed = await (await service.client.get("/api/v1/conversations", headers=service.admin)).json()
    assert {c["id"] for c in listed["conversations"]} == {mine, theirs}
    assert service.standin.message_requests == []


async def test_bad_input_is_a_400_naming_the_problem(service: Service) -> None:
    conversation = await service.new_conversation()
    url = f"/api/v1/conversations/{conversation}/messages"
    cases = [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"txt": "hi"}', "missing_field"),
        (b'{"text": 42}', "invalid_field"),
        (b'{"text": "   "}', "invalid_field"),
        (b"\xff\xfe", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
    ]
    for raw, code in cases:
        response = await service.client.post(
            url, data=raw, headers={**service.auth(), "Content-Type": "application/json"}
        )
        body = await response.json()
        assert response.status == 400, (raw[:20], body)
        assert body["error"] == code, (raw[:20], body)
        assert body["message"]
    body = await (
        await service.client.post(url, data=b'{"txt": "hi"}', headers=service.auth())
    ).json()
    assert "'text'" in body["message"]
    assert service.standin.message_requests == []


async def test_too_long_message_and_too_large_body(make_service: ServiceFactory) -> None:
    service = await make_service(max_message_chars=50, max_body_bytes=2048)
    conversation = await service.new_conversation()
    url = f"/api/v1/conversations/{conversation}/messages"
    response = await service.client.post(url, json={"text": "x" * 51}, headers=service.auth())
    assert response.status == 400
    assert "50 characters" in (await response.json())["message"]
    response = await service.client.post(url, json={"text": "x" * 4000}, headers=service.auth())
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"


async def test_unknown_conversation_is_404(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/conversations/nope/messages", json={"text": "hi"}, headers=service.auth()
    )
    assert response.status == 404
    assert (await response.json())["error"] == "conversation_not_found"


async def test_listed_messages_are_exactly_their_json(service: Service) -> None:
    """GET .../messages is built by SQLite; it must say what Message.to_json() says, for
    both roles, any text, missing usage, and pages (limit, before)."""
    conversation = await service.new_conversation()
    for text in (
        "plain",
        'quotes " and \\\\ backslash',
        "line\nbreak\ttab",
        "unicode: héllo ✓ 日本",
        "control \u0001 char",
    ):
        await service.say(conversation, text)
    store = service.app[CONVERSATIONS]
    await store.add_message(conversation, "assistant", "no usage recorded")  # NULL fields
    stored = await store.messages(conversation, limit=1000)
    for query, expected in (
        ("", stored),
        ("?limit=3", stored[-3:]),
        (f"?before={stored[4].id}&limit=2", stored[2:4]),
    ):
        response = await service.client.get(
            f"/api/v1/conversations/{conversation}/messages{query}", headers=service.auth()
        )
        assert response.status == 200
        assert response.content_type == "application/json"
        assert (await response.json())["messages"] == [m.to_json() for m in expected], query
    # Pages are kept rendered by their newest message: a new message shows at once.
    for _ in range(2):
        await store.add_message(conversation, "user", "one more")
        response = await service.client.get(
            f"/api/v1/conversations/{conversation}/messages", headers=service.auth()
        )
        listed = (await response.json())["messages"]
        assert listed == [m.to_json() for m in await store.messages(conversation)]
        assert listed[-1]["text"] == "one more"
