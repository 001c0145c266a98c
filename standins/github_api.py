"""A stand-in for the GitHub REST API's issue comments: ``POST`` and ``GET
/repos/{owner}/{repo}/issues/{number}/comments`` (with ``since``). Needs
``Authorization: token <token>``; errors use GitHub's ``{"message": ...}`` shape.
``lose_answers = N`` stores the next N comments but answers them 502."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from standins.platform import Fail, PlatformStandin, Recorded

_COMMENTS = re.compile(r"^/repos/([^/]+)/([^/]+)/issues/(\d+)/comments$")


class GitHubStandin(PlatformStandin):
    name = "github"

    def __init__(self, token: str, login: str = "clone-bot") -> None:
        super().__init__()
        self.token = token
        self.login = login
        self.comments: dict[str, list[dict[str, Any]]] = {}
        self._next_id = 5000
        # This many comment POSTs are stored but answered 502 (a write whose answer is lost).
        self.lose_answers = 0

    @property
    def posted(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.method == "POST" and r.status == 201]

    def failure(self, fail: Fail) -> web.Response:
        headers = {"Retry-After": f"{fail.retry_after:g}"} if fail.retry_after is not None else {}
        return web.json_response(
            {"message": f"scripted {fail.status}"}, status=fail.status, headers=headers
        )

    async def answer(self, request: web.Request, rec: Recorded) -> web.Response:
        if request.headers.get("Authorization") != f"token {self.token}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        match = _COMMENTS.match(request.path)
        if not match:
            return web.json_response({"message": "Not Found"}, status=404)
        key = "/".join(match.groups())
        thread = self.comments.setdefault(key, [])
        if request.method == "GET":
            since = request.query.get("since", "")
            return web.json_response([c for c in thread if c["created_at"] >= since])
        if request.method != "POST":
            return web.json_response({"message": "Not Found"}, status=404)
        body = rec.body if isinstance(rec.body, dict) else {}
        if not str(body.get("body", "")).strip():
            return web.json_response(
                {
                    "message": "Validation Failed",
                    "errors": [{"field": "body", "code": "missing_field"}],
                },
                status=422,
            )
        self._next_id += 1
        owner, repo, number = match.groups()
        comment = {
            "id": self._next_id,
            "body": body["body"],
            "user": {"login": self.login},
            "created_at": "2099-01-01T00:00:00Z",
            "html_url": f"https://github.test/{owner}/{repo}/issues/{number}"
            f"#issuecomment-{self._next_id}",
        }
        thread.append(comment)
        if self.lose_answers:
            self.lose_answers -= 1
            return web.json_response({"message": "Server Error"}, status=502)
        return web.json_response(comment, status=201)
