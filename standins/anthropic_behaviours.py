"""What the Anthropic stand-in (anthropic_api.py) answers a request with: a reply, an
error of the API's own types, a delay, a stream that breaks or hangs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reply:
    """A successful answer. ``text=None``: the default text (none if ``tool_use`` is set)."""

    text: str | None = None
    tool_use: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    stop_reason: str | None = None
    chunks: Sequence[str] | None = None
    chunk_delay: float = 0.0


@dataclass(frozen=True)
class Error:
    """An HTTP error answer in the API's error shape."""

    status: int = 500
    type: str | None = None
    message: str | None = None
    retry_after: float | None = None
    should_retry: bool | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Slow:
    """Wait ``delay`` seconds, then behave like ``then`` (default ``Reply()``)."""

    delay: float
    then: Behaviour | None = None


@dataclass(frozen=True)
class StreamThenError:
    """Stream ``after_chunks`` deltas, then an ``event: error``."""

    after_chunks: int = 2
    error_type: str = "overloaded_error"
    message: str = "Overloaded"
    then: Reply | None = None


@dataclass(frozen=True)
class StreamThenHang:
    """Stream ``after_chunks`` deltas, then go silent until the client leaves or we close."""

    after_chunks: int = 2
    then: Reply | None = None


@dataclass(frozen=True)
class Hang:
    """Accept the request and never answer."""


Behaviour = Reply | Error | Slow | StreamThenError | StreamThenHang | Hang

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_STATUSES: dict[str, int] = {v: k for k, v in ERROR_TYPES.items()}
DEFAULT_MESSAGES: dict[str, str] = {
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
}


def error_type_for(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"
