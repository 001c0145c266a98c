"""Telegram webhook: the secret-token header, then the update, stored by ``update_id``.

Telegram does not sign the body; it sends the secret given to ``setWebhook`` in
``X-Telegram-Bot-Api-Secret-Token``, compared here in constant time before the body is read.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..channel import Channel, json_payload, malformed, refuse, secrets_match

AUTH_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# What `digitalme telegram set-webhook` asks Telegram to send; anything else is ignored.
ALLOWED_UPDATES = ("message",)


def classify(update: dict[str, Any]) -> tuple[str, bool]:
    """(kind, ignored): text messages from people are answered, the rest only recorded."""
    message = update.get("message")
    if isinstance(message, dict):
        sender = message.get("from")
        if not isinstance(sender, dict):
            sender = {}
        chat = message.get("chat")
        if (
            isinstance(message.get("text"), str)
            and message["text"].strip()
            and isinstance(chat, dict)
            and isinstance(chat.get("id"), int)
            and isinstance(message.get("message_id"), int)
            and not sender.get("is_bot")
        ):
            return "message", False
        return "message_without_text", True
    kinds = [key for key in update if key != "update_id"]
    return (kinds[0] if kinds else "empty"), True


async def receive(channel: Channel, request: web.Request) -> web.Response:
    channel.require_enabled()
    secret = channel.settings.telegram_secret_token
    assert secret is not None
    if not secrets_match(secret, request.headers.get(AUTH_HEADER)):
        raise refuse(
            request, 401, "bad_signature", "invalid_secret_token", f"missing or wrong {AUTH_HEADER}"
        )
    update = json_payload(request, await request.read())
    update_id = update.get("update_id")
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        raise malformed(request, "update_id must be an integer")
    kind, ignored = classify(update)
    await channel.ingest(request, str(update_id), kind, update, ignored=ignored)
    return web.json_response({})
