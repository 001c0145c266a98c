"""Request pipeline: metrics, JSON errors, client identity, authentication, rate limits,
and the security headers every response carries."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from multidict import istr

from .errors import HTTP_CODES, ApiError, error_response, retry_after_header
from .keys import (
    CLIENT_ADDRESS,
    METRICS,
    RATE_LIMITER,
    REQUEST_TOKEN,
    ROUTE_MARK,
    ROUTE_MARKS,
    SETTINGS,
    TOKENS,
    VIA_PROXY,
    WEBHOOK_OUTCOME,
)
from .marks import API, OPS, Mark

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# How a webhook request ended when its channel did not say (a refusal before its handler).
_WEBHOOK_STATUS_OUTCOMES = {
    400: "malformed",
    401: "bad_signature",
    404: "not_configured",
    405: "wrong_method",
    413: "too_large",
    429: "rate_limited",
    500: "error",
}

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(
    peer: str, forwarded_for: str | None, trusted: Sequence[Network]
) -> tuple[str, bool]:
    """The client's address, and whether the request came through a trusted proxy.

    X-Forwarded-For is believed only when the peer is a trusted proxy, and then only up to
    the first hop (from the right) that is not itself a trusted proxy.
    """
    if not forwarded_for or not _trusted(peer, trusted):
        return peer, False
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop[:64], True
    return (hops[0][:64] if hops else peer), True


@web.middleware
async def request_pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request's way through the service, in one middleware (each middleware is a
    coroutine and a call through aiohttp's chain): it is timed and counted (metrics), its
    client identified, authenticated and rate-limited, and any error becomes a JSON
    answer, whose status is what the metrics count."""
    started = time.monotonic()
    status = 500
    mark = request[ROUTE_MARK] = request.app[ROUTE_MARKS].of(request)
    try:
        try:
            response = await _admit(request, handler, mark)
        except ApiError as exc:
            response = error_response(
                exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                status = exc.status
                raise
            response = _http_error(request, exc)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(
                500, "internal_error", "something went wrong on our side; it has been logged"
            )
        status = response.status
        return response
    finally:
        metrics = request.app[METRICS]
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.http.observe(request.method, route, status, time.monotonic() - started)
        if mark.channel is not None:
            outcome = request.get(WEBHOOK_OUTCOME) or _WEBHOOK_STATUS_OUTCOMES.get(
                status, f"http_{status}"
            )
            metrics.webhook_delivery(mark.channel, outcome)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    if exc.status == 404:
        message = f"no such endpoint: {request.method} {request.path}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed here; allowed: {headers.get('Allow')}"
    elif exc.status == 413:
        limit = request.app[SETTINGS].max_body_bytes
        message = f"the request body is larger than {limit} bytes"
    else:
        message = exc.text or exc.reason
    return error_response(
        exc.status, HTTP_CODES.get(exc.status, "http_error"), message, headers=headers
    )


def _admit(request: web.Request, handler: Handler, mark: Mark) -> Awaitable[web.StreamResponse]:
    """Who is asking: address (through trusted proxies), bearer token, rate limit, as the
    route's mark says; then the handler. Operational endpoints go straight to it (no extra
    coroutine)."""
    settings = request.app[SETTINGS]
    forwarded_for = request.headers.get("X-Forwarded-For")
    if forwarded_for is None:
        address, via_proxy = request.remote or "", False
    else:
        address, via_proxy = client_address(
            request.remote or "", forwarded_for, settings.trusted_proxies
        )
    request[CLIENT_ADDRESS] = address
    request[VIA_PROXY] = via_proxy
    request[REQUEST_TOKEN] = None
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(settings.max_body_bytes, request.content_length)
    if mark is OPS:
        return handler(request)
    return _client(request, handler, address, mark)


async def _client(
    request: web.Request, handler: Handler, address: str, mark: Mark
) -> web.StreamResponse:
    key = f"address:{address}"
    if mark.channel is not None:  # a webhook: the channel verifies its deliveries
        limiter = request.app[RATE_LIMITER]
        if limiter.peek(key) > 0:
            _limit(request, key)
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status == 401:
                limiter.check(key)
            raise
    authorization = request.headers.get("Authorization")
    if authorization is not None and mark is API:
        scheme, _, secret = authorization.partition(" ")
        token = None
        if scheme.lower() == "bearer" and secret.strip():
            token = await request.app[TOKENS].authenticate(secret.strip())
        if token is None:
            _limit(request, key)  # failed attempts count against the address
            raise ApiError(
                401,
                "invalid_token",
                "the bearer token is not valid (unknown, revoked or malformed)",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        request[REQUEST_TOKEN] = token
        key = f"token:{token.id}"
        await request.app[TOKENS].touch(token)
    _limit(request, key)
    return await handler(request)


def _limit(request: web.Request, key: str) -> None:
    wait = request.app[RATE_LIMITER].check(key)
    if wait > 0:
        request.app[METRICS].rate_limited.inc()
        limit = request.app[RATE_LIMITER].per_minute
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests (limit {limit} per minute); retry after the Retry-After delay",
            headers=retry_after_header(wait),
        )


# istr keys: CIMultiDict takes them as they are (a str key is case-folded on every use).
_SECURITY_ITEMS = tuple((istr(name), value) for name, value in SECURITY_HEADERS.items())
_CACHE_CONTROL = istr("Cache-Control")


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    # A handler's own value wins; one extend() adds the rest at once. Most answers carry
    # none of them, which one pass over their few headers tells.
    if any(name in _SECURITY_NAMES for name in map(str.lower, headers)):
        headers.extend([item for item in _SECURITY_ITEMS if item[0] not in headers])
    else:
        headers.extend(_SECURITY_ITEMS)
    # (A response aiohttp makes before the pipeline ran, e.g. for a request it could not
    # parse, has no mark: it is not stored either way.)
    mark = request.get(ROUTE_MARK)
    if _CACHE_CONTROL not in headers and mark is not None and mark.no_store:
        headers[_CACHE_CONTROL] = "no-store"


_SECURITY_NAMES = frozenset(name.lower() for name in SECURITY_HEADERS)
