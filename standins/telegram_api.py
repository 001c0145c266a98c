"""A stand-in for the Telegram Bot API (``/bot<token>/<method>``): sendMessage, setWebhook,
getWebhookInfo. A wrong token gets Telegram's 401; failures use Telegram's error shape
(``{"ok": false, "error_code": 429, "parameters": {"retry_after": N}}``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from standins.platform import Fail, PlatformStandin, Recorded


class TelegramStandin(PlatformStandin):
    name = "telegram"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.webhook: dict[str, Any] = {}
        self._next_message_id = 1000

    @property
    def sent(self) -> list[dict[str, Any]]:
        """Bodies of sendMessage calls Telegram accepted."""
        return [
            r.body for r in self.requests if r.path.endswith("/sendMessage") and r.status == 200
        ]

    def failure(self, fail: Fail) -> web.Response:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": fail.status,
            "description": f"scripted {fail.status}",
        }
        headers = {}
        if fail.retry_after is not None:
            body["parameters"] = {"retry_after": fail.retry_after}
            body["description"] = f"Too Many Requests: retry after {fail.retry_after:g}"
            headers["Retry-After"] = f"{fail.retry_after:g}"
        return web.json_response(body, status=fail.status, headers=headers)

    async def answer(self, request: web.Request, rec: Recorded) -> web.Response:
        prefix, _, method = request.path.lstrip("/").partition("/")
        if prefix != f"bot{self.token}":
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        body = rec.body if isinstance(rec.body, dict) else {}
        if method == "sendMessage":
            if "chat_id" not in body or not str(body.get("text", "")).strip():
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": 400,
                        "description": "Bad Request: message text is empty",
                    },
                    status=400,
                )
            if len(body["text"]) > 4096:
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": 400,
                        "description": "Bad Request: message is too long",
                    },
                    status=400,
                )
            self._next_message_id += 1
            return web.json_response(
                {
                    "ok": True,
                    "result": {
                        "message_id": self._next_message_id,
                        "chat": {"id": body["chat_id"]},
                        "date": 1700000000,
                        "text": body["text"],
                    },
                }
            )
        if method == "setWebhook":
            self.webhook = body
            return web.json_response({"ok": True, "result": True, "description": "Webhook was set"})
        if method == "getWebhookInfo":
            return web.json_response(
                {
                    "ok": True,
                    "result": {
                        "url": self.webhook.get("url", ""),
                        "pending_update_count": 0,
                        "allowed_updates": self.webhook.get("allowed_updates", []),
                    },
                }
            )
        return web.json_response(
            {"ok": False, "error_code": 404, "description": "Not Found"}, status=404
        )
