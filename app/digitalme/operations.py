"""What each API operation reads and answers, declared on its handler with ``@operation``.

routes.py puts the handlers in the URL table; openapi.py describes that table from these
declarations and the models they name. The errors every API route can give (no token,
the wrong scope, the rate limit) and those a body or a query brings (400, 413) are added
there, so a declaration lists only what its handler itself answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

Handler = TypeVar("Handler", bound=Callable[[web.Request], Awaitable[web.StreamResponse]])


@dataclass(frozen=True)
class Reply:
    """One answer: a JSON body of ``model``, and/or bodies of other ``media`` types (text)."""

    description: str
    model: type[BaseModel] | None = None
    media: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    operation_id: str
    summary: str
    replies: Mapping[int, Reply]
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[Any] | None = None  # a NamedTuple of whole numbers (validation.read_query)
    errors: Mapping[int, str] = field(default_factory=dict)  # status: when (an Error body)


def operation(
    operation_id: str,
    summary: str,
    *,
    replies: Mapping[int, Reply],
    body: type[BaseModel] | None = None,
    body_required: bool = True,
    query: type[Any] | None = None,
    errors: Mapping[int, str] | None = None,
) -> Callable[[Handler], Handler]:
    def declare(handler: Handler) -> Handler:
        handler.operation = Operation(  # type: ignore[attr-defined]
            operation_id, summary, replies, body, body_required, query, errors or {}
        )
        return handler

    return declare


def operation_of(handler: object) -> Operation:
    """The declaration of a handler (kept by wrappers made with functools.wraps)."""
    declared = getattr(handler, "operation", None)
    if not isinstance(declared, Operation):
        raise LookupError(f"{handler!r} has no @operation declaration")
    return declared
