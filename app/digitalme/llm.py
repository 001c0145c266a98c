"""Claude, through the official ``anthropic`` SDK, behind a circuit breaker.

:class:`Claude` is the only place that talks to the SDK. It turns every way a call can go
wrong into one of two exceptions the rest of the service understands:

* :class:`ClaudeUnavailable`: not configured, breaker open, overloaded, timed out,
  unreachable, rate-limited: try again later (HTTP 503 + Retry-After);
* :class:`ClaudeRejected`: Claude refused the request itself (a 4xx that retrying will
  not fix): HTTP 502, logged for the owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2

from .breaker import BreakerOpen, BreakerState, CircuitBreaker
from .config import Settings
from .metrics import Metrics
from .usage import Usage

log = logging.getLogger(__name__)


class ClaudeUnavailable(Exception):
    def __init__(self, code: str, message: str, retry_after: float) -> None:
        self.code = code
        self.retry_after = retry_after
        super().__init__(message)


class ClaudeRejected(Exception):
    pass


# What a call can fail with, besides our own bugs: the SDK's errors, and transport errors
# that the SDK lets through unwrapped when a stream stalls or is cut (httpx2.ReadTimeout,
# RemoteProtocolError), and our own deadline.
_CALL_FAILURES = (anthropic.APIError, httpx2.TransportError, TimeoutError)


@dataclass(frozen=True)
class ToolUse:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """One answer from Claude: its text, any tool calls it asked for, and what it cost."""

    text: str
    usage: Usage
    model: str
    stop_reason: str | None
    content: list[dict[str, Any]] = field(default_factory=list)  # for tool follow-ups
    tool_uses: tuple[ToolUse, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str


def _reply_from_message(message: Any) -> Reply:
    texts = []
    tool_uses = []
    content = []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
            content.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            tool_uses.append(ToolUse(block.id, block.name, dict(block.input or {})))
            content.append(
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            )
    u = message.usage
    usage = Usage(
        input_tokens=u.input_tokens or 0,
        output_tokens=u.output_tokens or 0,
        cache_read_tokens=u.cache_read_input_tokens or 0,
        cache_write_tokens=u.cache_creation_input_tokens or 0,
    )
    return Reply(
        "".join(texts), usage, message.model, message.stop_reason, content, tuple(tool_uses)
    )


def _retry_after_of(exc: anthropic.APIStatusError, default: float) -> float:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return max(1.0, float(value)) if value else default
    except ValueError:
        return default


class Claude:
    """Owns the SDK client; create with :meth:`start`, release with :meth:`close`."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_reset_seconds,
            on_change=self._breaker_changed,
        )
        metrics.breaker_state.set(int(self.breaker.state))
        self._client: anthropic.AsyncAnthropic | None = None

    @property
    def configured(self) -> bool:
        return self.settings.claude_configured

    def _breaker_changed(self, state: BreakerState) -> None:
        self.metrics.breaker_state.set(int(state))
        if state == BreakerState.OPEN:
            self.metrics.breaker_opened.inc()
            log.warning(
                "Claude circuit breaker opened for %.0fs", self.settings.breaker_reset_seconds
            )
        elif state == BreakerState.CLOSED:
            log.info("Claude circuit breaker closed")

    async def start(self) -> None:
        if not self.configured:
            log.warning("ANTHROPIC_API_KEY is not set: chat will answer 503 until it is")
            return
        s = self.settings
        self._client = anthropic.AsyncAnthropic(
            api_key=s.anthropic_api_key,
            base_url=s.anthropic_base_url,
            timeout=anthropic.Timeout(
                s.claude_timeout_seconds, connect=s.claude_connect_timeout_seconds
            ),
            max_retries=s.claude_max_retries,
            # Never export prompts as telemetry, whatever ANTHROPIC_OPEN_TELEMETRY* say.
            open_telemetry=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # --- calls ---------------------------------------------------------------------------

    def _request(
        self,
        system: Sequence[dict[str, Any]],
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.settings.model,
            "max_tokens": self.settings.max_tokens,
            "system": list(system),
            "messages": list(messages),
        }
        if tools:
            request["tools"] = list(tools)
        return request

    def _admit(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            raise ClaudeUnavailable(
                "claude_not_configured",
                "Claude is not configured: set ANTHROPIC_API_KEY (environment or systemd "
                "credential) and restart the service",
                retry_after=300,
            )
        try:
            self.breaker.before_call()
        except BreakerOpen as exc:
            self.metrics.claude_calls.labels("breaker_open").inc()
            raise ClaudeUnavailable(
                "claude_unavailable",
                "I can't reach my brain right now; I'll be back shortly. Please try again "
                "in a little while.",
                retry_after=max(1.0, exc.retry_after),
            ) from None
        return self._client

    def _failed(self, exc: BaseException) -> Exception:
        """Record a failure and translate it."""
        name = type(exc).__name__
        self.metrics.claude_errors.labels(name).inc()
        if (
            isinstance(exc, anthropic.APIStatusError)
            and 400 <= exc.status_code < 500
            and exc.status_code not in (408, 409, 429)
        ):
            # Claude refused this request: our bug or bad input, not an outage.
            self.breaker.record_neutral()
            self.metrics.claude_calls.labels("rejected").inc()
            log.error("Claude rejected the request: %s %s", exc.status_code, exc.message)
            return ClaudeRejected(f"Claude rejected the request ({exc.status_code})")
        self.breaker.record_failure()
        self.metrics.claude_calls.labels("error").inc()
        retry_after = self.settings.breaker_reset_seconds
        if isinstance(exc, anthropic.APIStatusError):
            retry_after = _retry_after_of(exc, retry_after)
        log.warning("Claude call failed: %s: %s", name, exc)
        code = (
            "claude_rate_limited"
            if isinstance(exc, anthropic.RateLimitError)
            else "claude_unavailable"
        )
        return ClaudeUnavailable(
            code,
            "I can't answer right now (my language model is not responding); "
            "please try again shortly.",
            retry_after=retry_after,
        )

    def _succeeded(self, reply: Reply, started: float) -> None:
        self.breaker.record_success()
        self.metrics.claude_calls.labels("ok").inc()
        self.metrics.claude_latency.observe(time.monotonic() - started)
        u = reply.usage
        for kind, value in (
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cache_read", u.cache_read_tokens),
            ("cache_write", u.cache_write_tokens),
        ):
            self.metrics.claude_tokens.labels(kind).inc(value)
        self.metrics.claude_cost.inc(u.cost_usd(self.settings))

    @property
    def answers_whole(self) -> bool:
        """Whether a caller that does not read text as it comes may ask for the whole answer
        in one response (``messages.create``: less work than parsing a stream, here and for
        Claude). Only when the longest answer fits the read timeout with room to spare:
        the SDK reckons an hour per 128k output tokens, so the default 1024 tokens (29 s)
        fit the default 60 s; larger ``DIGITALME_MAX_TOKENS`` keep streaming, whose chunks
        and pings reset the read timeout."""
        s = self.settings
        return 3600 * s.max_tokens / 128_000 <= s.claude_timeout_seconds / 2

    async def create(
        self,
        system: Sequence[dict[str, Any]],
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Reply:
        """The whole answer in one response (see :attr:`answers_whole`); the deadline covers
        it all, SDK retries included."""
        client = self._admit()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.claude_deadline_seconds):
                message = await client.messages.create(**self._request(system, messages, tools))
        except _CALL_FAILURES as exc:
            raise self._failed(exc) from exc
        except BaseException:
            self.breaker.record_neutral()
            raise
        reply = _reply_from_message(message)
        self._succeeded(reply, started)
        return reply

    async def stream(
        self,
        system: Sequence[dict[str, Any]],
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[TextDelta | Reply]:
        """Yield text deltas as they come, then the complete :class:`Reply` last."""
        client = self._admit()
        started = time.monotonic()
        try:
            async with AsyncExitStack() as stack:
                # The deadline covers getting the answer started, SDK retries and their
                # Retry-After waits included; after that each chunk has the read timeout.
                async with asyncio.timeout(self.settings.claude_deadline_seconds):
                    s = await stack.enter_async_context(
                        client.messages.stream(**self._request(system, messages, tools))
                    )
                async for event in s:
                    if event.type == "text":
                        yield TextDelta(event.text)
                message = await s.get_final_message()
        except _CALL_FAILURES as exc:
            raise self._failed(exc) from exc
        except BaseException:
            self.breaker.record_neutral()
            raise
        reply = _reply_from_message(message)
        self._succeeded(reply, started)
        yield reply
