"""Telegram: a bot that answers text messages in their chat (webhook + Bot API)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...health import CheckResult
from ...inbox import InboxItem
from ...worker import Outcome
from ..channel import Channel, ChannelContext
from . import act, webhook
from .act import TelegramApi
from .webhook import ALLOWED_UPDATES

__all__ = ["ALLOWED_UPDATES", "TelegramApi", "TelegramChannel"]


class TelegramChannel(Channel):
    name = "telegram"
    title = "Telegram"
    required_setting = "DIGITALME_TELEGRAM_SECRET_TOKEN"

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.api = (
            TelegramApi(ctx.outbound, s.telegram_api_base or "", s.telegram_bot_token)
            if s.telegram_bot_token
            else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.settings.telegram_secret_token)

    def status(self) -> CheckResult:
        if self.enabled and self.api is None:
            return CheckResult(
                False,
                "on, but DIGITALME_TELEGRAM_BOT_TOKEN is not set: "
                "messages are stored but cannot be answered",
                {"enabled": True},
            )
        return super().status()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/webhooks/telegram", self.receive)]

    async def receive(self, request: web.Request) -> web.Response:
        return await webhook.receive(self, request)

    async def process(self, item: InboxItem) -> Outcome:
        return await act.process(self.ctx, self.api, item)

    def lane(self, kind: str, payload: Any) -> str | None:
        return act.lane(kind, payload)
