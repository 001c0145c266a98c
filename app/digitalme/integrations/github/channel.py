"""GitHub: events recorded as the owner's activity; mentions of the clone answered."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...health import CheckResult
from ...inbox import InboxItem
from ...worker import Outcome
from ..channel import Channel, ChannelContext
from . import act, webhook
from .act import GitHubRest

__all__ = ["GitHubChannel"]


class GitHubChannel(Channel):
    name = "github"
    title = "GitHub"
    records_activity = True
    required_setting = "DIGITALME_GITHUB_WEBHOOK_SECRET"

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.rest = (
            GitHubRest(ctx.outbound, s.github_api_base or "", s.github_token)
            if s.github_token
            else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.settings.github_webhook_secret)

    def status(self) -> CheckResult:
        if not self.enabled:
            return super().status()
        handle = self.settings.github_handle
        if self.rest is not None and handle:
            return CheckResult(True, f"on; mentions of @{handle} are answered", {"enabled": True})
        missing = "DIGITALME_GITHUB_HANDLE" if self.rest is not None else "DIGITALME_GITHUB_TOKEN"
        return CheckResult(
            True,
            f"on (activity only: {missing} is not set, so mentions are not answered)",
            {"enabled": True},
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/webhooks/github", self.receive)]

    async def receive(self, request: web.Request) -> web.Response:
        return await webhook.receive(self, request)

    async def process(self, item: InboxItem) -> Outcome:
        return await act.process(self.ctx, self.rest, item)

    def lane(self, kind: str, payload: Any) -> str | None:
        return act.lane(kind, payload)
