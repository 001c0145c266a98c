"""Telegram's side of the worker: answer a text message in its chat with ``sendMessage``.

``/start`` and ``/help`` get a fixed introduction (no Claude call); any other text goes to
Claude in the chat's conversation. Replies longer than Telegram's 4096 characters go out
in parts; each part accepted is noted, so a retry sends only what is missing.

The Bot API has no idempotency key and no way for a bot to read a chat's messages: a part
whose send may have arrived (a crash or a timeout before Telegram's answer) cannot be
checked, and is sent again (``digitalme_outbound_reconciled_total{result="unknowable"}``):
that part may show twice. Only that part: the send's start is recorded before the request,
so every other part is known sent or not (docs/channels.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...inbox import InboxItem
from ...outbound import Outbound, PermanentError
from ...worker import Outcome
from ..channel import ChannelContext, send_parts, split_text, stored_reply

MESSAGE_LIMIT = 4096
SERVICE = "telegram"


class TelegramApi:
    """The few Bot API methods we call, through the shared outbound session."""

    def __init__(self, outbound: Outbound, base_url: str, token: str) -> None:
        self.outbound = outbound
        self.base_url = base_url.rstrip("/")
        self.token = token

    async def call(self, method: str, payload: dict[str, Any], *, uncertain: bool = False) -> Any:
        answer = await self.outbound.request_json(
            SERVICE,
            "POST",
            f"{self.base_url}/bot{self.token}/{method}",
            json_body=payload,
            redact=self.token,
            uncertain=uncertain,
        )
        if not isinstance(answer, dict) or not answer.get("ok"):
            raise PermanentError(SERVICE, f"{method} did not answer ok: {str(answer)[:200]}")
        return answer.get("result")

    async def send_message(
        self, chat_id: int, text: str, *, reply_to: int | None = None, uncertain: bool = False
    ) -> int | None:
        """``uncertain``: an earlier send of this message may have arrived; there is no way
        to ask, so it is sent again (and counted)."""
        payload: dict[str, Any] = {"chat_id": chat_id, "text": text}
        if reply_to is not None:
            payload["reply_parameters"] = {
                "message_id": reply_to,
                "allow_sending_without_reply": True,
            }
        result = await self.call("sendMessage", payload, uncertain=uncertain)
        return result.get("message_id") if isinstance(result, dict) else None

    async def set_webhook(self, url: str, secret_token: str, allowed_updates: Sequence[str]) -> Any:
        return await self.call(
            "setWebhook",
            {"url": url, "secret_token": secret_token, "allowed_updates": list(allowed_updates)},
        )


def command_of(text: str) -> str | None:
    """``/help@MyBot args`` -> ``/help``."""
    if not text.startswith("/"):
        return None
    return text.split(maxsplit=1)[0].split("@", 1)[0].lower()


async def introduction(ctx: ChannelContext) -> str:
    stored = await ctx.chat.personas.load()
    name = stored.persona.name if stored else "the owner"
    return (
        f"Hi! I'm the digital clone of {name}: I answer the way {name} would, from what "
        f"I know of them. Just write your message.\n\n"
        "/help shows this again. I'm an AI, so I can be wrong; for anything important, "
        f"check with {name} directly."
    )


def lane(kind: str, update: dict[str, Any]) -> str | None:
    """The chat: its messages are answered one at a time, in order."""
    chat = (update.get("message") or {}).get("chat") or {}
    return str(chat["id"]) if "id" in chat else None


async def process(ctx: ChannelContext, api: TelegramApi | None, item: InboxItem) -> Outcome:
    if api is None:
        raise PermanentError(
            SERVICE,
            "DIGITALME_TELEGRAM_BOT_TOKEN is not set; set it, "
            "restart, then `digitalme inbox retry`",
        )
    message = item.data["message"]
    chat = message["chat"]
    chat_id: int = chat["id"]
    text: str = message["text"].strip()
    if command_of(text) in ("/start", "/help"):
        answer = await introduction(ctx)
    else:
        title = chat.get("title") or chat.get("username") or chat.get("first_name")
        conversation = await ctx.conversations.get_or_create(
            SERVICE, str(chat_id), title=str(title) if title else None
        )
        reply = await stored_reply(
            ctx, item, conversation, text, channel_message_id=str(message["message_id"])
        )
        answer = reply.text
    parts = split_text(answer, MESSAGE_LIMIT)

    async def send(index: int, text: str, uncertain: bool, _began: float) -> str:
        sent = await api.send_message(
            chat_id,
            text,
            uncertain=uncertain,
            reply_to=message["message_id"] if index == 0 else None,
        )
        return f"message_id {sent}"

    await send_parts(ctx, item, parts, send)
    return Outcome.done(f"answered chat {chat_id} in {len(parts)} message(s)")
