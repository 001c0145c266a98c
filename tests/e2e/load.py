"""A steady load through Caddy, from the controller, the way the clone's people use it.

Workers in one asyncio loop (a background thread, so the sync e2e tests can run playbooks
meanwhile) send, each in turn, what its kind is for: ``GET /health``, a chat turn in its
own conversation, or a Telegram webhook delivery (unique ``update_id``, signed with the
secret token) whose reply the app's worker sends to the Telegram stand-in, which runs in
the same loop on the controller's address. Every request is kept with its kind, status
and timing, so a test can assert that none failed, measure what a restart added to the
latency, and check afterwards that every acknowledged write is there, answered once.

    with BackgroundLoop() as loop:
        telegram = loop.run(start_telegram(controller_address, TOKEN))
        load = SteadyLoad(target, chat_token=..., telegram_secret=...)
        with load.running(loop):
            ...  # the upgrade
        assert load.failed() == []
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from standins.telegram_api import TelegramStandin
from tests.integrations.payloads import telegram_message

T = TypeVar("T")
KINDS = ("health", "chat", "stream", "webhook")


class BackgroundLoop:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> BackgroundLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return self.submit(coro).result(timeout)


async def start_telegram(host: str, token: str) -> TelegramStandin:
    standin = TelegramStandin(token)
    await standin.start(host=host)
    return standin


@dataclass(frozen=True)
class Target:
    """Caddy on the app host: its address, the public name and Caddy's root certificate."""

    address: str
    domain: str
    ca_file: Path


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    started: float  # time.time(): the sandbox hosts share the controller's clock
    seconds: float
    key: str  # the chat text or the update_id: what to look for afterwards
    detail: str = ""

    @property
    def finished(self) -> float:
        return self.started + self.seconds


