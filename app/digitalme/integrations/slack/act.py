"""Slack's side of the worker: answer direct messages and mentions in their thread with
``chat.postMessage`` (slack_sdk's AsyncWebClient on the shared session), and slash
commands through their ``response_url``.

A reply longer than :data:`MESSAGE_LIMIT` goes out in parts; each part accepted is noted.

Each part carries message metadata naming it (``event_type`` :data:`METADATA_EVENT`, the
delivery's event id and the part's index as ``key``). A part whose send may have arrived
(a crash, a timeout or a 5xx before Slack's answer) is looked up in its thread first
(``conversations.replies`` with ``include_all_metadata``, from a little before the send
began) and only sent if it is not there: Slack replies are sent once, crash or not. That
needs the history scopes of the conversations the bot answers in (``im:history``,
``channels:history``, ``groups:history``, ``mpim:history``); without them the lookup says
``missing_scope`` and the part is sent again, counted as unknowable. Slash-command answers
go to a ``response_url``, which can be neither looked up nor made idempotent: a part whose
send may have arrived is sent again (docs/channels.md).
"""

from __future__ import annotations

from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from ...inbox import InboxItem
from ...outbound import Outbound, OutboundError, PermanentError, TransientError, parse_retry_after
from ...worker import Outcome
from ..channel import ChannelContext, send_parts, split_text, stored_reply
from .webhook import without_mentions

MESSAGE_LIMIT = 3900  # Slack truncates message text past 40,000, and advises under 4,000
SERVICE = "slack"
# The metadata each reply part carries, to be found again (alphanumeric and underscores).
METADATA_EVENT = "digitalme_reply"
# The lookup reads the thread from this long before the send began: Slack's clock (its ts)
# and ours may differ by this much.
RECONCILE_MARGIN_SECONDS = 600.0
RECONCILE_PAGE = 200
# Slack's `error` values that mean "try again later", not "this request is wrong".
TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


def _classify(exc: SlackApiError) -> OutboundError:
    response = exc.response
    status = getattr(response, "status_code", 0) or 0
    error = ""
    try:
        error = str(response.get("error") or "")
    except (AttributeError, ValueError):
        pass
    headers = getattr(response, "headers", {}) or {}
    detail = f"HTTP {status}: {error or 'not ok'}"
    if status == 429 or status >= 500 or error in TRANSIENT_ERRORS:
        return TransientError(
            SERVICE,
            detail,
            status=status,
            retry_after=parse_retry_after(headers.get("Retry-After")),
        )
    return PermanentError(SERVICE, detail, status=status)


class SlackApi:
    def __init__(self, outbound: Outbound, base_url: str, token: str) -> None:
        self.outbound = outbound
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self._client: AsyncWebClient | None = None

    @property
    def client(self) -> AsyncWebClient:
        # Made on first use: the shared session only exists once the app has started.
        session = self.outbound.session
        if self._client is None or self._client.session is not session:
            self._client = AsyncWebClient(
                token=self.token,
                base_url=self.base_url,
                session=session,
                timeout=int(max(1, self.outbound.settings.outbound_timeout_seconds)),
                retry_handlers=[],
            )  # our retry policy, not the SDK's
        return self._client

    async def post_message(
        self,
        channel: str,
        text: str,
        thread_ts: str,
        *,
        key: str,
        uncertain: bool = False,
        since: float | None = None,
    ) -> str | None:
        """Post ``text`` in the thread, marked with ``key``. ``uncertain``: a send of it
        that began at ``since`` may have arrived: look for it in the thread first."""
        metadata = {"event_type": METADATA_EVENT, "event_payload": {"key": key}}

        async def attempt() -> Any:
            try:
                return await self.client.chat_postMessage(
                    channel=channel, text=text, thread_ts=thread_ts, metadata=metadata
                )
            except SlackApiError as exc:
                raise _classify(exc) from exc

        async def reconcile() -> Any:
            return await self.find_reply(channel, thread_ts, key, since)

        response = await self.outbound.with_retries(
            SERVICE, attempt, uncertain=uncertain, reconcile=reconcile
        )
        ts = response.get("ts")
        return str(ts) if ts else None

    async def find_reply(
        self, channel: str, thread_ts: str, key: str, since: float | None
    ) -> dict[str, Any] | None:
        """The thread's message marked with ``key`` ({"ts": ...}), or None. Raises
        PermanentError when Slack will not say (e.g. ``missing_scope``)."""
        oldest = f"{max(0.0, since - RECONCILE_MARGIN_SECONDS):.6f}" if since else None
        cursor = None
        while True:
            try:
                page = await self.client.conversations_replies(
                    channel=channel,
                    ts=thread_ts,
                    oldest=oldest,
                    inclusive=True,
                    include_all_metadata=True,
                    limit=RECONCILE_PAGE,
                    cursor=cursor,
                )
            except SlackApiError as exc:
                raise _classify(exc) from exc
            for message in page.get("messages") or []:
                metadata = message.get("metadata") or {}
                if (
                    metadata.get("event_type") == METADATA_EVENT
                    and (metadata.get("event_payload") or {}).get("key") == key
                ):
                    return {"ts": message.get("ts")}
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None


