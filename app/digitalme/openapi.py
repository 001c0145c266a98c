"""The OpenAPI 3.1 description of /api/v1, served at /api/v1/openapi.json, generated from
the URL table (routes.API_ROUTES: paths, methods, scopes), each handler's ``@operation``
(operations.py) and the models it names (models.py; pydantic writes their JSON Schema).

Nothing here is a second copy of a shape: a test checks that the document describes
exactly the routes, that it is valid OpenAPI, and the fuzz test runs from it.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from . import __version__, models
from .operations import Operation, Reply, operation_of
from .routes import API_ROUTES

_REF = "#/components/schemas/{model}"

DESCRIPTION = (
    "Talk to the digital clone and manage it. Every endpoint needs a bearer token "
    "(`Authorization: Bearer dm_...`); `chat` tokens may hold their own conversations, "
    "`admin` tokens may do everything."
)

# What every API route may answer (middlewares.py and handlers.api.requires), and what a
# body or a query adds (validation.py, aiohttp's client_max_size).
_AUTH_ERRORS = {
    401: "No or invalid bearer token.",
    403: "The token's scope does not allow this.",
    429: "Rate limit exceeded; see Retry-After.",
}
_BODY_ERRORS = {400: "Malformed body.", 413: "Body too large."}
_QUERY_ERRORS = {400: "Bad parameter."}


class _Schema(GenerateJsonSchema):
    """pydantic's JSON Schema without a title for every property (noise in a document)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


@cache
def openapi_document() -> dict[str, Any]:
    routes = [(route.method.lower(), route.path, route.handler) for route in API_ROUTES]
    operations = [operation_of(handler) for _, _, handler in routes]
    paths: dict[str, dict[str, Any]] = {}
    for (method, path, handler), declared in zip(routes, operations, strict=True):
        paths.setdefault(path, {})[method] = _operation(
            declared, path, getattr(handler, "required_scope", "chat")
        )
    return {
        "openapi": "3.1.0",
        "info": {"title": "DigitalMe API", "version": __version__, "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(operations),
        },
        "paths": paths,
    }


def _schemas(operations: list[Operation]) -> dict[str, Any]:
    named: set[type[BaseModel]] = {models.Error}
    for declared in operations:
        named.update(
            m
            for m in (declared.body, *(r.model for r in declared.replies.values()))
            if m is not None
        )
    _, schemas = models_json_schema(
        [(model, "validation") for model in sorted(named, key=lambda m: m.__name__)],
        ref_template=_REF,
        schema_generator=_Schema,
    )
    return dict(sorted(schemas["$defs"].items()))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _operation(declared: Operation, path: str, scope: str) -> dict[str, Any]:
    who = "an `admin` token" if scope == "admin" else "a `chat` or `admin` token"
    described: dict[str, Any] = {
        "operationId": declared.operation_id,
        "summary": declared.summary,
        "description": f"Needs {who}.",
    }
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": _type_schema(models.PATH_PARAMETERS[name]),
        }
        for name in re.findall(r"{(\w+)}", path)
    ]
    errors = dict(_AUTH_ERRORS)
    if declared.query is not None:
        parameters += _query_parameters(declared.query)
        errors.update(_QUERY_ERRORS)
    if parameters:
        described["parameters"] = parameters
    if declared.body is not None:
        described["requestBody"] = {
            "required": declared.body_required,
            "content": {"application/json": {"schema": _ref(declared.body)}},
        }
        errors.update(_BODY_ERRORS)
    errors.update(declared.errors)
    responses = {str(status): _reply(reply) for status, reply in declared.replies.items()}
    responses.update(
        {str(status): _reply(Reply(when, models.Error)) for status, when in sorted(errors.items())}
    )
    described["responses"] = responses
    return described


def _reply(reply: Reply) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if reply.model is not None:
        content["application/json"] = {"schema": _ref(reply.model)}
    for media in reply.media:
        content[media] = {"schema": {"type": "string"}}
    return {"description": reply.description, "content": content}


def _query_parameters(query: type[Any]) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in models.query_parameters(query).items()
    ]


def _type_schema(annotation: Any) -> dict[str, Any]:
    return TypeAdapter(annotation).json_schema(schema_generator=_Schema)
