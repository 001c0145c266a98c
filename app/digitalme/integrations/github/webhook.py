"""GitHub webhook: ``X-Hub-Signature-256`` verified by gidgethub on the raw body, then the
event stored by ``X-GitHub-Delivery`` (a redelivery from the settings page has the same id).

Only the SHA-256 signature is accepted: gidgethub would fall back to the legacy SHA-1
``X-Hub-Signature``, so its absence is refused here first.
"""

from __future__ import annotations

from aiohttp import web
from gidgethub import BadRequest, ValidationFailure, sansio

from ..channel import Channel, malformed, refuse

SIGNATURE_HEADER = "X-Hub-Signature-256"
# Events recorded as the owner's activity; anything else is only acknowledged.
RECORDED_EVENTS = frozenset(
    {
        "issues",
        "pull_request",
        "push",
        "issue_comment",
        "pull_request_review",
        "pull_request_review_comment",
    }
)


async def receive(channel: Channel, request: web.Request) -> web.Response:
    channel.require_enabled()
    secret = channel.settings.github_webhook_secret
    assert secret is not None
    raw = await request.read()
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature.startswith("sha256="):
        raise refuse(
            request,
            401,
            "bad_signature",
            "invalid_signature",
            f"missing {SIGNATURE_HEADER} (sha256=...)",
        )
    try:
        sansio.validate_event(raw, signature=signature, secret=secret)
    except ValidationFailure:
        raise refuse(
            request,
            401,
            "bad_signature",
            "invalid_signature",
            f"{SIGNATURE_HEADER} does not match the body",
        ) from None
    if not request.headers.get("X-GitHub-Event") or not request.headers.get("X-GitHub-Delivery"):
        raise malformed(request, "missing X-GitHub-Event or X-GitHub-Delivery")
    try:
        event = sansio.Event.from_http(request.headers, raw, secret=secret)
    except BadRequest as exc:  # a content type other than JSON or a form
        raise malformed(request, str(exc)) from None
    except (ValueError, KeyError, IndexError, RecursionError):
        raise malformed(request, "the body is not a valid GitHub event payload") from None
    if not isinstance(event.data, dict):
        raise malformed(request, "the event payload must be a JSON object")
    if event.event == "ping":
        channel.note(request, "ping")
        return web.json_response({"status": "pong", "hook_id": event.data.get("hook_id")})
    action = event.data.get("action")
    kind = f"{event.event}.{action}" if isinstance(action, str) else event.event
    ingested = await channel.ingest(
        request,
        event.delivery_id,
        kind,
        {"event": event.event, "payload": event.data},
        ignored=event.event not in RECORDED_EVENTS,
    )
    if ingested.duplicate:
        return web.json_response({"status": "duplicate"})
    return web.json_response({"status": "accepted"}, status=202)
