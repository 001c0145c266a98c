"""Slack's side of the worker: answer direct messages and mentions in their thread with
``chat.postMessage`` (slack_sdk's AsyncWebClient on the shared session), and slash
commands through their ``response_url``.

A reply longer than :data:`MESSAGE_LIMIT` goes out in parts; each part accepted is noted.
"""

from __future__ import annotations

from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from ...inbox import InboxItem
from ...outbound import Outbound, OutboundError, PermanentError, TransientError, parse_retry_after
from ...worker import Outcome
from .. import ChannelContext, split_text, stored_reply
from .webhook import without_mentions

MESSAGE_LIMIT = 3900  # Slack truncates message text past 40,000, and advises under 4,000
SERVICE = "slack"
# Slack's `error` values that mean "try again later", not "this request is wrong".
TRANSIENT_ERRORS = frozenset({"ratelimited", "internal_error", "fatal_error",
                              "service_unavailable", "request_timeout"})


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
        return TransientError(SERVICE, detail, status=status,
                              retry_after=parse_retry_after(headers.get("Retry-After")))
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
                token=self.token, base_url=self.base_url, session=session,
                timeout=int(max(1, self.outbound.settings.outbound_timeout_seconds)),
                retry_handlers=[])  # our retry policy, not the SDK's
        return self._client

    async def post_message(self, channel: str, text: str, thread_ts: str) -> str | None:
        async def attempt() -> Any:
            try:
                return await self.client.chat_postMessage(channel=channel, text=text,
                                                          thread_ts=thread_ts)
            except SlackApiError as exc:
                raise _classify(exc) from exc
        response = await self.outbound.with_retries(SERVICE, attempt)
        ts = response.get("ts")
        return str(ts) if ts else None


async def respond(outbound: Outbound, response_url: str, text: str) -> None:
    await outbound.request_json(
        SERVICE, "POST", response_url,
        json_body={"response_type": "ephemeral", "replace_original": False, "text": text})


def lane(item: InboxItem) -> str | None:
    """The conversation the item is answered in: a thread, or a user's slash commands in
    a channel (the same keys as the conversations they are stored in)."""
    data = item.data
    if item.kind == "command":
        return f"command:{data.get('channel_id')}:{data.get('user_id')}"
    event = data.get("event") or {}
    if "channel" not in event:
        return None
    return f"{event['channel']}:{event.get('thread_ts') or event.get('ts')}"


async def process(ctx: ChannelContext, api: SlackApi | None, item: InboxItem) -> Outcome:
    if item.kind == "command":
        return await _command(ctx, item)
    if api is None:
        raise PermanentError(SERVICE, "DIGITALME_SLACK_BOT_TOKEN is not set; set it, "
                             "restart, then `digitalme inbox retry`")
    event = item.data["event"]
    channel, ts = event["channel"], event["ts"]
    thread_ts = event.get("thread_ts") or ts
    conversation = await ctx.conversations.get_or_create(SERVICE, f"{channel}:{thread_ts}")
    reply = await stored_reply(ctx, item, conversation, without_mentions(event["text"]),
                               channel_message_id=f"{channel}:{ts}")
    parts = split_text(reply.text, MESSAGE_LIMIT)
    for index in range(item.parts_sent, len(parts)):
        sent = await api.post_message(channel, parts[index], thread_ts)
        await ctx.inbox.set_parts_sent(item.id, index + 1, result=f"ts {sent}")
    return Outcome.done(f"answered in thread {channel}:{thread_ts}")


async def _command(ctx: ChannelContext, item: InboxItem) -> Outcome:
    fields = item.data
    conversation = await ctx.conversations.get_or_create(
        SERVICE, f"command:{fields['channel_id']}:{fields['user_id']}",
        title=f"{fields['command']} by {fields.get('user_name') or fields['user_id']}")
    reply = await stored_reply(ctx, item, conversation, fields["text"].strip(),
                               channel_message_id=fields.get("trigger_id"))
    parts = split_text(reply.text, MESSAGE_LIMIT)
    for index in range(item.parts_sent, len(parts)):
        await respond(ctx.outbound, fields["response_url"], parts[index])
        await ctx.inbox.set_parts_sent(item.id, index + 1, result="response_url")
    return Outcome.done(f"answered {fields['command']} through its response_url")
