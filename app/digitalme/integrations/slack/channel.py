"""Slack: direct messages and mentions answered in thread, and the /digitalme command."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from ...health import CheckResult
from ...inbox import InboxItem
from ...worker import Outcome
from ..channel import Channel, ChannelContext
from . import act, webhook
from .act import SlackApi

__all__ = ["SlackChannel"]


class SlackChannel(Channel):
    name = "slack"
    title = "Slack"
    required_setting = "DIGITALME_SLACK_SIGNING_SECRET"

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.verifier = (
            SignatureVerifier(s.slack_signing_secret) if s.slack_signing_secret else None
        )
        self.api = (
            SlackApi(ctx.outbound, s.slack_api_base or "", s.slack_bot_token)
            if s.slack_bot_token
            else None
        )

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def status(self) -> CheckResult:
        if self.enabled and self.api is None:
            return CheckResult(
                False,
                "on, but DIGITALME_SLACK_BOT_TOKEN is not set: messages "
                "and mentions cannot be answered (slash commands can)",
                {"enabled": True},
            )
        return super().status()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/webhooks/slack/events", self.events),
            web.post("/webhooks/slack/commands", self.commands),
        ]

    async def events(self, request: web.Request) -> web.Response:
        self.require_enabled()
        assert self.verifier is not None
        return await webhook.events(self, self.verifier, request)

    async def commands(self, request: web.Request) -> web.Response:
        self.require_enabled()
        assert self.verifier is not None
        return await webhook.commands(self, self.verifier, request)

    async def process(self, item: InboxItem) -> Outcome:
        return await act.process(self.ctx, self.api, item)

    def lane(self, kind: str, payload: Any) -> str | None:
        return act.lane(kind, payload)
