"""What every channel shares: :class:`Channel` (the base each platform's package
subclasses), :class:`ChannelContext`, the request helpers, :func:`stored_reply` and
:func:`send_parts` (see the package's description)."""

from __future__ import annotations

import hmac
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..activity import ActivityStore
from ..chat import ChatService, Tool, Turn
from ..config import Settings
from ..conversations import Conversation, ConversationStore, Message
from ..errors import ApiError
from ..health import CheckResult
from ..inbox import InboxItem, InboxStore, Ingested
from ..metrics import Metrics
from ..outbound import Outbound, OutboundError
from ..tool_actions import ToolActionLog
from ..worker import Outcome

log = logging.getLogger(__name__)

# Request key: how the webhook handler ended, for digitalme_webhook_deliveries_total.
WEBHOOK_OUTCOME = web.RequestKey("webhook_outcome", str)


@dataclass
class ChannelContext:
    """What a channel may use. Built by ``create_app`` without I/O."""

    settings: Settings
    metrics: Metrics
    inbox: InboxStore
    chat: ChatService
    conversations: ConversationStore
    activity: ActivityStore
    outbound: Outbound
    tool_actions: ToolActionLog
    wake_worker: Callable[[], None]


class Channel(ABC):
    """One platform: its webhook routes, readiness, and inbox processor."""

    name: str
    title: str  # the platform's name as people write it ("GitHub")
    records_activity: bool = False  # its events are the owner's activity (activity.py)
    required_setting: str  # the variable whose absence turns the channel off

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings

    @property
    @abstractmethod
    def enabled(self) -> bool:
        """The webhook secret is set: deliveries are accepted."""

    @abstractmethod
    def routes(self) -> list[web.RouteDef]: ...

    @abstractmethod
    async def process(self, item: InboxItem) -> Outcome: ...

    def lane(self, kind: str, payload: Any) -> str | None:
        """The conversation a delivery belongs to (its key within the channel), kept with
        it in the inbox: one conversation's deliveries are processed one at a time, in
        order, by whichever host. None: no order needed (the default)."""
        return None

    def status(self) -> CheckResult:
        """Readiness detail; override to check outbound tokens."""
        if not self.enabled:
            return CheckResult(True, f"off ({self.required_setting} not set)", {"enabled": False})
        return CheckResult(True, "on", {"enabled": True})

    async def check(self) -> CheckResult:
        return self.status()

    def tools(self) -> list[Tool]:
        """The tools the channel gives Claude in every chat (none by default)."""
        return []

    # --- helpers for webhook handlers ----------------------------------------------------

    def require_enabled(self) -> None:
        if not self.enabled:
            raise ApiError(
                404,
                "channel_not_configured",
                f"the {self.name} channel is off: {self.required_setting} is not set",
                channel=self.name,
            )

    def note(self, request: web.Request, outcome: str) -> None:
        """Record how a delivery that needs no inbox item ended (e.g. a ping)."""
        request[WEBHOOK_OUTCOME] = outcome

    async def ingest(
        self,
        request: web.Request,
        delivery_id: str,
        kind: str,
        payload: Any,
        *,
        ignored: bool = False,
    ) -> Ingested:
        """Store a verified delivery, wake the worker, and note the outcome."""
        ingested = await self.ctx.inbox.ingest(
            self.name,
            delivery_id,
            kind,
            payload,
            ignored=ignored,
            lane=None if ignored else self.lane(kind, payload),
        )
        if ingested.duplicate:
            outcome = "duplicate"
        elif ignored:
            outcome = "ignored"
        else:
            outcome = "accepted"
            self.ctx.wake_worker()
        request[WEBHOOK_OUTCOME] = outcome
        log.debug(
            "%s delivery %s (%s): %s as inbox item %d",
            self.name,
            delivery_id,
            kind,
            outcome,
            ingested.item_id,
        )
        return ingested


def secrets_match(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a shared secret (bytes, so any input is safe)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode(errors="surrogateescape"))


