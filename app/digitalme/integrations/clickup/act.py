"""ClickUp's side: task events recorded as the owner's activity, and the Claude tool that
creates a task, only in the one list the owner configured and within a daily limit."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from ...conversations import Conversation
from ...inbox import InboxItem
from ...outbound import Outbound, OutboundError
from ...tool_actions import ToolActionLog
from ...worker import Outcome
from ..channel import ChannelContext

SERVICE = "clickup"
TOOL_NAME = "create_clickup_task"


class ClickUpApi:
    def __init__(self, outbound: Outbound, base_url: str, token: str) -> None:
        self.outbound = outbound
        self.base_url = base_url.rstrip("/")
        self.token = token

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return await self.outbound.request_json(
            SERVICE,
            method,
            f"{self.base_url}/api/v2{path}",
            json_body=body,
            headers={"Authorization": self.token},
        )

    async def task_name(self, task_id: str) -> str | None:
        found = await self.request("GET", f"/task/{task_id}")
        return str(found["name"]) if isinstance(found, dict) and found.get("name") else None

    async def create_task(self, list_id: str, name: str, description: str) -> Any:
        return await self.request(
            "POST", f"/list/{list_id}/task", {"name": name, "description": description}
        )


def _who(item: dict[str, Any]) -> str | None:
    user = item.get("user")
    if isinstance(user, dict):
        return str(user.get("username") or user.get("email") or user.get("id") or "") or None
    return None


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("status") or value.get("name") or value.get("username") or "?")
    return str(value)[:80] if value not in (None, "") else "nothing"


def summarise(body: dict[str, Any], task: str) -> tuple[str, str | None, str | None]:
    """(summary, actor, occurred_at) of a task event."""
    event = str(body.get("event"))
    items = [i for i in body.get("history_items") or [] if isinstance(i, dict)]
    first = items[0] if items else {}
    actor, when = _who(first), first.get("date")
    field = first.get("field")
    if event == "taskCreated":
        text = f"created task {task}"
    elif event == "taskStatusUpdated" or field == "status":
        text = (
            f"moved task {task} from {_value(first.get('before'))} to {_value(first.get('after'))}"
        )
    elif event == "taskCommentPosted":
        comment = first.get("comment")
        if not isinstance(comment, dict):
            comment = {}
        text = f"commented on task {task}: {str(comment.get('text_content') or '')[:120]}"
    elif event == "taskDeleted":
        text = f"deleted task {task}"
    elif field:
        text = f"changed {field} of task {task}"
    else:
        text = f"{event} on task {task}"
    return text, actor, str(when) if when else None


async def process(ctx: ChannelContext, api: ClickUpApi | None, item: InboxItem) -> Outcome:
    body = item.data
    task_id = str(body.get("task_id") or "?")
    task = task_id
    if api is not None and task_id != "?" and body.get("event") != "taskDeleted":
        try:  # a nicer summary; the event is recorded either way
            name = await api.task_name(task_id)
            task = f'"{name}" ({task_id})' if name else task_id
        except OutboundError:
            pass
    summary, actor, occurred_at = summarise(body, task)
    await ctx.activity.record(
        SERVICE,
        item.id,
        str(body.get("event")),
        summary,
        actor=actor,
        url=f"https://app.clickup.com/t/{task_id}" if task_id != "?" else None,
        occurred_at=occurred_at,
    )
    return Outcome.done(f"recorded: {summary[:80]}")


class CreateTaskTool:
    """Claude's tool: create a task in the configured list (and nowhere else)."""

    name = TOOL_NAME

    def __init__(self, api: ClickUpApi, list_id: str, max_per_day: int, log: ToolActionLog) -> None:
        self.api = api
        self.list_id = list_id
        self.max_per_day = max_per_day
        self.log = log
        self._lock = asyncio.Lock()

    def definition(self) -> dict[str, Any]:
        return {
            "name": TOOL_NAME,
            "description": (
                "Create a task in the owner's ClickUp list, so the owner sees it. Use it "
                "only when the person asks for something to be tracked, done later or "
                "followed up (a to-do, a request, a reminder for the owner). Only one list "
                f"is available and at most {self.max_per_day} tasks a day."
            ),
            "input_schema": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "description": "Short task title.",
                        "maxLength": 200,
                    },
                    "description": {
                        "type": "string",
                        "description": "What is asked, by whom, and context.",
                        "maxLength": 5000,
                    },
                },
                "required": ["name"],
            },
        }

    async def run(self, arguments: dict[str, Any], conversation: Conversation) -> str:
        name = " ".join(str(arguments.get("name") or "").split())[:200]
        if not name:
            raise ValueError("a task needs a name")
        description = str(arguments.get("description") or "")[:5000]
        description += f"\n\n(Created by DigitalMe from a {conversation.channel} conversation.)"
        request = hashlib.sha256(json.dumps([name, description]).encode()).hexdigest()
        async with self._lock:
            earlier = await self.log.find_today(TOOL_NAME, conversation.id, request)
            if earlier is not None:
                return f"This task was already created: {earlier}"
            if await self.log.count_today(TOOL_NAME) >= self.max_per_day:
                raise ValueError(
                    f"the daily limit of {self.max_per_day} ClickUp tasks is "
                    "reached; tell the person the owner will see the request "
                    "here instead"
                )
            created = await self.api.create_task(self.list_id, name, description)
            task_id = created.get("id") if isinstance(created, dict) else None
            url = created.get("url") if isinstance(created, dict) else None
            result = f'task {task_id} "{name}"' + (f" at {url}" if url else "")
            await self.log.record(TOOL_NAME, conversation.id, request, result)
        return f"Created ClickUp {result}."
