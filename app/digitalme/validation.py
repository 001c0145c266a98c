"""Reading request bodies: a JSON object, with named fields of the right type, or a 400."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import ApiError


async def json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (or {} for an empty body when ``optional``)."""
    raw = await request.read()  # raises 413 past client_max_size
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not UTF-8") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json",
                       f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, "
                       f"column {exc.colno}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return body


def text_field(body: dict[str, Any], name: str, *, required: bool = True,
               max_length: int = 10_000) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, "missing_field", f"field '{name}' is required", field=name)
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"field '{name}' must be a string", field=name)
    value = value.strip()
    if required and not value:
        raise ApiError(400, "invalid_field", f"field '{name}' must not be empty", field=name)
    if len(value) > max_length:
        raise ApiError(400, "invalid_field",
                       f"field '{name}' is longer than {max_length} characters", field=name)
    return value


def choice_field(body: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = text_field(body, name)
    if value not in choices:
        raise ApiError(400, "invalid_field",
                       f"field '{name}' must be one of: {', '.join(choices)}", field=name)
    return value


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"'{name}' must be a whole number") from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_parameter", f"'{name}' must be between {low} and {high}")
    return value
