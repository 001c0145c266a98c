"""Outbound calls to Telegram, Slack, GitHub and ClickUp: one HTTP session, one retry policy.

Every call has short explicit timeouts. :func:`with_retries` runs one attempt function and
classifies what went wrong:

* :class:`TransientError` (429, 5xx, timeouts, connection errors): retried at once with
  capped exponential backoff, honouring ``Retry-After`` up to :data:`MAX_INLINE_WAIT`
  seconds. Past the retries, or for a longer ``Retry-After``, it is raised, and the inbox
  tries the delivery again later (at the ``Retry-After`` time, if there was one);
* :class:`PermanentError` (other 4xx: bad token, unknown chat, ...): raised at once; the
  delivery fails with the error kept for ``digitalme inbox list``.

The integrations' own SDK clients (slack_sdk, gidgethub) run on the same session and
translate their exceptions into these two.

**Sent at most once where the platform allows.** A failure without a definite answer from
the platform (a timeout or a connection cut after the request went out, a 5xx) may hide
a request the platform carried out: such an error has ``maybe_delivered``. Before
repeating it, :meth:`Outbound.with_retries` asks the platform through the caller's
``reconcile`` (Slack: the thread's messages, by the metadata key each reply carries) and
returns what it finds instead of sending again. Where the platform offers no way to ask
(Telegram's Bot API, Slack's ``response_url``) the request is repeated, and counted in
``digitalme_outbound_reconciled_total{result="unknowable"}``: it may show twice. The inbox
records when a reply part's send began (``inbox.sending_since``), so that a send a crash
interrupted is treated the same way at the next attempt (docs/channels.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp

from .config import Settings
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_INLINE_WAIT = 30.0  # seconds: a longer Retry-After reschedules the delivery instead
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
_ERROR_TEXT_LIMIT = 300


class OutboundError(Exception):
    """An outbound call failed; ``service`` names the platform. ``maybe_delivered``: the
    platform gave no definite answer, so it may have carried the request out."""

    def __init__(
        self,
        service: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        maybe_delivered: bool = False,
    ) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.status = status
        self.retry_after = retry_after
        self.maybe_delivered = maybe_delivered


class TransientError(OutboundError):
    """Worth retrying: rate limited, the platform failing, or the network."""


class PermanentError(OutboundError):
    """Retrying will not help (a 4xx other than 408/429)."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta-seconds form), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def classify_status(
    service: str, status: int, headers: Mapping[str, str], detail: str
) -> OutboundError:
    """The error for an unsuccessful HTTP status."""
    detail = detail[:_ERROR_TEXT_LIMIT]
    if status == 429 or status == 408 or status >= 500:
        # A 5xx may come from a proxy in front of a backend that did the work.
        return TransientError(
            service,
            f"HTTP {status}: {detail}",
            status=status,
            retry_after=parse_retry_after(headers.get("Retry-After")),
            maybe_delivered=status >= 500,
        )
    return PermanentError(service, f"HTTP {status}: {detail}", status=status)


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Wait before retry number ``attempt`` (1-based): Retry-After if given, else jittered
    exponential backoff."""
    if retry_after is not None:
        return retry_after
    delay: float = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not security


class Outbound:
    """Owns the shared ``aiohttp.ClientSession``; :meth:`start` and :meth:`close` it from
    the app's cleanup context."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=s.outbound_timeout_seconds, connect=s.outbound_connect_timeout_seconds
            ),
            # Proxies and .netrc from the environment do not apply to the service's calls.
            trust_env=False,
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the outbound HTTP session is not started")
        return self._session

    async def with_retries(
        self,
        service: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        redact: str | None = None,
        uncertain: bool = False,
        reconcile: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run ``attempt`` (which raises Transient/PermanentError or aiohttp errors) with
        the retry policy; count every call and every error in the metrics. ``redact`` (a
        token that is part of the URL, as Telegram's is) never appears in an error.

        ``uncertain``: an earlier attempt, before this call (a crash), may have reached the
        platform. Before sending after such an attempt, or after one of this call's that
        failed without a definite answer, ``reconcile`` asks the platform: its result if
        the request was carried out (returned instead of sending again), None if not; a
        PermanentError from it means it cannot tell. Without ``reconcile``, or when it
        cannot tell, the request is sent again (counted as unknowable). The error raised
        at the end says whether the request may have been carried out
        (``maybe_delivered``)."""
        retries = self.settings.outbound_retries
        maybe = uncertain
        for number in range(1, retries + 2):
            try:
                if maybe:
                    found = await self._reconcile(service, reconcile)
                    if found is not None:
                        return found
                    maybe = False
                self.metrics.outbound_requests.labels(service).inc()
                return await attempt()
            except OutboundError as exc:
                error: OutboundError = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                text = f"{type(exc).__name__}: {exc}".rstrip(": ")
                # Refused or unreachable: the request never left. Anything later (a timeout,
                # a connection cut) may have reached the platform.
                error = TransientError(
                    service,
                    text.replace(redact, "***") if redact else text,
                    maybe_delivered=not isinstance(exc, aiohttp.ClientConnectorError),
                )
            maybe = maybe or error.maybe_delivered
            error.maybe_delivered = maybe
            kind = (
                "permanent"
                if isinstance(error, PermanentError)
                else (
                    "rate_limited"
                    if error.status == 429
                    else "server_error"
                    if error.status
                    else "network"
                )
            )
            self.metrics.outbound_errors.labels(service, kind).inc()
            if isinstance(error, PermanentError) or number > retries:
                raise error
            if error.retry_after is not None and error.retry_after > MAX_INLINE_WAIT:
                raise error  # the inbox reschedules the delivery for then
            delay = backoff_delay(number, error.retry_after)
            log.info("%s; retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _reconcile(
        self, service: str, reconcile: Callable[[], Awaitable[T | None]] | None
    ) -> T | None:
        """What an earlier send that may have arrived became, or None to send (again)."""
        result = "unknowable"
        found: T | None = None
        if reconcile is not None:
            try:
                found = await reconcile()
            except PermanentError as exc:
                log.warning("%s cannot tell whether an earlier send arrived (%s)", service, exc)
            else:
                result = "found" if found is not None else "not_found"
        self.metrics.outbound_reconciled.labels(service, result).inc()
        if result == "unknowable":
            log.warning(
                "%s: sending again what may have arrived already (the platform "
                "gives no way to know): it may show twice",
                service,
            )
        elif result == "found":
            log.info("%s: an earlier send had arrived; not sending it again", service)
        return found

    async def request_json(
        self,
        service: str,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        redact: str | None = None,
        uncertain: bool = False,
    ) -> Any:
        """One JSON request with the retry policy; returns the decoded JSON answer.
        ``uncertain``: an earlier attempt may have been carried out (see
        :meth:`with_retries`; there is no way to ask here, so it is sent again)."""

        async def attempt() -> Any:
            async with self.session.request(
                method, url, json=json_body, headers=dict(headers or {})
            ) as response:
                raw = await response.read()
                try:
                    body = json.loads(raw) if raw.strip() else None
                except ValueError:
                    body = None
                if 200 <= response.status < 300:
                    return body
                error = classify_status(
                    service, response.status, response.headers, _describe(body, raw)
                )
                if error.retry_after is None and isinstance(body, dict):
                    # Telegram says when to come back in the body, not (only) a header.
                    parameters = body.get("parameters")
                    if isinstance(parameters, dict) and isinstance(
                        parameters.get("retry_after"), int | float
                    ):
                        error.retry_after = float(parameters["retry_after"])
                raise error

        return await self.with_retries(service, attempt, redact=redact, uncertain=uncertain)


def _describe(body: Any, raw: bytes) -> str:
    if isinstance(body, dict):
        for key in ("description", "err", "error", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return raw[:_ERROR_TEXT_LIMIT].decode(errors="replace")
