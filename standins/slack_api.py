"""A stand-in for the Slack Web API (``/api/chat.postMessage``, ``/api/conversations.replies``)
and slash-command ``response_url``s (``/response/<id>``, answering ``ok`` as Slack's hooks
do). A wrong bot token gets ``{"ok": false, "error": "invalid_auth"}``; a 429 carries
``Retry-After`` and ``{"ok": false, "error": "ratelimited"}`` like Slack's.

Messages posted in a thread are kept with their ``metadata``, and
``conversations.replies`` returns the thread like Slack: the parent first, then the
replies oldest first, from ``oldest`` (``inclusive``), ``limit`` per page with a
``next_cursor``, each reply's metadata only with ``include_all_metadata``. With
``history_scope = False`` it answers ``missing_scope``, as for an app without the
``*:history`` scopes. A message's ``ts`` is the current time, as Slack's."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from standins.platform import Fail, PlatformStandin, Recorded

BOT_ID = "B0CLONE"


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true")


class SlackStandin(PlatformStandin):
    name = "slack"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.history_scope = True
        self._last_ts = 0.0
        # (channel, thread ts) -> the replies posted in that thread, oldest first
        self.threads: dict[tuple[str, str], list[dict[str, Any]]] = {}

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api"

    def response_url(self, name: str = "cmd") -> str:
        return f"{self.base_url}/response/{name}"

    @property
    def posted(self) -> list[dict[str, Any]]:
        """chat.postMessage bodies Slack accepted."""
        return [
            r.body for r in self.requests if r.path == "/api/chat.postMessage" and r.status == 200
        ]

    @property
    def responses(self) -> list[dict[str, Any]]:
        """Bodies posted to response_urls and accepted."""
        return [
            r.body for r in self.requests if r.path.startswith("/response/") and r.status == 200
        ]

    @property
    def lookups(self) -> list[Recorded]:
        """conversations.replies requests."""
        return [r for r in self.requests if r.path == "/api/conversations.replies"]

    def failure(self, fail: Fail) -> web.Response:
        headers = {"Retry-After": f"{fail.retry_after:g}"} if fail.retry_after is not None else {}
        error = "ratelimited" if fail.status == 429 else "internal_error"
        return web.json_response({"ok": False, "error": error}, status=fail.status, headers=headers)

    def _next_ts(self) -> str:
        self._last_ts = max(time.time(), self._last_ts + 0.000001)
        return f"{self._last_ts:.6f}"

    async def answer(self, request: web.Request, rec: Recorded) -> web.Response:
        if request.path.startswith("/response/"):
            return web.Response(text="ok", content_type="text/plain")
        if request.path not in ("/api/chat.postMessage", "/api/conversations.replies"):
            return web.json_response({"ok": False, "error": "unknown_method"})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if request.path == "/api/conversations.replies":
            params = {**rec.query, **(rec.body if isinstance(rec.body, dict) else {})}
            return self._replies(params)
        body = rec.body if isinstance(rec.body, dict) else {}
        if not body.get("channel"):
            return web.json_response({"ok": False, "error": "channel_not_found"})
        if not str(body.get("text", "")).strip():
            return web.json_response({"ok": False, "error": "no_text"})
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and isinstance(metadata.get("event_type"), str)
            and isinstance(metadata.get("event_payload"), dict)
        ):
            return web.json_response({"ok": False, "error": "invalid_metadata_format"})
        ts = self._next_ts()
        message = {
            "type": "message",
            "bot_id": BOT_ID,
            "text": body["text"],
            "ts": ts,
            "thread_ts": body.get("thread_ts"),
        }
        if metadata is not None:
            message["metadata"] = metadata
        if body.get("thread_ts"):
            self.threads.setdefault((body["channel"], body["thread_ts"]), []).append(message)
        shown = {k: v for k, v in message.items() if k != "metadata"}
        return web.json_response(
            {"ok": True, "channel": body["channel"], "ts": ts, "message": shown}
        )

    def _replies(self, params: dict[str, Any]) -> web.Response:
        if not self.history_scope:
            return web.json_response(
                {
                    "ok": False,
                    "error": "missing_scope",
                    "needed": "im:history",
                    "provided": "chat:write",
                }
            )
        channel, parent = params.get("channel"), params.get("ts")
        if not channel or not parent:
            return web.json_response({"ok": False, "error": "invalid_arguments"})
        replies = self.threads.get((channel, parent), [])
        thread = [
            {
                "type": "message",
                "user": "U0ADA",
                "text": "(the thread's parent)",
                "ts": parent,
                "thread_ts": parent,
                "reply_count": len(replies),
            },
            *replies,
        ]
        if params.get("oldest"):
            oldest = float(params["oldest"])
            inclusive = _truthy(params.get("inclusive"))
            thread = [
                m
                for m in thread
                if float(m["ts"]) > oldest or (inclusive and float(m["ts"]) == oldest)
            ]
        if not _truthy(params.get("include_all_metadata")):
            thread = [{k: v for k, v in m.items() if k != "metadata"} for m in thread]
        start = int(params.get("cursor") or 0)
        limit = int(params.get("limit") or 1000)
        page = thread[start : start + limit]
        more = start + limit < len(thread)
        return web.json_response(
            {
                "ok": True,
                "messages": page,
                "has_more": more,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""},
            }
        )