async def respond(
    outbound: Outbound, response_url: str, text: str, *, uncertain: bool = False
) -> None:
    """``uncertain``: an earlier post of it may have arrived; a response_url cannot be
    asked, so it is posted again (and counted)."""
    await outbound.request_json(
        SERVICE,
        "POST",
        response_url,
        uncertain=uncertain,
        json_body={"response_type": "ephemeral", "replace_original": False, "text": text},
    )


def lane(kind: str, data: dict[str, Any]) -> str | None:
    """The conversation a delivery is answered in: a thread, or a user's slash commands in
    a channel (the same keys as the conversations they are stored in)."""
    if kind == "command":
        return f"command:{data.get('channel_id')}:{data.get('user_id')}"
    event = data.get("event") or {}
    if "channel" not in event:
        return None
    return f"{event['channel']}:{event.get('thread_ts') or event.get('ts')}"


async def process(ctx: ChannelContext, api: SlackApi | None, item: InboxItem) -> Outcome:
    if item.kind == "command":
        return await _command(ctx, item)
    if api is None:
        raise PermanentError(
            SERVICE,
            "DIGITALME_SLACK_BOT_TOKEN is not set; set it, restart, then `digitalme inbox retry`",
        )
    event = item.data["event"]
    channel, ts = event["channel"], event["ts"]
    thread_ts = event.get("thread_ts") or ts
    conversation = await ctx.conversations.get_or_create(SERVICE, f"{channel}:{thread_ts}")
    reply = await stored_reply(
        ctx,
        item,
        conversation,
        without_mentions(event["text"]),
        channel_message_id=f"{channel}:{ts}",
    )
    parts = split_text(reply.text, MESSAGE_LIMIT)

    async def send(index: int, text: str, uncertain: bool, began: float) -> str:
        sent = await api.post_message(
            channel,
            text,
            thread_ts,
            uncertain=uncertain,
            since=began,
            key=f"{item.delivery_id}:{index}",
        )
        return f"ts {sent}"

    await send_parts(ctx, item, parts, send)
    return Outcome.done(f"answered in thread {channel}:{thread_ts}")


async def _command(ctx: ChannelContext, item: InboxItem) -> Outcome:
    fields = item.data
    conversation = await ctx.conversations.get_or_create(
        SERVICE,
        f"command:{fields['channel_id']}:{fields['user_id']}",
        title=f"{fields['command']} by {fields.get('user_name') or fields['user_id']}",
    )
    reply = await stored_reply(
        ctx, item, conversation, fields["text"].strip(), channel_message_id=fields.get("trigger_id")
    )
    parts = split_text(reply.text, MESSAGE_LIMIT)

    async def send(_index: int, text: str, uncertain: bool, _began: float) -> str:
        await respond(ctx.outbound, fields["response_url"], text, uncertain=uncertain)
        return "response_url"

    await send_parts(ctx, item, parts, send)
    return Outcome.done(f"answered {fields['command']} through its response_url")
