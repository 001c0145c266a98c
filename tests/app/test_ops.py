"""Operational endpoints: /health, /health/ready, /info, /metrics, and headers/errors."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.conftest import Service, ServiceFactory

SECURITY_HEADERS = (
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "Referrer-Policy",
)


async def test_health_answers_without_dependencies(service: Service) -> None:
    response = await service.client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.both_engines
async def test_ready_when_everything_is_in_place(service: Service) -> None:
    response = await service.client.get("/health/ready")
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == "ready"
    assert set(body["checks"]) >= {"database", "migrations", "persona", "claude"}
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["database"]["size_bytes"] > 0


async def test_not_ready_without_claude_key_but_still_serving(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(anthropic_api_key=None)
    response = await service.client.get("/health/ready")
    body = await response.json()
    assert response.status == 503
    assert body["checks"]["claude"] == {
        **body["checks"]["claude"],
        "ok": False,
        "detail": "ANTHROPIC_API_KEY is not set",
    }
    assert body["checks"]["database"]["ok"] is True
    # The chat endpoint says what to do, quickly, naming the setting.
    conversation = await service.new_conversation()
    response = await service.client.post(
        f"/api/v1/conversations/{conversation}/messages",
        json={"text": "hi"},
        headers=service.auth(),
    )
    assert response.status == 503
    body = await response.json()
    assert body["error"] == "claude_not_configured"
    assert "ANTHROPIC_API_KEY" in body["message"]
    assert int(response.headers["Retry-After"]) > 0


async def test_not_ready_without_persona(make_service: ServiceFactory) -> None:
    service = await make_service(persona=False)
    response = await service.client.get("/health/ready")
    body = await response.json()
    assert response.status == 503
    assert body["checks"]["persona"]["ok"] is False
    assert "digitalme persona import" in body["checks"]["persona"]["detail"]


async def test_info(service: Service) -> None:
    response = await service.client.get("/info")
    body = await response.json()
    assert response.status == 200
    assert body["environment"] == "test"
    assert body["version"]
    assert "commit" in body
    started = datetime.fromisoformat(body["started_at"])
    now = datetime.fromisoformat(body["now"])
    assert started <= now


@pytest.mark.both_engines
async def test_metrics_exports_prometheus_text(service: Service) -> None:
    conversation = await service.new_conversation()
    await service.say(conversation, "Hello there")
    response = await service.client.get(
        "/metrics", headers={"Authorization": f"Bearer {service.settings.metrics_token}"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    for name in (
        "digitalme_http_requests_total",
        "digitalme_http_request_duration_seconds",
        "digitalme_claude_calls_total",
        "digitalme_claude_tokens_total",
        "digitalme_claude_breaker_state",
        "digitalme_database_size_bytes",
        "digitalme_claude_errors_total",
        "digitalme_claude_cost_usd_total",
    ):
        assert name in text, name
    assert 'digitalme_claude_calls_total{outcome="ok"} 1.0' in text
    assert (
        'digitalme_http_requests_total{method="POST",'
        'route="/api/v1/conversations/{conversation_id}/messages",status="201"} 1.0'
    ) in text
    size = [line for line in text.splitlines() if line.startswith("digitalme_database_size_bytes ")]
    assert float(size[0].split()[1]) > 0


async def test_metrics_refused_through_the_proxy(service: Service) -> None:
    # Caddy (a trusted proxy on loopback) always adds X-Forwarded-For: refused even with
    # the token.
    response = await service.client.get(
        "/metrics",
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "Authorization": f"Bearer {service.settings.metrics_token}",
        },
    )
    assert response.status == 404


async def test_metrics_need_the_metrics_token(service: Service) -> None:
    token = service.settings.metrics_token
    assert token is not None
    for headers in (
        {},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"Authorization": "Bearer é"},
        # An API token, even an admin's, is not the metrics token.
        service.admin,
    ):
        response = await service.client.get("/metrics", headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        body = await response.json()
        assert body["error"] == "invalid_token" and "DIGITALME_METRICS_TOKEN" in body["message"]
        assert "digitalme_" not in await response.text()
    # Many wrong guesses do not lock the scraper out (/metrics is never rate-limited).
    assert "digitalme_http_requests_total" in await service.metrics_text()
    response = await service.client.get("/metrics", headers={"Authorization": f"bearer  {token} "})
    assert response.status == 200  # the scheme is case-insensitive (RFC 7235)


async def test_metrics_are_off_without_a_metrics_token(make_service: ServiceFactory) -> None:
    service = await make_service(metrics_token=None)
    response = await service.client.get("/metrics", headers=service.admin)
    assert response.status == 404
    body = await response.json()
    assert body == {
        "error": "metrics_not_configured",
        "message": "/metrics is off: DIGITALME_METRICS_TOKEN is not set",
    }
    assert (await service.client.get("/health")).status == 200


async def test_security_headers_on_every_kind_of_response(service: Service) -> None:
    for path in ("/health", "/", "/static/chat.js", "/no/such/path", "/api/v1/conversations"):
        response = await service.client.get(path)
        for header in SECURITY_HEADERS:
            assert header in response.headers, (path, header)
        csp = response.headers["Content-Security-Policy"]
        assert "unsafe-eval" not in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp


async def test_unknown_route_and_wrong_method_answer_json(service: Service) -> None:
    response = await service.client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    response = await service.client.delete("/health")
    assert response.status == 405
    body = await response.json()
    assert body["error"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]
