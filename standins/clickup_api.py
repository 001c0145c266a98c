"""A stand-in for ClickUp's REST API v2: ``POST /api/v2/list/{list_id}/task`` and ``GET
/api/v2/task/{task_id}``. Needs the token in ``Authorization`` (no scheme, as ClickUp's
personal tokens); errors use ClickUp's ``{"err": ..., "ECODE": ...}`` shape."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from standins.platform import Fail, PlatformStandin, Recorded

_CREATE = re.compile(r"^/api/v2/list/([^/]+)/task$")
_TASK = re.compile(r"^/api/v2/task/([^/]+)$")


class ClickUpStandin(PlatformStandin):
    name = "clickup"

    def __init__(self, token: str, lists: tuple[str, ...] = ("901",)) -> None:
        super().__init__()
        self.token = token
        self.lists = lists
        self.tasks: dict[str, dict[str, Any]] = {}
        self._next = 0

    @property
    def created(self) -> list[tuple[str, dict[str, Any]]]:
        """(list id, body) of tasks created."""
        found = []
        for r in self.requests:
            match = _CREATE.match(r.path)
            if match and r.method == "POST" and r.status == 200:
                found.append((match.group(1), r.body))
        return found

    def failure(self, fail: Fail) -> web.Response:
        headers = {"Retry-After": f"{fail.retry_after:g}"} if fail.retry_after is not None else {}
        return web.json_response(
            {"err": f"scripted {fail.status}", "ECODE": "TEST_001"},
            status=fail.status,
            headers=headers,
        )

    async def answer(self, request: web.Request, rec: Recorded) -> web.Response:
        if request.headers.get("Authorization") != self.token:
            return web.json_response({"err": "Token invalid", "ECODE": "OAUTH_025"}, status=401)
        if (match := _CREATE.match(request.path)) and request.method == "POST":
            if match.group(1) not in self.lists:
                return web.json_response({"err": "List not found", "ECODE": "ITEM_013"}, status=404)
            body = rec.body if isinstance(rec.body, dict) else {}
            self._next += 1
            task_id = f"86c{self._next:05d}"
            task = {
                "id": task_id,
                "name": body.get("name"),
                "description": body.get("description"),
                "url": f"https://app.clickup.test/t/{task_id}",
                "list": {"id": match.group(1)},
            }
            self.tasks[task_id] = task
            return web.json_response(task)
        if (match := _TASK.match(request.path)) and request.method == "GET":
            task = self.tasks.get(match.group(1))
            if task is None:
                return web.json_response({"err": "Task not found", "ECODE": "ITEM_013"}, status=404)
            return web.json_response(task)
        return web.json_response({"err": "Route not found", "ECODE": "APP_001"}, status=404)
