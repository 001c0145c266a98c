"""Operational endpoints: liveness, readiness, build info, Prometheus metrics."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from aiohttp import web

from .. import __version__
from ..errors import ApiError
from ..keys import METRICS, READINESS, RELEASE, SETTINGS, STARTED_AT, VIA_PROXY
from ..metrics import CONTENT_TYPE
from ..release import DEPLOY_FIELDS, read_json_object


async def health(request: web.Request) -> web.Response:
    """Alive: the process answers. Touches no dependency."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    is_ready, checks = await request.app[READINESS].run()
    return web.json_response(
        {"status": "ready" if is_ready else "not_ready", "checks": checks},
        status=200 if is_ready else 503,
    )


async def info(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    release = request.app[RELEASE]
    return web.json_response(
        {
            "name": "digitalme",
            "version": __version__,
            "commit": settings.commit or (release or {}).get("commit"),
            "environment": settings.environment,
            "started_at": request.app[STARTED_AT],
            "now": datetime.now(UTC).isoformat(timespec="seconds"),
            "release": release,
            "last_deploy": read_json_object(settings.deploy_record, DEPLOY_FIELDS),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, for the holder of DIGITALME_METRICS_TOKEN only: the app listens on
    loopback, where every local user could otherwise read it (docs/security.md)."""
    if request[VIA_PROXY]:
        # Scrapers talk to the app directly on loopback; the public proxy never serves this.
        raise web.HTTPNotFound()
    expected = request.app[SETTINGS].metrics_token
    if expected is None:
        raise ApiError(
            404, "metrics_not_configured", "/metrics is off: DIGITALME_METRICS_TOKEN is not set"
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        expected.encode(), given.strip().encode(errors="surrogateescape")
    ):
        raise ApiError(
            401,
            "invalid_token",
            "/metrics needs Authorization: Bearer <DIGITALME_METRICS_TOKEN>",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    body = await request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
