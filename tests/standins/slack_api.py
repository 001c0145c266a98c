"""A stand-in for the Slack Web API (``/api/chat.postMessage``) and slash-command
``response_url``s (``/response/<id>``, answering ``ok`` as Slack's hooks do). A wrong bot
token gets ``{"ok": false, "error": "invalid_auth"}``; a 429 carries ``Retry-After`` and
``{"ok": false, "error": "ratelimited"}`` like Slack's."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.standins.platform import Fail, PlatformStandin, Recorded


class SlackStandin(PlatformStandin):
    name = "slack"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self._ts = 0

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api"

    def response_url(self, name: str = "cmd") -> str:
        return f"{self.base_url}/response/{name}"

    @property
    def posted(self) -> list[dict[str, Any]]:
        """chat.postMessage bodies Slack accepted."""
        return [r.body for r in self.requests
                if r.path == "/api/chat.postMessage" and r.status == 200]

    @property
    def responses(self) -> list[dict[str, Any]]:
        """Bodies posted to response_urls and accepted."""
        return [r.body for r in self.requests
                if r.path.startswith("/response/") and r.status == 200]

    def failure(self, fail: Fail) -> web.Response:
        headers = {"Retry-After": f"{fail.retry_after:g}"} if fail.retry_after is not None \
            else {}
        error = "ratelimited" if fail.status == 429 else "internal_error"
        return web.json_response({"ok": False, "error": error}, status=fail.status,
                                 headers=headers)

    async def answer(self, request: web.Request, rec: Recorded) -> web.Response:
        if request.path.startswith("/response/"):
            return web.Response(text="ok", content_type="text/plain")
        if request.path != "/api/chat.postMessage":
            return web.json_response({"ok": False, "error": "unknown_method"})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        body = rec.body if isinstance(rec.body, dict) else {}
        if not body.get("channel"):
            return web.json_response({"ok": False, "error": "channel_not_found"})
        if not str(body.get("text", "")).strip():
            return web.json_response({"ok": False, "error": "no_text"})
        self._ts += 1
        ts = f"1700000000.{self._ts:06d}"
        return web.json_response({"ok": True, "channel": body["channel"], "ts": ts,
                                  "message": {"text": body["text"], "ts": ts,
                                              "thread_ts": body.get("thread_ts")}})
