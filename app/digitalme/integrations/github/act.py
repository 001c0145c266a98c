"""GitHub's side of the worker: record the event as the owner's activity and, when a new
comment mentions the clone's handle, answer it with a comment (gidgethub on the shared
session).

A posted comment carries a hidden marker with the delivery id. A retry (a crash or a
timeout may have hidden that GitHub accepted the comment) first looks for the marker among
the issue's comments since the delivery arrived and does not post twice.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from gidgethub import BadRequest, GitHubBroken, HTTPException, RateLimitExceeded
from gidgethub.aiohttp import GitHubAPI

from ...inbox import InboxItem
from ...outbound import Outbound, OutboundError, PermanentError, TransientError, parse_retry_after
from ...worker import Outcome
from ..channel import ChannelContext, stored_reply

SERVICE = "github"
T = TypeVar("T")
COMMENT_LIMIT = 60000  # GitHub's is 65,536 characters


def marker(delivery_id: str) -> str:
    return f"<!-- digitalme:delivery {delivery_id} -->"


def _classify(exc: HTTPException) -> OutboundError:
    status = int(exc.status_code)
    detail = f"HTTP {status}: {exc}"
    if isinstance(exc, RateLimitExceeded):
        reset = getattr(exc.rate_limit, "reset_datetime", None)
        wait = (reset - datetime.now(UTC)).total_seconds() if reset else 60.0
        return TransientError(SERVICE, detail, status=status, retry_after=max(1.0, wait))
    if isinstance(exc, GitHubBroken) or status in (408, 429):
        return TransientError(
            SERVICE,
            detail,
            status=status,
            retry_after=parse_retry_after(exc.headers.get("retry-after")),
        )
    if status == 403 and "secondary rate limit" in str(exc).lower():
        return TransientError(
            SERVICE,
            detail,
            status=status,
            retry_after=parse_retry_after(exc.headers.get("retry-after")),
        )
    if isinstance(exc, BadRequest):
        return PermanentError(SERVICE, detail, status=status)
    return PermanentError(SERVICE, detail, status=status)  # a redirect we did not follow


class GitHubRest:
    def __init__(self, outbound: Outbound, base_url: str, token: str) -> None:
        self.outbound = outbound
        self.base_url = base_url.rstrip("/")
        self.token = token

    def _api(self) -> GitHubAPI:
        return GitHubAPI(
            self.outbound.session, "digitalme", oauth_token=self.token, base_url=self.base_url
        )

    async def _call(self, call: Callable[[GitHubAPI], Awaitable[T]]) -> T:
        async def attempt() -> T:
            try:
                return await call(self._api())
            except HTTPException as exc:
                raise _classify(exc) from exc

        return await self.outbound.with_retries(SERVICE, attempt)

    async def comment(self, owner: str, repo: str, number: int, body: str) -> Any:
        return await self._call(
            lambda gh: gh.post(
                "/repos/{owner}/{repo}/issues/{number}/comments",
                url_vars={"owner": owner, "repo": repo, "number": str(number)},
                data={"body": body},
            )
        )

    async def find_comment(
        self, owner: str, repo: str, number: int, since: str, needle: str
    ) -> Any:
        """A comment on the issue since ``since`` whose body contains ``needle``."""

        async def search(gh: GitHubAPI) -> Any:
            async for found in gh.getiter(
                "/repos/{owner}/{repo}/issues/{number}/comments{?since,per_page}",
                url_vars={
                    "owner": owner,
                    "repo": repo,
                    "number": str(number),
                    "since": since,
                    "per_page": "100",
                },
            ):
                if needle in str(found.get("body", "")):
                    return found
            return None

        return await self._call(search)


def mentions(text: str, handle: str) -> bool:
    return re.search(rf"(?<![\w-])@{re.escape(handle)}(?![\w-])", text, re.IGNORECASE) is not None


def _first_line(text: Any, limit: int = 120) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line[:limit]


def summarise(event: str, data: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(summary, url, occurred_at) of a recorded event."""
    repo = (data.get("repository") or {}).get("full_name", "?")
    action = data.get("action", "")
    if event == "push":
        commits = data.get("commits") or []
        branch = str(data.get("ref", "")).removeprefix("refs/heads/")
        head = data.get("head_commit") or {}
        return (
            f"pushed {len(commits)} commit(s) to {branch} in {repo}: "
            f"{_first_line(head.get('message'))}",
            data.get("compare"),
            head.get("timestamp"),
        )
    if event in ("issues", "pull_request"):
        thing = data.get("issue") or data.get("pull_request") or {}
        noun = "issue" if event == "issues" else "pull request"
        if event == "pull_request" and action == "closed" and thing.get("merged"):
            action = "merged"
        return (
            f'{action} {noun} #{thing.get("number")} "{thing.get("title", "")}" in {repo}',
            thing.get("html_url"),
            thing.get("updated_at") or thing.get("created_at"),
        )
    if event in ("issue_comment", "pull_request_review_comment"):
        comment = data.get("comment") or {}
        thing = data.get("issue") or data.get("pull_request") or {}
        noun = "pull request" if "pull_request" in thing or event != "issue_comment" else "issue"
        return (
            f"{action} a comment on {noun} #{thing.get('number')} "
            f'"{thing.get("title", "")}" in {repo}: {_first_line(comment.get("body"))}',
            comment.get("html_url"),
            comment.get("updated_at") or comment.get("created_at"),
        )
    if event == "pull_request_review":
        review = data.get("review") or {}
        pull = data.get("pull_request") or {}
        return (
            f"{review.get('state', action)} a review of pull request "
            f'#{pull.get("number")} "{pull.get("title", "")}" in {repo}',
            review.get("html_url"),
            review.get("submitted_at"),
        )
    return f"{event} {action} in {repo}".strip(), None, None


