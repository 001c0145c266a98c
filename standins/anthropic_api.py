"""A local stand-in for the Anthropic Messages API, for tests and demos.

It speaks the real wire protocol closely enough that the official ``anthropic``
SDK (pointed at it with ``base_url=`` or ``ANTHROPIC_BASE_URL``) cannot tell the
difference for the endpoints DigitalMe uses, and it validates requests the way
the real API does, so client bugs fail here instead of in production.

Endpoints
---------
``POST /v1/messages``
    JSON reply (a ``Message``) or, with ``"stream": true``, server-sent events::

        message_start, content_block_start, ping, content_block_delta x N,
        content_block_stop, [more blocks...], message_delta, message_stop

    (``ping`` follows the first ``content_block_start``; a reply with no content
    block, i.e. ``max_tokens: 0``, sends it right after ``message_start``.)
``POST /v1/messages/count_tokens``
    ``{"input_tokens": N}`` with the same estimate ``/v1/messages`` uses.
Anything else: ``404 not_found_error`` in the API's error shape.

Authentication: the key may come as ``x-api-key`` or ``Authorization: Bearer``
(anthropic 2.14 sends an ``api_key`` as a bearer token). It is never stored or
logged: requests keep only ``api_key_present`` and ``api_key_sha256``. With
``api_keys=`` (or ``api_key_sha256s=``) only those keys are accepted.

Errors use the real shape and status, with a ``request-id`` header::

    {"type": "error", "error": {"type": "invalid_request_error", "message": "..."},
     "request_id": "req_..."}

Usage accounting is deterministic: about 4 characters a token, per content
block, plus a small per-message overhead. Prompt caching is simulated: every
block carrying ``cache_control`` (tools, system blocks, message blocks; a
top-level ``cache_control`` marks the last message block) ends a cacheable
prefix. The first request with a given prefix (per model) reports its tokens as
``cache_creation_input_tokens``; later ones, within the TTL (5m or 1h),
report them as ``cache_read_input_tokens``. ``input_tokens`` is the rest, so the
three always add up to what ``count_tokens`` returns.

Default reply text: ``"Stand-in reply to: " + <first 200 chars of the last user
message's text>`` (its text blocks joined by newlines, or the text in its
``tool_result`` blocks if it has none). See ``default_reply_text``.

Scripting (behaviours are frozen dataclasses)
---------------------------------------------
``standin.script(b1, b2, ...)``
    queue behaviours; each valid ``POST /v1/messages`` consumes one (requests that
    fail authentication or validation consume none; ``count_tokens`` consumes none).
    With an empty queue the answer is ``Reply()``.
``Reply(text=None, tool_use=None, stop_reason=None, chunks=None, chunk_delay=0.0)``
    ``text=None`` means the default text (or no text block when ``tool_use`` is
    given). ``tool_use={"name": ..., "input": {...}}`` (or a list of them; an ``"id"``
    key fixes the block id, otherwise ids are deterministic ``toolu_01...``) answers
    with ``tool_use`` blocks and ``stop_reason: "tool_use"``; the tool must be
    declared in the request's ``tools`` or the request gets a 400 that names the
    script mistake. ``chunks`` fixes the streamed text deltas.
``Error(status=500, type=None, message=None, retry_after=None, should_retry=None, headers={})``
    the type defaults from the status (429 ``rate_limit_error``, 529
    ``overloaded_error``, 500 ``api_error``, ...); ``retry_after`` sets ``retry-after``,
    ``should_retry`` sets ``x-should-retry``.
``Slow(delay, then=None)``
    wait ``delay`` seconds, then do ``then`` (default ``Reply()``).
``StreamThenError(after_chunks=2, error_type="overloaded_error", message="Overloaded", then=None)``
    stream normally, then after that many deltas send ``event: error`` and end the
    body. A non-streaming request gets the equivalent HTTP error instead.
``StreamThenHang(after_chunks=2, then=None)``
    stream that many deltas, then go silent until the client leaves or the server
    closes. A non-streaming request hangs.
``Hang()``
    accept the request and never answer; the connection is dropped when the
    server closes.
``standin.fail_all(behaviour)`` / ``standin.recover()``
    sticky mode: every request (``count_tokens`` too) gets ``behaviour``, the
    queue is left alone, until ``recover()``.
``standin.set_delay(seconds)``
    every successful answer waits this long first (headers included).
``standin.reset()``, ``standin.clear_cache()``, ``await standin.wait_for_requests(n)``.

Options: ``AnthropicStandin(api_keys=None, api_key_sha256s=None, strict_alternation=True,
strict_fields=True, min_cache_tokens=0, known_models=None, delay=0.0)``; ``known_models``
turns unknown models into ``404 not_found_error``; ``min_cache_tokens`` is the smallest
prefix the cache stores (the API's is 1024+, the default 0 keeps tests small).
``run_anthropic_standin(host="127.0.0.1", port=0, **options)`` is an async context
manager yielding a started stand-in (``.base_url``); ``start(host, port)`` / ``close()``
do the same by hand. Pass an IP address as ``host``: exactly that address is bound.

Recorded requests: ``standin.requests`` is a list of ``RecordedRequest``
(``method``, ``path``, ``query``, ``headers`` without secrets, ``api_key_present``,
``api_key_sha256``, ``auth_scheme``, ``body`` (parsed JSON), ``time``, ``status``,
``outcome``, ``behaviour``); ``standin.message_requests`` only the
``POST /v1/messages`` ones.

Validation notes: by default (``strict_alternation=True``) messages must start
with ``user`` and alternate, which is stricter than the API (it merges
consecutive turns) and is what DigitalMe wants; ``strict_alternation=False``
merges like the API. Unknown top-level fields are rejected like the API does
("Extra inputs are not permitted"), except on ``?beta=true`` requests.
``max_tokens: 0`` is accepted (the API's cache pre-warm: no content,
``stop_reason: "max_tokens"``).

Usage from a test::

    from standins.anthropic_api import Error, Reply, run_anthropic_standin

    async with run_anthropic_standin() as standin:
        standin.script(Error(status=429, retry_after=0.1), Reply(text="hi"))
        client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=standin.base_url)
        msg = await client.messages.create(model="claude-x", max_tokens=64,
                                           messages=[{"role": "user", "content": "hello"}])
        assert msg.content[0].text == "hi" and len(standin.requests) == 2

As a process (prints ``anthropic-standin listening on <url>`` once ready; stops
cleanly on SIGTERM/SIGINT)::

    python -m standins.anthropic_api --host 127.0.0.1 --port 8765 [--delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from standins.anthropic_behaviours import (
    DEFAULT_MESSAGES,
    ERROR_STATUSES,
    Behaviour,
    Error,
    Hang,
    Reply,
    Slow,
    StreamThenError,
    StreamThenHang,
    error_type_for,
)
from standins.anthropic_tokens import (
    BASE_OVERHEAD,
    TTL_SECONDS,
    canonical_json,
    count_input_tokens,
    default_reply_text,
    estimate_tokens,
    token_units,
)
from standins.anthropic_validation import VERSION, Invalid, validate_messages_request

__all__ = [
    "AnthropicStandin",
    "Behaviour",
    "Error",
    "Hang",
    "RecordedRequest",
    "Reply",
    "Slow",
    "StreamThenError",
    "StreamThenHang",
    "default_reply_text",
    "estimate_tokens",
    "run_anthropic_standin",
]

log = logging.getLogger("standins.anthropic_api")

# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the stand-in saw it. Secrets are not kept, only a hash."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    api_key_present: bool
    api_key_sha256: str | None
    auth_scheme: str | None  # "x-api-key", "bearer" or None
    body: Any
    time: float
    status: int | None = None
    outcome: str | None = None  # replied, streamed, error, stream_error, hung, disconnected...
    behaviour: str | None = None

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def retry_count(self) -> int | None:
        value = self.headers.get("x-stainless-retry-count")
        return int(value) if value and value.isdigit() else None


SECRET_HEADERS = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})

# --------------------------------------------------------------------------- ids

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _make_id(prefix: str, seed: str) -> str:
    n = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big")
    out = []
    for _ in range(22):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return f"{prefix}01{''.join(out)}"


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def _split_text(text: str, size: int = 12) -> list[str]:
    """Split at whitespace into pieces of roughly ``size`` characters (joins back exactly)."""
    if not text:
        return []
    pieces = re.findall(r"\S+\s*|\s+", text)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        current += piece
        if len(current) >= size:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------- server


class AnthropicStandin:
    """The stand-in server. Use ``run_anthropic_standin()`` or ``start()``/``close()``."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] | None = None,
        api_key_sha256s: Iterable[str] | None = None,
        strict_alternation: bool = True,
        strict_fields: bool = True,
        min_cache_tokens: int = 0,
        known_models: Iterable[str] | None = None,
        delay: float = 0.0,
    ) -> None:
        hashes = {hashlib.sha256(k.encode()).hexdigest() for k in api_keys or ()}
        hashes |= {h.lower() for h in api_key_sha256s or ()}
        self._accepted_key_hashes: frozenset[str] | None = (
            frozenset(hashes) if api_keys is not None or api_key_sha256s is not None else None
        )
        self.strict_alternation = strict_alternation
        self.strict_fields = strict_fields
        self.min_cache_tokens = min_cache_tokens
        self.known_models = set(known_models) if known_models is not None else None
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._queue: deque[Behaviour] = deque()
        self._sticky: Behaviour | None = None
        self._delay = delay
        self._cache: dict[str, tuple[float, float]] = {}  # key -> (expires_at, ttl)
        self._counter = 0
        self._closing: asyncio.Event | None = None
        self._arrived: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.host: str | None = None
        self.port: int | None = None

    # ---------------------------------------------------------------- scripting

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each valid POST /v1/messages consumes one."""
        for b in behaviours:
            if not isinstance(b, Reply | Error | Slow | StreamThenError | StreamThenHang | Hang):
                raise TypeError(f"not a stand-in behaviour: {b!r}")
        with self._lock:
            self._queue.extend(behaviours)

    @property
    def pending(self) -> int:
        """How many scripted behaviours are still queued."""
        with self._lock:
            return len(self._queue)

    def fail_all(self, behaviour: Behaviour) -> None:
        """Sticky mode: every request gets ``behaviour`` until ``recover()``."""
        with self._lock:
            self._sticky = behaviour

    def recover(self) -> None:
        with self._lock:
            self._sticky = None

    def set_delay(self, seconds: float) -> None:
        """Delay every successful answer by ``seconds``."""
        with self._lock:
            self._delay = max(0.0, float(seconds))

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def reset(self) -> None:
        """Forget requests, scripts, sticky mode, delay and the prompt cache."""
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self._sticky = None
            self._delay = 0.0
            self._cache.clear()

    @property
    def message_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests have arrived (of any kind)."""
        assert self._arrived is not None, "stand-in not started"
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.requests) >= count), timeout
            )
        return list(self.requests)

    def _label(self, behaviour: Behaviour) -> str:
        """How a behaviour shows in records and logs, e.g. ``Error(529)`` or ``fail_all:Hang``."""
        name = type(behaviour).__name__
        if isinstance(behaviour, Error):
            name += f"({behaviour.status})"
        with self._lock:
            sticky = self._sticky is behaviour
        return f"fail_all:{name}" if sticky else name

    def _next_behaviour(self, consume: bool) -> Behaviour | None:
        with self._lock:
            if self._sticky is not None:
                return self._sticky
            if consume and self._queue:
                return self._queue.popleft()
            return None

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        if self.host is None or self.port is None:
            raise RuntimeError("stand-in not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=32 * 1024 * 1024, middlewares=[self._error_middleware]
        )
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_post("/v1/messages/count_tokens", self._handle_count_tokens)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on exactly ``host:port`` (port 0: any free port). Returns the base URL."""
        self._closing = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=2.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host = host
        self.port = self._runner.addresses[0][1]
        return self.base_url

    async def close(self) -> None:
        """Stop listening; hanging and slow requests are cut off."""
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _pause(self, seconds: float) -> bool:
        """Sleep; False if the server started closing meanwhile."""
        assert self._closing is not None
        if seconds <= 0:
            return not self._closing.is_set()
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    async def _hang(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        assert self._closing is not None
        rec.outcome = "hung"
        await self._closing.wait()
        return self._drop(request, rec)

    @staticmethod
    def _drop(request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        """Close the connection without an answer (the server is shutting down)."""
        rec.outcome = rec.outcome if rec.outcome not in (None, "streaming") else "server_closed"
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    # ---------------------------------------------------------------- http plumbing

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self._error_response(
                413, "request_too_large", "Request exceeds the maximum allowed number of bytes."
            )
        except web.HTTPNotFound:
            return self._error_response(404, "not_found_error", "Not Found")
        except web.HTTPMethodNotAllowed:
            return self._error_response(
                405, "invalid_request_error", f"Method {request.method} not allowed"
            )

    def _request_id(self) -> str:
        with self._lock:
            self._counter += 1
            n = self._counter
        return _make_id("req_", f"req:{n}")

    def _error_response(
        self, status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        request_id = self._request_id()
        body = {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }
        return web.json_response(
            body, status=status, headers={"request-id": request_id, **(headers or {})}
        )

    def _scripted_error(self, err: Error) -> web.Response:
        error_type = err.type or error_type_for(err.status)
        message = err.message or DEFAULT_MESSAGES.get(error_type, error_type.replace("_", " "))
        headers = dict(err.headers)
        if err.retry_after is not None:
            ra = err.retry_after
            headers["retry-after"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        if err.should_retry is not None:
            headers["x-should-retry"] = "true" if err.should_retry else "false"
        return self._error_response(err.status, error_type, message, headers)

    async def _record(self, request: web.Request) -> tuple[RecordedRequest, bytes]:
        raw = await request.read()
        headers = {
            k.lower(): v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS
        }
        key, scheme = None, None
        if request.headers.get("x-api-key"):
            key, scheme = request.headers["x-api-key"], "x-api-key"
        else:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer " and auth[7:].strip():
                key, scheme = auth[7:].strip(), "bearer"
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            api_key_present=key is not None,
            api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if key is not None else None,
            auth_scheme=scheme,
            body=body,
            time=time.time(),
        )
        assert self._arrived is not None
        async with self._arrived:
            self.requests.append(rec)
            self._arrived.notify_all()
        return rec, raw

    def _precheck(
        self,
        request: web.Request,
        rec: RecordedRequest,
        raw: bytes,
    ) -> web.Response | None:
        """Authentication, version header and JSON parsing, in that order."""
        if not rec.api_key_present:
            return self._error_response(401, "authentication_error", "x-api-key header is required")
        if (
            self._accepted_key_hashes is not None
            and rec.api_key_sha256 not in self._accepted_key_hashes
        ):
            return self._error_response(401, "authentication_error", "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if not version:
            return self._error_response(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
        if not VERSION.match(version):
            return self._error_response(
                400, "invalid_request_error", f"anthropic-version: invalid version {version!r}"
            )
        if rec.body is None:
            what = "empty body" if not raw else "invalid JSON"
            return self._error_response(
                400, "invalid_request_error", f"There was an issue with the request body: {what}"
            )
        return None

    def _finish(
        self,
        rec: RecordedRequest,
        response: web.StreamResponse,
        outcome: str,
    ) -> web.StreamResponse:
        rec.status = response.status
        rec.outcome = rec.outcome or outcome
        model = rec.body.get("model") if isinstance(rec.body, dict) else None
        log.info(
            "%s %s -> %s %s model=%s stream=%s key=%s behaviour=%s",
            rec.method,
            rec.path,
            rec.status,
            rec.outcome,
            model,
            rec.stream,
            "present" if rec.api_key_present else "missing",
            rec.behaviour or "-",
        )
        return response

    # ---------------------------------------------------------------- handlers

    async def _handle_count_tokens(self, request: web.Request) -> web.StreamResponse:
        rec, raw = await self._record(request)
        try:
            early = self._precheck(request, rec, raw)
            if early is not None:
                return self._finish(rec, early, "rejected")
            beta = request.query.get("beta") == "true"
            error, _ = validate_messages_request(
                rec.body,
                strict_alternation=self.strict_alternation,
                strict_fields=self.strict_fields and not beta,
                count_tokens=True,
            )
            if error is not None:
                return self._finish(
                    rec, self._error_response(400, "invalid_request_error", error), "rejected"
                )
            behaviour = self._next_behaviour(consume=False)
            if behaviour is not None:
                rec.behaviour = self._label(behaviour)
            while isinstance(behaviour, Slow):
                if not await self._pause(behaviour.delay):
                    return self._drop(request, rec)
                behaviour = behaviour.then
            if isinstance(behaviour, Hang | StreamThenHang):
                return await self._hang(request, rec)
            if isinstance(behaviour, Error | StreamThenError):
                return self._finish(rec, self._scripted_error(self._as_error(behaviour)), "error")
            request_id = self._request_id()
            response = web.json_response(
                {"input_tokens": count_input_tokens(rec.body)}, headers={"request-id": request_id}
            )
            return self._finish(rec, response, "replied")
        except asyncio.CancelledError:
            rec.outcome = rec.outcome or "disconnected"
            raise

    @staticmethod
    def _as_error(behaviour: Error | StreamThenError) -> Error:
        if isinstance(behaviour, Error):
            return behaviour
        return Error(
            status=ERROR_STATUSES.get(behaviour.error_type, 500),
            type=behaviour.error_type,
            message=behaviour.message,
        )

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        rec, raw = await self._record(request)
        try:
            return await self._messages(request, rec, raw)
        except ConnectionResetError:  # the client left while we were writing
            rec.outcome = "disconnected"
            log.info("%s %s -> %s", rec.method, rec.path, rec.outcome)
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            rec.outcome = rec.outcome if rec.outcome not in (None, "streaming") else "disconnected"
            log.info("%s %s -> %s", rec.method, rec.path, rec.outcome)
            raise

    async def _messages(
        self,
        request: web.Request,
        rec: RecordedRequest,
        raw: bytes,
    ) -> web.StreamResponse:
        early = self._precheck(request, rec, raw)
        if early is not None:
            return self._finish(rec, early, "rejected")
        body: dict[str, Any] = rec.body
        beta = request.query.get("beta") == "true"
        error, tool_names = validate_messages_request(
            body,
            strict_alternation=self.strict_alternation,
            strict_fields=self.strict_fields and not beta,
        )
        if (
            error is None
            and self.known_models is not None
            and body["model"] not in self.known_models
        ):
            return self._finish(
                rec,
                self._error_response(404, "not_found_error", f"model: {body['model']}"),
                "rejected",
            )
        if error is not None:
            return self._finish(
                rec, self._error_response(400, "invalid_request_error", error), "rejected"
            )

        behaviour: Behaviour | None = self._next_behaviour(consume=True)
        rec.behaviour = self._label(behaviour) if behaviour is not None else "default"
        while isinstance(behaviour, Slow):
            if not await self._pause(behaviour.delay):
                return self._drop(request, rec)
            behaviour = behaviour.then
        if behaviour is None:
            behaviour = Reply()
        if isinstance(behaviour, Hang):
            return await self._hang(request, rec)
        if isinstance(behaviour, Error):
            return self._finish(rec, self._scripted_error(behaviour), "error")
        if isinstance(behaviour, StreamThenError) and not rec.stream:
            return self._finish(rec, self._scripted_error(self._as_error(behaviour)), "error")
        if isinstance(behaviour, StreamThenHang) and not rec.stream:
            return await self._hang(request, rec)

        reply = behaviour if isinstance(behaviour, Reply) else (behaviour.then or Reply())
        assert isinstance(reply, Reply)
        try:
            message = self._build_message(body, reply, tool_names)
        except Invalid as exc:
            return self._finish(
                rec, self._error_response(400, "invalid_request_error", str(exc)), "script_error"
            )

        with self._lock:
            delay = self._delay
        if delay and not await self._pause(delay):
            return self._drop(request, rec)
        if not rec.stream:
            request_id = self._request_id()
            return self._finish(
                rec, web.json_response(message, headers={"request-id": request_id}), "replied"
            )
        cut = behaviour if isinstance(behaviour, StreamThenError | StreamThenHang) else None
        return await self._stream(request, rec, message, reply, cut)

    # ---------------------------------------------------------------- replies

    def _usage(self, body: Mapping[str, Any]) -> dict[str, Any]:
        units = token_units(body)
        prefix: list[int] = []
        running = 0
        for u in units:
            running += u.tokens
            prefix.append(running)
        total = BASE_OVERHEAD + running
        model = str(body.get("model"))
        keys: list[tuple[int, str, str]] = []  # (unit index, cache key, ttl)
        digest = hashlib.sha256(model.encode())
        for i, u in enumerate(units):
            digest.update(b"\x00" + u.material.encode())
            if u.cache_control is not None:
                ttl = str(u.cache_control.get("ttl", "5m"))
                keys.append((i, digest.copy().hexdigest(), ttl))
        read = 0
        created = {"5m": 0, "1h": 0}
        now = time.monotonic()
        with self._lock:
            hit = -1
            for n in range(len(keys) - 1, -1, -1):
                i, key, _ttl = keys[n]
                entry = self._cache.get(key)
                if entry is not None and entry[0] > now:
                    hit = n
                    read = prefix[i]
                    self._cache[key] = (now + entry[1], entry[1])
                    break
            previous = read
            for i, key, ttl in keys[hit + 1 :]:
                if prefix[i] < self.min_cache_tokens:
                    continue
                created[ttl] += prefix[i] - previous
                previous = prefix[i]
                self._cache[key] = (now + TTL_SECONDS[ttl], TTL_SECONDS[ttl])
        creation = created["5m"] + created["1h"]
        return {
            "input_tokens": total - read - creation,
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": created["5m"],
                "ephemeral_1h_input_tokens": created["1h"],
            },
            "output_tokens": 0,
            "service_tier": "standard",
        }

    def _build_message(
        self,
        body: Mapping[str, Any],
        reply: Reply,
        tool_names: set[str],
    ) -> dict[str, Any]:
        with self._lock:
            self._counter += 1
            n = self._counter
        msg_id = _make_id("msg_", f"msg:{n}")
        calls: list[Mapping[str, Any]] = []
        if reply.tool_use is not None:
            calls = (
                [reply.tool_use] if isinstance(reply.tool_use, Mapping) else list(reply.tool_use)
            )
            for call in calls:
                name = call.get("name")
                if name not in tool_names:
                    declared = ", ".join(sorted(tool_names)) or "none"
                    raise Invalid(
                        f"[stand-in script] Reply(tool_use=...) names tool {name!r} "
                        f"but the request declares tools: {declared}"
                    )
        if reply.chunks is not None:
            text: str | None = "".join(reply.chunks)
        elif reply.text is not None:
            text = reply.text
        else:
            text = None if calls else default_reply_text(body)
        stop_reason = "tool_use" if calls else "end_turn"
        stop_sequence = None
        max_tokens = int(body["max_tokens"])
        if text is not None and not calls:
            for seq in body.get("stop_sequences") or []:
                at = text.find(seq)
                if at >= 0 and (stop_sequence is None or at < text.find(stop_sequence)):
                    stop_sequence = seq
            if stop_sequence is not None:
                text = text[: text.find(stop_sequence)]
                stop_reason = "stop_sequence"
            if estimate_tokens(text) > max_tokens:
                text = text[: max_tokens * 4]
                stop_reason, stop_sequence = "max_tokens", None
        content: list[dict[str, Any]] = []
        if max_tokens == 0:
            text, calls, stop_reason, stop_sequence = None, [], "max_tokens", None
        if text:
            content.append({"type": "text", "text": text})
        for k, call in enumerate(calls):
            content.append(
                {
                    "type": "tool_use",
                    "id": str(call.get("id") or _make_id("toolu_", f"toolu:{n}:{k}")),
                    "name": call["name"],
                    "input": dict(call.get("input") or {}),
                }
            )
        usage = self._usage(body)
        usage["output_tokens"] = (
            0
            if max_tokens == 0
            else max(
                1,
                sum(
                    estimate_tokens(b["text"])
                    if b["type"] == "text"
                    else estimate_tokens(canonical_json(b["input"])) + 10
                    for b in content
                ),
            )
        )
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": reply.stop_reason or stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    async def _stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        message: dict[str, Any],
        reply: Reply,
        cut: StreamThenError | StreamThenHang | None,
    ) -> web.StreamResponse:
        request_id = self._request_id()
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": request_id,
            },
        )
        await response.prepare(request)
        rec.status, rec.outcome = 200, "streaming"
        usage = message["usage"]
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1 if usage["output_tokens"] else 0},
        }
        await response.write(_sse("message_start", {"type": "message_start", "message": start}))
        sent = 0
        pinged = False
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                first = {"type": "text", "text": ""}
                pieces = (
                    list(reply.chunks) if reply.chunks is not None else _split_text(block["text"])
                )
                if "".join(pieces) != block["text"]:  # truncated by max_tokens / stop sequence
                    pieces = _split_text(block["text"])
                deltas = [{"type": "text_delta", "text": p} for p in pieces]
            else:
                first = {**block, "input": {}}
                encoded = json.dumps(block["input"], separators=(",", ":"), ensure_ascii=False)
                deltas = [
                    {"type": "input_json_delta", "partial_json": p}
                    for p in ["", *[encoded[i : i + 10] for i in range(0, len(encoded), 10)]]
                ]
            await response.write(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": first},
                )
            )
            if not pinged:
                await response.write(_sse("ping", {"type": "ping"}))
                pinged = True
            for delta in deltas:
                if cut is not None and sent >= cut.after_chunks:
                    return await self._cut_stream(request, rec, response, cut)
                if reply.chunk_delay and sent and not await self._pause(reply.chunk_delay):
                    return self._drop(request, rec)
                await response.write(
                    _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
                )
                sent += 1
            await response.write(
                _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            )
        if cut is not None:
            return await self._cut_stream(request, rec, response, cut)
        if not pinged:
            await response.write(_sse("ping", {"type": "ping"}))
        await response.write(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": message["stop_reason"],
                        "stop_sequence": message["stop_sequence"],
                    },
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
        )
        await response.write(_sse("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        rec.outcome = "streamed"
        return self._finish(rec, response, "streamed")

    async def _cut_stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        response: web.StreamResponse,
        cut: StreamThenError | StreamThenHang,
    ) -> web.StreamResponse:
        if isinstance(cut, StreamThenHang):
            return await self._hang(request, rec)
        rec.outcome = "stream_error"
        await response.write(
            _sse(
                "error",
                {
                    "type": "error",
                    "error": {"type": cut.error_type, "message": cut.message},
                    "request_id": response.headers.get("request-id"),
                },
            )
        )
        await response.write_eof()
        return self._finish(rec, response, "stream_error")


@contextlib.asynccontextmanager
async def run_anthropic_standin(
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> AsyncIterator[AnthropicStandin]:
    """Run a stand-in on ``host:port`` for the duration of the block."""
    standin = AnthropicStandin(**options)
    await standin.start(host, port)
    try:
        yield standin
    finally:
        await standin.close()


# --------------------------------------------------------------------------- process mode


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m standins.anthropic_api",
        description="Local stand-in for the Anthropic Messages API (tests and demos). Prints "
        "'anthropic-standin listening on <url>' when ready; stops on SIGTERM/SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (only this one)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds to wait before every successful answer"
    )
    parser.add_argument(
        "--api-key-sha256",
        action="append",
        default=None,
        metavar="HEX",
        help="accept only keys with this sha256 (repeatable; default: any key)",
    )
    parser.add_argument(
        "--min-cache-tokens",
        type=int,
        default=0,
        help="smallest prefix the simulated prompt cache stores",
    )
    parser.add_argument(
        "--lenient-roles",
        action="store_true",
        help="merge consecutive same-role messages like the API instead of rejecting them",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (stderr)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    standin = AnthropicStandin(
        api_key_sha256s=args.api_key_sha256,
        delay=args.delay,
        min_cache_tokens=args.min_cache_tokens,
        strict_alternation=not args.lenient_roles,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = await standin.start(args.host, args.port)
    print(f"anthropic-standin listening on {url}", flush=True)
    await stop.wait()
    log.info("stopping")
    await standin.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
