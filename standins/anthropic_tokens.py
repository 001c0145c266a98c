"""Token counts as the Anthropic stand-in (anthropic_api.py) reports them: an estimate
with the same structure as the API's (per message, block, image, cache breakpoint), and the
default reply's text."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def estimate_tokens(text: str) -> int:
    """About four characters a token; at least one for non-empty text."""
    return math.ceil(len(text) / 4) if text else 0


BASE_OVERHEAD = 4
MESSAGE_OVERHEAD = 3
IMAGE_TOKENS = 1500
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


@dataclass
class _Unit:
    tokens: int
    material: str
    cache_control: Mapping[str, Any] | None


def canonical_json(obj: Any) -> str:
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "cache_control"}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return estimate_tokens(block)
    if isinstance(block, dict):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            return estimate_tokens(block["text"])
        if kind == "image":
            return IMAGE_TOKENS
        if kind == "tool_result":
            content = block.get("content")
            inner = (
                sum(_block_tokens(b) for b in content)
                if isinstance(content, list)
                else _block_tokens(content or "")
            )
            return inner + 5
    return estimate_tokens(canonical_json(block))


def token_units(body: Mapping[str, Any]) -> list[_Unit]:
    units: list[_Unit] = []
    for tool in body.get("tools") or []:
        units.append(
            _Unit(
                estimate_tokens(canonical_json(tool)),
                "tool:" + canonical_json(tool),
                tool.get("cache_control"),
            )
        )
    system = body.get("system")
    if isinstance(system, str) and system:
        units.append(_Unit(estimate_tokens(system), "system:" + system, None))
    elif isinstance(system, list):
        for block in system:
            units.append(
                _Unit(
                    _block_tokens(block),
                    "system:" + canonical_json(block),
                    block.get("cache_control"),
                )
            )
    first_message_unit = len(units)
    for message in body.get("messages") or []:
        role = message.get("role")
        content = message.get("content")
        blocks = [content] if isinstance(content, str) else list(content or [])
        if not blocks:
            units.append(_Unit(MESSAGE_OVERHEAD, f"{role}:", None))
        for j, block in enumerate(blocks):
            overhead = MESSAGE_OVERHEAD if j == 0 else 0
            cache_control = block.get("cache_control") if isinstance(block, dict) else None
            units.append(
                _Unit(
                    _block_tokens(block) + overhead,
                    f"{role}:" + canonical_json(block),
                    cache_control,
                )
            )
    top = body.get("cache_control")
    if isinstance(top, dict) and len(units) > first_message_unit:
        last = units[-1]
        if last.cache_control is None:
            last.cache_control = top
    return units


def count_input_tokens(body: Mapping[str, Any]) -> int:
    return BASE_OVERHEAD + sum(u.tokens for u in token_units(body))


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(
        b["text"]
        for b in content
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    )


def default_reply_text(body: Mapping[str, Any]) -> str:
    """The text the stand-in answers with when the script does not say otherwise."""
    last_user: Any = None
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            last_user = message.get("content")
    text = text_of(last_user)
    if not text and isinstance(last_user, list):
        text = "\n".join(
            text_of(b.get("content"))
            for b in last_user
            if isinstance(b, dict) and b.get("type") == "tool_result"
        )
    return f"Stand-in reply to: {text[:200]}"