def refuse(request: web.Request, status: int, outcome: str, code: str, message: str) -> ApiError:
    """A refusal of a delivery, counted under ``outcome``."""
    request[WEBHOOK_OUTCOME] = outcome
    return ApiError(status, code, message)


def json_payload(request: web.Request, raw: bytes) -> dict[str, Any]:
    """The verified body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise refuse(
            request, 400, "malformed", "invalid_json", "the request body is not valid JSON"
        ) from None
    if not isinstance(body, dict):
        raise refuse(
            request, 400, "malformed", "invalid_json", "the request body must be a JSON object"
        )
    return body


def malformed(request: web.Request, message: str) -> ApiError:
    return refuse(request, 400, "malformed", "malformed_payload", message)


# --- the worker's side: ask Claude at most once per delivery --------------------------------


async def _message(
    conversations: ConversationStore, conversation: Conversation, message_id: int
) -> Message | None:
    found = await conversations.messages(conversation.id, limit=1, before_id=message_id + 1)
    return found[0] if found and found[0].id == message_id else None


async def stored_reply(
    ctx: ChannelContext,
    item: InboxItem,
    conversation: Conversation,
    text: str,
    *,
    channel_message_id: str | None = None,
) -> Message:
    """Claude's reply to this delivery, stored: from an earlier attempt if there was one,
    else asked now. Progress is noted in the inbox as it happens, so a retry after an
    outage or a crash neither stores the message twice nor asks Claude twice."""
    conversations = ctx.conversations
    user: Message | None = None
    if item.reply_message_id is not None:
        reply = await _message(conversations, conversation, item.reply_message_id)
        if reply is not None:
            return reply
    if item.user_message_id is not None:
        # Asked before without an answer noted (an outage, or a crash in the instant
        # between storing the reply and noting it): ask again for the same stored message.
        user = await _message(conversations, conversation, item.user_message_id)
    final = None
    async for piece in ctx.chat.stream_reply(
        conversation, text, channel_message_id=channel_message_id, user_message=user, deltas=False
    ):
        if isinstance(piece, Message):
            if user is None:
                await ctx.inbox.set_user_message(item.id, piece.id)
                user = piece
        elif isinstance(piece, Turn):
            final = piece
    assert final is not None
    await ctx.inbox.set_reply_message(item.id, final.reply.id)
    return final.reply


# send(index, text, uncertain, since) -> the note kept in the inbox (e.g. the message's id).
# ``uncertain``: the part's send began at ``since`` and may have arrived (a crash or a
# timeout in between): ask the platform first, where it can say.
SendPart = Callable[[int, str, bool, float], Awaitable[str | None]]


async def send_parts(
    ctx: ChannelContext, item: InboxItem, parts: list[str], send: SendPart
) -> None:
    """Send the parts of a reply the platform does not have yet, in order.

    Before each part's request the inbox notes, durably, that its send began
    (``sending_since``); the outcome clears it: the platform accepted the part
    (``parts_sent`` advances) or refused it with a definite answer. A delivery that still
    has it set (a crash with the part in flight, or an attempt that ended in a timeout)
    makes the next attempt call ``send`` with ``uncertain``: the channel asks the platform
    whether the part arrived before sending it (again)."""
    for index in range(item.parts_sent, len(parts)):
        began = item.sending_since if index == item.parts_sent else None
        uncertain = began is not None
        if began is None:
            began = await ctx.inbox.begin_send(item.id)
        try:
            note = await send(index, parts[index], uncertain, began)
        except OutboundError as exc:
            if not exc.maybe_delivered:
                await ctx.inbox.end_send(item.id)
            raise
        await ctx.inbox.set_parts_sent(item.id, index + 1, result=note)


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in parts of at most ``limit`` characters, cut at paragraph, line or word
    boundaries where possible."""
    parts: list[str] = []
    rest = text.strip() or "…"
    while len(rest) > limit:
        cut = max(
            rest.rfind("\n\n", 0, limit), rest.rfind("\n", 0, limit), rest.rfind(" ", 0, limit)
        )
        if cut < limit // 2:
            cut = limit
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    parts.append(rest)
    return parts
