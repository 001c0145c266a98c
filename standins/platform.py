"""The common part of the platform stand-ins (Telegram, Slack, GitHub, ClickUp).

Each stand-in is an aiohttp server on 127.0.0.1 that answers like the real API for the
calls DigitalMe makes, records every request, and can be scripted to fail:

``standin.script(Fail(429, retry_after=1), Fail(503), ...)``
    queue failures; each request takes the next one (then normal answers again);
``standin.fail_all(Fail(500))`` / ``standin.recover()``
    every request fails until recovered;
``Hold(event)``
    wait for an ``asyncio.Event`` before answering normally (to keep a call in flight);
``Lose(event, accept=True)``
    carry the request out at once (``accept=False``: refuse it), then hold the answer back
    until the event is set: the caller never hears, as when it crashes or its connection
    drops after the request went out (the outbound idempotency tests);
``standin.requests``
    every ``Recorded`` request (method, path, query, headers, parsed body, status);
``await standin.wait_for(lambda: ..., timeout)``
    poll until a condition on the records holds.

Subclasses implement :meth:`PlatformStandin.answer` for the requests that get through.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

S = TypeVar("S", bound="PlatformStandin")


@dataclass(frozen=True)
class Fail:
    """Answer with this status (and Retry-After, when given) instead of the real answer."""

    status: int = 500
    retry_after: float | None = None
    body: Any = None


@dataclass(frozen=True)
class Hold:
    """Wait until ``release`` is set, then answer normally."""

    release: asyncio.Event


@dataclass(frozen=True)
class Lose:
    """Take the request in: carry it out as usual when ``accept`` (else refuse it), but
    hold the answer until ``release`` is set."""

    release: asyncio.Event
    accept: bool = True


Behaviour = Fail | Hold | Lose


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    time: float = field(default_factory=time.monotonic)
    status: int | None = None


class PlatformStandin:
    name = "platform"

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._script: deque[Behaviour] = deque()
        self._sticky: Behaviour | None = None
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # --- scripting -----------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        self._script.extend(behaviours)

    def fail_all(self, behaviour: Behaviour) -> None:
        self._sticky = behaviour

    def recover(self) -> None:
        self._sticky = None
        self._script.clear()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                seen = [(r.method, r.path, r.status) for r in self.requests]
                raise TimeoutError(
                    f"{self.name} stand-in: condition not met in {timeout}s; requests: {seen}"
                )
            await asyncio.sleep(0.02)

    # --- serving -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1") -> str:
        """Serve on a free port of ``host`` (loopback, or the sandbox's controller address
        for the end-to-end tests)."""
        self.host = host
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rec = Recorded(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            _parse(request.content_type, raw),
        )
        self.requests.append(rec)
        behaviour = self._sticky or (self._script.popleft() if self._script else None)
        if isinstance(behaviour, Hold):
            await behaviour.release.wait()
            behaviour = None
        if isinstance(behaviour, Lose):
            lost = await self.answer(request, rec) if behaviour.accept else self.failure(Fail(503))
            rec.status = lost.status
            await behaviour.release.wait()
            return lost
        if isinstance(behaviour, Fail):
            response = self.failure(behaviour)
        else:
            response = await self.answer(request, rec)
        rec.status = response.status
        return response

    def failure(self, fail: Fail) -> web.Response:
        headers = {"Retry-After": f"{fail.retry_after:g}"} if fail.retry_after is not None else {}
        body = fail.body if fail.body is not None else {"error": f"scripted {fail.status}"}
        return web.json_response(body, status=fail.status, headers=headers)

    async def answer(self, request: web.Request, rec: Recorded) -> web.Response:
        raise NotImplementedError


def _parse(content_type: str, raw: bytes) -> Any:
    if not raw:
        return None
    text = raw.decode(errors="replace")
    if content_type == "application/json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    if content_type == "application/x-www-form-urlencoded":
        return {k: v[0] for k, v in urllib.parse.parse_qs(text).items()}
    return text


@asynccontextmanager
async def running(standin: S) -> AsyncIterator[S]:
    await standin.start()
    try:
        yield standin
    finally:
        await standin.close()
