"""Slack webhooks: the Events API and the ``/digitalme`` slash command.

Both are signed the same way (``v0=`` HMAC-SHA256 of ``v0:{timestamp}:{raw body}`` with the
app's signing secret), checked with ``slack_sdk``'s :class:`SignatureVerifier` after a
timestamp check of our own, so a stale request gets its own error (both are 401).

Events are stored by ``event_id``: Slack's retries (``X-Slack-Retry-Num``) carry the same
id, so they are answered once. Slash commands are never retried by Slack; they are stored
by their ``trigger_id`` and acknowledged at once with an ephemeral note, then answered
through their ``response_url``.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
from typing import Any

from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from ..channel import Channel, json_payload, malformed, refuse

TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
SIGNATURE_HEADER = "X-Slack-Signature"
MAX_CLOCK_SKEW = 300  # seconds: Slack's five-minute window
SLACK_HOOKS_HOST = "hooks.slack.com"

HELP_TEXT = (
    "Ask me anything with `/digitalme your question`: I answer the way my owner "
    "would. You can also mention me in a channel or write to me directly."
)
ACK_TEXT = "Thinking… I'll answer here in a moment."

_MENTION = re.compile(r"<@[A-Z0-9]+(?:\|[^>]*)?>")


def verify(channel: Channel, verifier: SignatureVerifier, request: web.Request, raw: bytes) -> None:
    timestamp = request.headers.get(TIMESTAMP_HEADER)
    signature = request.headers.get(SIGNATURE_HEADER)
    if not timestamp or not signature:
        raise refuse(
            request,
            401,
            "bad_signature",
            "invalid_signature",
            f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}",
        )
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise refuse(
            request,
            401,
            "bad_signature",
            "invalid_signature",
            f"{TIMESTAMP_HEADER} is not a unix time",
        ) from None
    if abs(time.time() - sent_at) > MAX_CLOCK_SKEW:
        raise refuse(
            request,
            401,
            "stale_timestamp",
            "stale_timestamp",
            "the request timestamp is more than five minutes from now "
            "(a replay, or a clock out of sync)",
        )
    if not verifier.is_valid(raw, timestamp, signature):
        raise refuse(
            request,
            401,
            "bad_signature",
            "invalid_signature",
            "the Slack signature does not match the body",
        )


def bot_user_id(body: dict[str, Any]) -> str | None:
    for authorization in body.get("authorizations") or []:
        if isinstance(authorization, dict) and authorization.get("is_bot"):
            user = authorization.get("user_id")
            return str(user) if user else None
    return None


def classify(body: dict[str, Any], event: dict[str, Any]) -> tuple[str, bool]:
    """(kind, ignored): direct messages and mentions are answered; the bot's own messages,
    edits, joins and everything else are only recorded."""
    event_type = str(event.get("type") or "unknown")
    own = bot_user_id(body)
    from_a_bot = bool(event.get("bot_id")) or (own is not None and event.get("user") == own)
    has_text = isinstance(event.get("text"), str) and bool(_MENTION.sub("", event["text"]).strip())
    well_formed = isinstance(event.get("channel"), str) and isinstance(event.get("ts"), str)
    if event_type == "message":
        if event.get("subtype") or from_a_bot:
            return f"message.{event.get('subtype') or 'bot'}", True
        if event.get("channel_type") == "im" and has_text and well_formed:
            return "direct_message", False
        return f"message.{event.get('channel_type') or 'other'}", True
    if event_type == "app_mention":
        if from_a_bot or not has_text or not well_formed:
            return "app_mention.ignored", True
        if str(event.get("channel", "")).startswith("D"):
            # In a direct message the message.im event is answered instead.
            return "app_mention.dm", True
        return "mention", False
    return event_type, True


async def events(
    channel: Channel, verifier: SignatureVerifier, request: web.Request
) -> web.Response:
    channel.require_enabled()
    raw = await request.read()
    verify(channel, verifier, request, raw)
    body = json_payload(request, raw)
    body_type = body.get("type")
    if body_type == "url_verification":
        challenge = body.get("challenge")
        if not isinstance(challenge, str):
            raise malformed(request, "url_verification without a challenge")
        channel.note(request, "url_verification")
        return web.json_response({"challenge": challenge})
    if body_type != "event_callback":
        channel.note(request, "ignored")
        return web.json_response({})
    event_id, event = body.get("event_id"), body.get("event")
    if not isinstance(event_id, str) or not event_id or not isinstance(event, dict):
        raise malformed(request, "event_callback without event_id or event")
    kind, ignored = classify(body, event)
    await channel.ingest(request, event_id, kind, body, ignored=ignored)
    return web.json_response({})


def response_url_allowed(url: str, api_base: str | None) -> bool:
    """Replies go only to Slack's hooks host (over HTTPS) or to the configured API's own
    scheme and host (a stand-in in tests)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https" and parsed.hostname == SLACK_HOOKS_HOST:
        return True
    if api_base:
        api = urllib.parse.urlsplit(api_base)
        return (parsed.scheme, parsed.netloc) == (api.scheme, api.netloc) and bool(api.netloc)
    return False


async def commands(
    channel: Channel, verifier: SignatureVerifier, request: web.Request
) -> web.Response:
    channel.require_enabled()
    raw = await request.read()
    verify(channel, verifier, request, raw)
    try:
        form = urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise malformed(request, "the body is not a UTF-8 form") from None
    fields = {key: values[0] for key, values in form.items() if values}
    for required in ("command", "response_url", "channel_id", "user_id"):
        if not fields.get(required):
            raise malformed(request, f"the slash command has no {required}")
    if not response_url_allowed(fields["response_url"], channel.settings.slack_api_base):
        raise malformed(request, "response_url is not a Slack URL")
    text = fields.get("text", "").strip()
    if not text or text.lower() == "help":
        channel.note(request, "answered")
        return web.json_response({"response_type": "ephemeral", "text": HELP_TEXT})
    delivery_id = fields.get("trigger_id") or hashlib.sha256(raw).hexdigest()
    await channel.ingest(request, delivery_id, "command", fields)
    return web.json_response({"response_type": "ephemeral", "text": ACK_TEXT})


def without_mentions(text: str) -> str:
    return " ".join(_MENTION.sub(" ", text).split())
