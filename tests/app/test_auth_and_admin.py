"""Bearer tokens, scopes, the rate limit, and the admin endpoints (persona, tokens)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml

from digitalme.keys import DATABASE, TOKENS
from digitalme.openapi import openapi_document
from tests.conftest import SAMPLE_PERSONA, Service, ServiceFactory

# Conversations, messages, usage, tokens, persona: stored, so on both engines.
pytestmark = pytest.mark.both_engines


async def test_every_api_route_needs_a_token(service: Service) -> None:
    for method, path in [
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/me"),
        ("POST", "/api/v1/conversations"),
        ("GET", "/api/v1/conversations"),
        ("GET", "/api/v1/conversations/x"),
        ("GET", "/api/v1/conversations/x/messages"),
        ("POST", "/api/v1/conversations/x/messages"),
        ("GET", "/api/v1/persona"),
        ("PUT", "/api/v1/persona"),
        ("GET", "/api/v1/persona/prompt"),
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("DELETE", "/api/v1/tokens/1"),
    ]:
        response = await service.client.request(method, path)
        assert response.status == 401, (method, path)
        assert (await response.json())["error"] == "unauthorized"
        assert "Bearer" in response.headers["WWW-Authenticate"]


async def test_invalid_and_revoked_tokens_are_refused(service: Service) -> None:
    for header in ("Bearer dm_not-a-real-token", "Bearer ", "Basic dXNlcjpwYXNz", "dm_x"):
        response = await service.client.get(
            "/api/v1/conversations", headers={"Authorization": header}
        )
        assert response.status == 401, header
        assert (await response.json())["error"] == "invalid_token"
    created = await service.client.post(
        "/api/v1/tokens", json={"name": "temp", "scope": "chat"}, headers=service.admin
    )
    token = await created.json()
    assert (
        await service.client.get("/api/v1/conversations", headers=service.auth(token["token"]))
    ).status == 200
    revoked = await service.client.delete(f"/api/v1/tokens/{token['id']}", headers=service.admin)
    assert (await revoked.json())["revoked_at"]
    response = await service.client.get(
        "/api/v1/conversations", headers=service.auth(token["token"])
    )
    assert response.status == 401


async def test_chat_token_cannot_administer(service: Service) -> None:
    for method, path in [
        ("GET", "/api/v1/persona"),
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/persona/prompt"),
    ]:
        response = await service.client.request(method, path, headers=service.auth())
        assert response.status == 403, path
        assert "admin" in (await response.json())["message"]


async def test_token_management_never_shows_secrets_again(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/tokens", json={"name": "ci", "scope": "admin"}, headers=service.admin
    )
    assert response.status == 201
    created = await response.json()
    assert created["token"].startswith("dm_") and len(created["token"]) > 40
    listing = await (await service.client.get("/api/v1/tokens", headers=service.admin)).json()
    assert created["token"] not in str(listing)
    names = {t["name"]: t for t in listing["tokens"]}
    assert names["ci"]["scope"] == "admin"
    assert created["token"].startswith(names["ci"]["prefix"])
    bad = await service.client.post(
        "/api/v1/tokens", json={"name": "x", "scope": "root"}, headers=service.admin
    )
    assert bad.status == 400
    missing = await service.client.delete("/api/v1/tokens/999", headers=service.admin)
    assert missing.status == 404


async def test_rate_limit_per_token_with_retry_after(make_service: ServiceFactory) -> None:
    service = await make_service(rate_limit_per_minute=5)
    statuses = [
        (await service.client.get("/api/v1/conversations", headers=service.auth())).status
        for _ in range(6)
    ]
    assert statuses == [200] * 5 + [429]
    response = await service.client.get("/api/v1/conversations", headers=service.auth())
    assert response.status == 429
    assert (await response.json())["error"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 12
    # Another client (the admin token) has its own allowance; health is never limited.
    assert (await service.client.get("/api/v1/conversations", headers=service.admin)).status == 200
    for _ in range(10):
        assert (await service.client.get("/health")).status == 200
    metrics = await service.metrics_text()
    assert "digitalme_http_rate_limited_total 2.0" in metrics


async def test_rate_limit_per_address_for_anonymous_and_bad_tokens(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(rate_limit_per_minute=3)
    statuses = [
        (
            await service.client.get("/api/v1/me", headers={"Authorization": f"Bearer dm_guess{i}"})
        ).status
        for i in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]


async def test_forwarded_clients_are_limited_separately(make_service: ServiceFactory) -> None:
    service = await make_service(rate_limit_per_minute=2)
    for client_ip in ("198.51.100.1", "198.51.100.2"):
        statuses = [
            (await service.client.get("/", headers={"X-Forwarded-For": client_ip})).status
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429], client_ip


async def test_persona_api_round_trip(service: Service) -> None:
    current = await (await service.client.get("/api/v1/persona", headers=service.admin)).json()
    document = yaml.safe_load(SAMPLE_PERSONA.read_text())
    assert current["persona"]["name"] == document["name"]
    assert len(current["persona"]["traits"]) == len(document["traits"])
    document["name"] = "Mara L."
    document["traits"][0]["weight"] = 10
    response = await service.client.put("/api/v1/persona", json=document, headers=service.admin)
    assert response.status == 200, await response.text()
    prompt = await (
        await service.client.get("/api/v1/persona/prompt", headers=service.admin)
    ).text()
    assert prompt.startswith("You are the digital clone of Mara L.")
    assert "(weight 10)" in prompt
    me = await (await service.client.get("/api/v1/me", headers=service.auth())).json()
    assert me["clone"]["name"] == "Mara L."


async def test_invalid_persona_is_rejected_with_the_reason(service: Service) -> None:
    document = yaml.safe_load(SAMPLE_PERSONA.read_text())
    document["traits"][1]["weight"] = 11
    response = await service.client.put("/api/v1/persona", json=document, headers=service.admin)
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_persona"
    assert "traits[1].weight" in body["message"]
    current = await (await service.client.get("/api/v1/persona", headers=service.admin)).json()
    assert current["persona"]["traits"][1]["weight"] == 8  # unchanged


async def test_openapi_describes_exactly_the_routes(service: Service) -> None:
    response = await service.client.get("/api/v1/openapi.json", headers=service.auth())
    assert response.status == 200
    spec = await response.json()
    assert spec == openapi_document()
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    routed = set()
    for route in service.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/api/") and route.method != "HEAD":
            routed.add((route.method, path))
    assert documented == routed


async def test_a_changed_persona_reaches_the_next_turn(service: Service) -> None:
    conversation = await service.new_conversation()
    await service.say(conversation, "who are you?")
    document = yaml.safe_load(SAMPLE_PERSONA.read_text())
    document["name"] = "Mara L."
    response = await service.client.put("/api/v1/persona", json=document, headers=service.admin)
    assert response.status == 200
    await service.say(conversation, "and now?")
    first, second = (r.body["system"][0]["text"] for r in service.standin.message_requests)
    assert first.startswith("You are the digital clone of") and "Mara L." not in first
    assert second.startswith("You are the digital clone of Mara L.")


async def test_token_use_is_recorded_at_most_once_a_minute(service: Service) -> None:
    db = service.app[DATABASE]
    await service.client.get("/api/v1/conversations", headers=service.auth())
    [token] = [t for t in await service.app[TOKENS].all() if t.name == "test-chat"]
    assert token.last_used_at is not None
    writes = db.committer.jobs if db.committer else -1
    minute = datetime.now(UTC).isoformat()[:16]
    for _ in range(5):
        response = await service.client.get("/api/v1/conversations", headers=service.auth())
        assert response.status == 200
    # Used again within the minute: nothing more to record, not even an empty write (one,
    # if the minute turned meanwhile).
    turned = datetime.now(UTC).isoformat()[:16] != minute
    assert db.committer is not None and db.committer.jobs - writes == int(turned)