@dataclass
class SteadyLoad:
    target: Target
    chat_token: str
    telegram_secret: str
    workers: dict[str, int] = field(
        default_factory=lambda: {"health": 6, "chat": 3, "stream": 1, "webhook": 1}
    )
    # Seconds a worker of that kind waits between its requests (others go flat out): the
    # app's worker must answer every delivery afterwards, within the test's patience.
    pauses: dict[str, float] = field(default_factory=lambda: {"webhook": 0.1})
    label: str = "load"
    outcomes: list[Outcome] = field(default_factory=list)
    _updates: Iterator[int] = field(
        default_factory=lambda: itertools.count(int(time.time() * 1000) % 1_000_000_000)
    )

    @contextmanager
    def running(self, loop: BackgroundLoop) -> Iterator[SteadyLoad]:
        stop = asyncio.Event()
        done = loop.submit(self._run(stop))
        try:
            # Every worker has had an answer before the caller goes on (a steady state).
            deadline = time.monotonic() + 60
            while (
                len({o.kind for o in self.outcomes if o.status}) < len(self.workers)
                and not done.done()
            ):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the load never got going: {self.outcomes[-5:]}")
                time.sleep(0.1)
            yield self
        finally:
            loop.loop.call_soon_threadsafe(stop.set)
            done.result(timeout=120)

    async def _run(self, stop: asyncio.Event) -> None:
        context = ssl.create_default_context(cafile=str(self.target.ca_file))
        connector = aiohttp.TCPConnector(ssl=context, limit=0)
        async with aiohttp.ClientSession(
            f"https://{self.target.address}",
            connector=connector,
            headers={"Host": self.target.domain},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as http:
            workers = []
            for kind, count in self.workers.items():
                for index in range(count):
                    workers.append(self._worker(http, kind, index, stop))
            await asyncio.gather(*workers)

    async def _worker(
        self, http: aiohttp.ClientSession, kind: str, index: int, stop: asyncio.Event
    ) -> None:
        conversation = None
        chat_id = 700_000 + index
        for turn in itertools.count():
            if stop.is_set():
                return
            if turn and self.pauses.get(kind):
                await asyncio.sleep(self.pauses[kind])
            started = time.time()
            key, status, detail = "", 0, ""
            try:
                if kind == "health":
                    status, detail = await self._request(http, "GET", "/health")
                elif kind in ("chat", "stream"):
                    if conversation is None:
                        status, detail = await self._request(
                            http, "POST", "/api/v1/conversations", token=True
                        )
                        if status != 201:
                            raise _Failed(status, detail)
                        conversation = json.loads(detail)["id"]
                        started = time.time()
                    key = f"{self.label} {kind} {index}-{turn}"
                    status, detail = await self._request(
                        http,
                        "POST",
                        f"/api/v1/conversations/{conversation}/messages",
                        token=True,
                        body={"text": key},
                        headers={"Accept": "text/event-stream"} if kind == "stream" else None,
                    )
                    if kind == "stream" and status == 200 and "event: done" not in detail:
                        # A stream cut short (its process stopped under it) is a failure.
                        status, detail = 0, f"stream ended without its done event: {detail}"
                else:
                    update = next(self._updates)
                    key = str(update)
                    body = telegram_message(
                        update,
                        f"{self.label} webhook {index}-{turn}",
                        chat_id=chat_id,
                        message_id=update,
                    )
                    status, detail = await self._request(
                        http,
                        "POST",
                        "/webhooks/telegram",
                        body=body,
                        headers={"X-Telegram-Bot-Api-Secret-Token": self.telegram_secret},
                    )
            except _Failed as failed:
                status, detail = failed.status, failed.detail
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, detail = 0, f"{type(exc).__name__}: {exc}"
            self.outcomes.append(
                Outcome(
                    kind,
                    status,
                    started,
                    time.time() - started,
                    key,
                    "" if status in (200, 201) else detail[:300],
                )
            )

    async def _request(
        self,
        http: aiohttp.ClientSession,
        method: str,
        path: str,
        *,
        token: bool = False,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {self.chat_token}"
        async with http.request(
            method, path, json=body, headers=all_headers, server_hostname=self.target.domain
        ) as response:
            return response.status, await response.text()

    # --- what happened -------------------------------------------------------------------

    def between(self, start: float, end: float) -> list[Outcome]:
        """Requests that were in flight at some moment of [start, end] (time.time())."""
        return [o for o in self.outcomes if o.started <= end and o.finished >= start]

    def failed(self, outcomes: list[Outcome] | None = None) -> list[Outcome]:
        return [
            o
            for o in (self.outcomes if outcomes is None else outcomes)
            if o.status not in (200, 201)
        ]

    def acknowledged(self, kind: str) -> list[str]:
        return [o.key for o in self.outcomes if o.kind == kind and o.status in (200, 201)]


def wait_until_answered(
    telegram: TelegramStandin,
    load: SteadyLoad,
    timeout: float = 300,
    resent: Callable[[], int] = lambda: 0,
) -> int:
    """Every delivery ``load`` had acknowledged is answered (a reply sent to the Telegram
    stand-in), exactly once; fails the test after ``timeout`` seconds. ``resent`` reads how
    many replies the service logged sending again unchecked (a part in flight when a host
    died: Telegram cannot be asked whether it arrived, docs/channels.md), each of which may
    show twice; it is read once every delivery is answered, since a takeover sends them
    late. Returns that count."""
    wanted = {int(key) for key in load.acknowledged("webhook")}
    deadline = time.monotonic() + timeout
    while True:
        replies: dict[int, int] = {}
        for body in list(telegram.sent):
            replied_to = (body.get("reply_parameters") or {}).get("message_id")
            if replied_to in wanted:
                replies[replied_to] = replies.get(replied_to, 0) + 1
        if set(replies) == wanted or time.monotonic() > deadline:
            break
        time.sleep(2)
    missing = wanted - set(replies)
    twice = {update: n for update, n in replies.items() if n > 1}
    assert not missing, f"{len(missing)} of {len(wanted)} acknowledged deliveries unanswered"
    sent_again = resent()
    assert sum(n - 1 for n in twice.values()) <= sent_again and all(
        n == 2 for n in twice.values()
    ), f"answered more than once: {twice} ({sent_again} sent again unchecked)"
    return sent_again


class _Failed(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]
