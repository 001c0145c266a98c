"""Reading requests: a JSON body or a query validated by its model (models.py), or a 400
that names the field in the service's words."""

from __future__ import annotations

import json
from typing import Any, TypeVar, get_args

import annotated_types
from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import ApiError

Model = TypeVar("Model", bound=BaseModel)


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


async def read_body(request: web.Request, model: type[Model], *, optional: bool = False,
                    context: dict[str, Any] | None = None) -> Model:
    """The body as ``model`` (fields it does not declare are ignored), or a 400."""
    body = await json_object(request, optional=optional)
    try:
        return model.model_validate(body, context=context)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0])
        code, problem = _field_problem(model, name, error)
        raise ApiError(400, code, f"field '{name}' {problem}", field=name) from None


def _field_problem(model: type[BaseModel], name: str, error: ErrorDetails) -> tuple[str, str]:
    kind, given = error["type"], error["input"]
    if kind == "missing" or (kind == "string_type" and given is None):
        return "missing_field", "is required"
    if kind == "string_type" or (kind == "literal_error" and not isinstance(given, str)):
        return "invalid_field", "must be a string"
    if kind == "string_pattern_mismatch" or (kind == "literal_error" and not given.strip()):
        return "invalid_field", "must not be empty"
    if kind == "string_too_long":
        return "invalid_field", f"is longer than {error.get('ctx', {})['max_length']} characters"
    if kind == "literal_error":
        choices = get_args(model.model_fields[name].annotation)
        return "invalid_field", f"must be one of: {', '.join(choices)}"
    return "invalid_field", error["msg"]


def read_query(request: web.Request, model: type[Model]) -> Model:
    """The query parameters ``model`` declares (the first of each name), or a 400."""
    query = request.query
    try:
        return model.model_validate({name: query[name] for name in model.model_fields
                                     if name in query})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0])
        if error["type"] in ("greater_than_equal", "less_than_equal"):
            low, high = _bounds(model, name)
            problem = f"must be between {low} and {high}"
        else:
            problem = "must be a whole number"
        raise ApiError(400, "invalid_parameter", f"'{name}' {problem}") from None


def _bounds(model: type[BaseModel], name: str) -> tuple[object, object]:
    metadata = model.model_fields[name].metadata
    low = next(m.ge for m in metadata if isinstance(m, annotated_types.Ge))
    high = next(m.le for m in metadata if isinstance(m, annotated_types.Le))
    return low, high
