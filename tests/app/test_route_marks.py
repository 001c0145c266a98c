"""Every route carries its mark (marks.py), and the request pipeline admits a request as its
route's mark says: no list of paths in the middleware."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from digitalme.keys import ROUTE_MARKS
from digitalme.marks import API, OPS, PUBLIC, RouteMarks, webhook
from tests.conftest import Service, ServiceFactory


def test_every_route_of_the_service_has_a_mark(service: Service) -> None:
    assert service.app[ROUTE_MARKS].unmarked(service.app) == []


def test_a_route_added_around_the_marks_is_found_and_a_second_mark_is_refused() -> None:
    app = web.Application()
    marks = RouteMarks()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    marks.add(app, OPS, [web.get("/health", handler)])
    app.add_routes([web.get("/sneaked/{in}", handler)])
    assert marks.unmarked(app) == ["/sneaked/{in}"]
    try:
        marks.add(app, PUBLIC, [web.post("/health", handler)])
    except ValueError as exc:
        assert "/health" in str(exc) and "ops" in str(exc)
    else:
        raise AssertionError("a path marked twice was accepted")


async def test_marks_by_fixed_path_by_resource_and_for_what_matches_nothing(
    service: Service,
) -> None:
    app = service.app

    async def mark_of(method: str, path: str) -> object:
        """The mark of a request routed as the app routes it."""
        request = make_mocked_request(method, path, app=app)
        request._match_info = await app.router.resolve(request)
        return app[ROUTE_MARKS].of(request)

    assert await mark_of("GET", "/health") == OPS
    assert await mark_of("GET", "/api/v1/conversations/nope/messages") == API
    assert await mark_of("GET", "/static/chat.js") == PUBLIC
    assert await mark_of("GET", "/no/such/path") == PUBLIC
    # A wrong method: no route matched, the path is the webhook's.
    assert await mark_of("GET", "/webhooks/telegram") == webhook("telegram")
    assert await mark_of("POST", "/webhooks/no-such-channel") == PUBLIC


async def test_a_wrong_method_on_a_webhook_counts_as_that_channels_delivery(
    service: Service,
) -> None:
    response = await service.client.get("/webhooks/github")
    assert response.status == 405
    assert (
        'digitalme_webhook_deliveries_total{channel="github",outcome="wrong_method"} 1.0'
        in await service.metrics_text()
    )


async def test_ops_and_api_answers_are_not_stored_and_the_chat_page_may_be(
    service: Service,
) -> None:
    client = service.client
    for path, headers in (("/health", {}), ("/info", {}), ("/api/v1/me", service.auth())):
        response = await client.get(path, headers=headers)
        assert response.headers.get("Cache-Control") == "no-store", path
    assert (await client.get("/")).headers.get("Cache-Control") != "no-store"


async def test_the_limit_spares_ops_and_a_token_is_read_only_on_api_routes(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(rate_limit_per_minute=2)
    client = service.client
    for _ in range(5):
        assert (await client.get("/health")).status == 200
    # A bearer token means nothing to the web chat's page: it is not checked there (no
    # 401), and the page is limited by address.
    bad = {"Authorization": "Bearer not-a-token"}
    statuses = [(await client.get("/", headers=bad)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    # On the API it is checked: a bad one is refused.
    service = await make_service(rate_limit_per_minute=100)
    response = await service.client.get("/api/v1/me", headers=bad)
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_token"
