"""ClickUp: task events recorded as the owner's activity, and a task-creating tool."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...chat import Tool
from ...health import CheckResult
from ...inbox import InboxItem
from ...worker import Outcome
from ..channel import Channel, ChannelContext
from . import act, webhook
from .act import ClickUpApi, CreateTaskTool

__all__ = ["ClickUpChannel", "CreateTaskTool"]


class ClickUpChannel(Channel):
    name = "clickup"
    title = "ClickUp"
    records_activity = True
    required_setting = "DIGITALME_CLICKUP_WEBHOOK_SECRET"

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.api = (
            ClickUpApi(ctx.outbound, s.clickup_api_base or "", s.clickup_token)
            if s.clickup_token
            else None
        )
        self.tool = (
            CreateTaskTool(
                self.api, s.clickup_list_id, s.clickup_max_tasks_per_day, ctx.tool_actions
            )
            if self.api is not None and s.clickup_list_id and s.clickup_max_tasks_per_day > 0
            else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.settings.clickup_webhook_secret)

    def tools(self) -> list[Tool]:
        return [self.tool] if self.tool is not None else []

    def _tool_status(self) -> str:
        s = self.settings
        if self.tool is not None:
            return f"on (list {s.clickup_list_id}, at most {s.clickup_max_tasks_per_day} a day)"
        missing = [
            name
            for name, value in (
                ("DIGITALME_CLICKUP_TOKEN", s.clickup_token),
                ("DIGITALME_CLICKUP_LIST_ID", s.clickup_list_id),
            )
            if not value
        ]
        return (
            f"off ({', '.join(missing)} not set)"
            if missing
            else "off (DIGITALME_CLICKUP_MAX_TASKS_PER_DAY is 0)"
        )

    def status(self) -> CheckResult:
        data: dict[str, Any] = {"enabled": self.enabled, "task_tool": self._tool_status()}
        if not self.enabled:
            return CheckResult(True, f"webhook off ({self.required_setting} not set)", data)
        return CheckResult(True, "on", data)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/webhooks/clickup", self.receive)]

    async def receive(self, request: web.Request) -> web.Response:
        return await webhook.receive(self, request)

    async def process(self, item: InboxItem) -> Outcome:
        return await act.process(self.ctx, self.api, item)
