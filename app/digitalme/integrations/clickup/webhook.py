"""ClickUp webhook: ``X-Signature`` is the hex HMAC-SHA256 of the raw body with the
webhook's secret. Deliveries are stored by their history item ids (a retry carries the
same ones), or by a hash of the body when there are none."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from ..channel import Channel, json_payload, malformed, refuse, secrets_match

SIGNATURE_HEADER = "X-Signature"


def signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id_of(body: dict[str, object], raw: bytes) -> str:
    items = body.get("history_items")
    ids = (
        sorted(str(i["id"]) for i in items if isinstance(i, dict) and i.get("id"))
        if isinstance(items, list)
        else []
    )
    if not ids:
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    joined = "history:" + ",".join(ids)
    return (
        joined
        if len(joined) <= 200
        else "history-sha256:" + hashlib.sha256(joined.encode()).hexdigest()
    )


async def receive(channel: Channel, request: web.Request) -> web.Response:
    channel.require_enabled()
    secret = channel.settings.clickup_webhook_secret
    assert secret is not None
    raw = await request.read()
    given = request.headers.get(SIGNATURE_HEADER)
    if not secrets_match(signature(secret, raw), given.strip().lower() if given else None):
        raise refuse(
            request,
            401,
            "bad_signature",
            "invalid_signature",
            f"missing {SIGNATURE_HEADER} or it does not match the body",
        )
    body = json_payload(request, raw)
    event = body.get("event")
    if not isinstance(event, str) or not event:
        raise malformed(request, "the delivery has no event")
    await channel.ingest(
        request, delivery_id_of(body, raw), event, body, ignored=not event.startswith("task")
    )
    return web.json_response({"status": "accepted"})
