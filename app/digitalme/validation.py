"""Reading requests: a JSON body or a query validated by its model (models.py), or a 400
that names the field in the service's words."""

from __future__ import annotations

import json
from typing import Any, TypeVar, cast, get_args

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import ApiError
from .models import query_parameters

Model = TypeVar("Model", bound=BaseModel)
Query = TypeVar("Query")


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
        raise ApiError(
            400,
            "invalid_json",
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return body


async def read_body(
    request: web.Request,
    model: type[Model],
    *,
    optional: bool = False,
    context: dict[str, Any] | None = None,
) -> Model:
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


def read_query(request: web.Request, query: type[Query]) -> Query:
    """The whole-number parameters ``query`` declares (the first of each name), or a 400."""
    given = request.query
    plan, defaults = _declared.get(query) or _declare(query)
    if not given:
        return cast(Query, defaults)
    values: list[int] = []
    for name, default, low, high in plan:
        raw = given.get(name)
        if raw is None:
            values.append(default)
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, "invalid_parameter", f"'{name}' must be a whole number") from None
        if not low <= value <= high:
            raise ApiError(400, "invalid_parameter", f"'{name}' must be between {low} and {high}")
        values.append(value)
    return query(*values)


# A query's (name, default, lowest, highest) of each parameter, and its instance of
# defaults: read from the JSON Schema the API's description publishes,
# so what it says is what is enforced. The messages page reads its query on every request.
_Plan = tuple[tuple[tuple[str, int, int, int], ...], Any]
_declared: dict[type[Any], _Plan] = {}


def _declare(query: type[Any]) -> _Plan:
    plan = tuple(
        (name, p["default"], p["minimum"], p["maximum"])
        for name, p in query_parameters(query).items()
    )
    _declared[query] = plan, query()
    return _declared[query]
