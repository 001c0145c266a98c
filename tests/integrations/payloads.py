"""Webhook payloads shaped like the platforms' real ones (trimmed to the fields that matter,
with the surrounding fields the platforms send, so parsing is tested against real shapes)."""

from __future__ import annotations

import time
from typing import Any

BOT_USER = "U0CLONEBOT"
TEAM = "T0TEAM"


def telegram_message(
    update_id: int,
    text: str,
    *,
    chat_id: int = 4242,
    message_id: int | None = None,
    is_bot: bool = False,
) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": message_id if message_id is not None else update_id % 100000,
            "from": {
                "id": chat_id,
                "is_bot": is_bot,
                "first_name": "Ada",
                "username": "ada_l",
                "language_code": "en",
            },
            "chat": {"id": chat_id, "first_name": "Ada", "username": "ada_l", "type": "private"},
            "date": int(time.time()),
            "text": text,
            **(
                {"entities": [{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]}
                if text.startswith("/")
                else {}
            ),
        },
    }


def slack_event(event_id: str, event: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": "deprecated-verification-token",
        "team_id": TEAM,
        "api_app_id": "A0APP",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": TEAM,
                "user_id": BOT_USER,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-eyJldCI6Im1lc3NhZ2UifQ",
    }


def slack_dm(
    text: str,
    *,
    ts: str = "1700000001.000100",
    user: str = "U0ADA",
    channel: str = "D0DM",
    thread_ts: str | None = None,
    bot_id: str | None = None,
    subtype: str | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "message",
        "channel": channel,
        "user": user,
        "text": text,
        "ts": ts,
        "event_ts": ts,
        "channel_type": "im",
        "client_msg_id": f"msg-{ts}",
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    if bot_id:
        event["bot_id"] = bot_id
    if subtype:
        event["subtype"] = subtype
    return event


def slack_mention(
    text: str,
    *,
    ts: str = "1700000002.000200",
    channel: str = "C0GENERAL",
    user: str = "U0ADA",
    thread_ts: str | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "app_mention",
        "channel": channel,
        "user": user,
        "text": f"<@{BOT_USER}> {text}",
        "ts": ts,
        "event_ts": ts,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def slack_command(
    text: str,
    response_url: str,
    *,
    trigger_id: str = "13345224609.738.abc",
) -> dict[str, str]:
    return {
        "token": "deprecated",
        "team_id": TEAM,
        "team_domain": "example",
        "channel_id": "C0GENERAL",
        "channel_name": "general",
        "user_id": "U0ADA",
        "user_name": "ada",
        "command": "/digitalme",
        "text": text,
        "api_app_id": "A0APP",
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id,
    }


REPOSITORY = {
    "id": 1296269,
    "name": "engine",
    "full_name": "acme/engine",
    "private": False,
    "owner": {"login": "acme", "id": 1, "type": "Organization"},
    "html_url": "https://github.com/acme/engine",
}


def github_issue(
    number: int = 7, title: str = "Flaky build on main", pull: bool = False
) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "number": number,
        "title": title,
        "state": "open",
        "html_url": f"https://github.com/acme/engine/issues/{number}",
        "user": {"login": "ada"},
        "created_at": "2026-11-01T09:00:00Z",
        "updated_at": "2026-11-01T09:05:00Z",
        "body": "The build fails one run in five.",
    }
    if pull:
        issue["pull_request"] = {"url": f"https://api.github.com/repos/acme/engine/pulls/{number}"}
    return issue


def github_issues_opened(
    number: int = 7,
    title: str = "Flaky build on main",
) -> dict[str, Any]:
    return {
        "action": "opened",
        "issue": github_issue(number, title),
        "repository": REPOSITORY,
        "sender": {"login": "owner-login"},
    }


def github_comment(
    body: str,
    *,
    number: int = 7,
    author: str = "ada",
    comment_id: int = 9001,
    action: str = "created",
) -> dict[str, Any]:
    return {
        "action": action,
        "issue": github_issue(number),
        "comment": {
            "id": comment_id,
            "body": body,
            "user": {"login": author},
            "html_url": f"https://github.com/acme/engine/issues/{number}#issuecomment-{comment_id}",
            "created_at": "2026-11-01T10:00:00Z",
            "updated_at": "2026-11-01T10:00:00Z",
        },
        "repository": REPOSITORY,
        "sender": {"login": author},
    }


def github_push(message: str = "Fix the flaky build", commits: int = 2) -> dict[str, Any]:
    return {
        "ref": "refs/heads/main",
        "before": "a" * 40,
        "after": "b" * 40,
        "compare": "https://github.com/acme/engine/compare/aaaa...bbbb",
        "commits": [{"id": f"{i:040d}", "message": message} for i in range(commits)],
        "head_commit": {
            "id": "b" * 40,
            "message": f"{message}\n\nDetails.",
            "timestamp": "2026-11-01T11:00:00+01:00",
        },
        "repository": REPOSITORY,
        "pusher": {"name": "owner-login"},
        "sender": {"login": "owner-login"},
    }


def github_pull_request(
    action: str = "opened",
    number: int = 12,
    title: str = "Retry the flaky step",
    merged: bool = False,
) -> dict[str, Any]:
    return {
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "title": title,
            "merged": merged,
            "html_url": f"https://github.com/acme/engine/pull/{number}",
            "created_at": "2026-11-01T12:00:00Z",
            "updated_at": "2026-11-01T12:00:00Z",
        },
        "repository": REPOSITORY,
        "sender": {"login": "owner-login"},
    }


def clickup_event(
    event: str, task_id: str = "86c00042", *, history: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"event": event, "task_id": task_id, "webhook_id": "7fa3ec74"}
    if history is not None:
        body["history_items"] = history
    return body


def clickup_history(
    item_id: str, *, field: str = "status", before: Any = None, after: Any = None
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": 1,
        "date": str(int(time.time() * 1000)),
        "field": field,
        "parent_id": "162641285",
        "data": {},
        "source": None,
        "user": {"id": 183, "username": "Owner", "email": "owner@example.test", "color": "#7b68ee"},
        "before": before,
        "after": after,
    }