def lane(kind: str, stored: dict[str, Any]) -> str | None:
    """The issue or pull request an event is about (its conversation, when a mention is
    answered there), else the repository."""
    data = stored.get("payload") or {}
    repository = (data.get("repository") or {}).get("full_name")
    thing = data.get("issue") or data.get("pull_request") or {}
    if repository is None:
        return None
    return f"{repository}#{thing['number']}" if "number" in thing else str(repository)


async def process(ctx: ChannelContext, rest: GitHubRest | None, item: InboxItem) -> Outcome:
    stored = item.data
    event, data = stored["event"], stored["payload"]
    summary, url, occurred_at = summarise(event, data)
    actor = (data.get("sender") or {}).get("login")
    await ctx.activity.record(
        SERVICE, item.id, item.kind, summary, actor=actor, url=url, occurred_at=occurred_at
    )
    handle = ctx.settings.github_handle
    comment = data.get("comment") or {}
    author = str((comment.get("user") or {}).get("login", ""))
    body = str(comment.get("body") or "")
    if not (
        event == "issue_comment"
        and data.get("action") == "created"
        and handle
        and mentions(body, handle)
        and author.lower() != handle.lower()
        and "<!-- digitalme:delivery" not in body
    ):
        return Outcome.done(f"recorded: {summary[:80]}")
    if rest is None:
        return Outcome.done(
            "recorded; a mention was not answered: DIGITALME_GITHUB_TOKEN is not set"
        )
    return await _answer(ctx, rest, item, data, author, body)


async def _answer(
    ctx: ChannelContext,
    rest: GitHubRest,
    item: InboxItem,
    data: dict[str, Any],
    author: str,
    body: str,
) -> Outcome:
    repository = data["repository"]
    owner, repo = repository["owner"]["login"], repository["name"]
    issue = data["issue"]
    number = int(issue["number"])
    noun = "pull request" if "pull_request" in issue else "issue"
    conversation = await ctx.conversations.get_or_create(
        SERVICE,
        f"{repository['full_name']}#{number}",
        title=f"{repository['full_name']}#{number} {issue.get('title', '')}"[:200],
    )
    prompt = (
        f"{author} mentioned you in a comment on GitHub, on {noun} #{number} "
        f'"{issue.get("title", "")}" in {repository["full_name"]}:\n\n{body}'
    )
    reply = await stored_reply(
        ctx, item, conversation, prompt, channel_message_id=str(data["comment"].get("id"))
    )
    tag = marker(item.delivery_id)
    if item.parts_sent == 0 and item.attempts > 1:
        since = (
            datetime.fromisoformat(item.received_at.replace("Z", "+00:00")) - timedelta(minutes=1)
        ).strftime("%Y-%m-%dT%H:%M:%SZ")
        existing = await rest.find_comment(owner, repo, number, since, tag)
        if existing is not None:
            await ctx.inbox.set_parts_sent(item.id, 1, result=f"comment {existing.get('id')}")
            return Outcome.done(f"the answer was already posted ({existing.get('html_url')})")
    if item.parts_sent == 0:
        text = reply.text[:COMMENT_LIMIT]
        posted = await rest.comment(owner, repo, number, f"{text}\n\n{tag}")
        await ctx.inbox.set_parts_sent(item.id, 1, result=f"comment {posted.get('id')}")
        return Outcome.done(
            f"answered on {repository['full_name']}#{number}: {posted.get('html_url')}"
        )
    return Outcome.done("answered earlier")
