"""Whether a JSON value has the shape a TypedDict declares (the keys it requires, no wrong
types), for contracts between a program and its reader that are written as TypedDicts in
the app (e.g. :class:`digitalme.backup.DrillResult`). JSON's types only: bool, int, float,
str, None, lists, dicts and unions of them."""

from __future__ import annotations

import types
import typing
from typing import Any


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _fits(k, key) and _fits(v, item) for k, v in value.items()
        )
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    return isinstance(value, hint)


def shape_problems(value: Any, typed_dict: type) -> list[str]:
    """What in ``value`` does not fit ``typed_dict`` ([] when it fits); extra keys are fine."""
    if not isinstance(value, dict):
        return [f"not an object: {type(value).__name__}"]
    hints = typing.get_type_hints(typed_dict)
    required: frozenset[str] = typed_dict.__required_keys__  # type: ignore[attr-defined]
    problems = [f"{name}: missing" for name in sorted(required) if name not in value]
    problems += [
        f"{name}: {value[name]!r} is not {hint}"
        for name, hint in hints.items()
        if name in value and not _fits(value[name], hint)
    ]
    return problems
