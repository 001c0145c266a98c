"""JSON errors: every error the service answers has the same shape.

{"error": "<machine code>", "message": "<what went wrong and what to do>"}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """Raised by handlers; rendered by the error middleware."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"error": code, "message": message, **extra}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


# Codes for aiohttp's own HTTP exceptions (unknown route, wrong method, body too large...).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    431: "headers_too_large",
}


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds + 0.49)))}
