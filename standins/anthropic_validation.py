"""The Anthropic stand-in's checks of a Messages request (anthropic_api.py): fields, roles
and their alternation, content blocks, tool use and results paired, cache_control, tools,
as the API refuses them (400 invalid_request_error naming the field)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from standins.anthropic_tokens import TTL_SECONDS, text_of

MESSAGES_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "cache_control",
        "diagnostics",
        "inference_geo",
        "output_config",
        "speed",
    }
)
COUNT_TOKENS_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "cache_control",
        "output_config",
        "speed",
    }
)
BLOCK_TYPES = (
    "text",
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "container_upload",
)
ASSISTANT_ONLY = frozenset({"tool_use", "thinking", "redacted_thinking", "server_tool_use"})
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class Invalid(Exception):
    pass


def _check_cache_control(value: Any, path: str, breakpoints: list[int]) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        raise Invalid(f"{path}.cache_control.type: Input should be 'ephemeral'")
    if "ttl" in value and value["ttl"] not in TTL_SECONDS:
        raise Invalid(f"{path}.cache_control.ttl: Input should be '5m' or '1h'")
    extra = set(value) - {"type", "ttl"}
    if extra:
        raise Invalid(f"{path}.cache_control.{sorted(extra)[0]}: Extra inputs are not permitted")
    breakpoints.append(1)


def _check_text_block(block: Any, path: str, breakpoints: list[int]) -> None:
    if not isinstance(block, dict):
        raise Invalid(f"{path}: Input should be a valid dictionary or object")
    if block.get("type") != "text":
        raise Invalid(f"{path}.type: Input should be 'text'")
    if not isinstance(block.get("text"), str):
        raise Invalid(
            f"{path}.text: Field required"
            if "text" not in block
            else f"{path}.text: Input should be a valid string"
        )
    if not block["text"].strip():
        where = path.split(".")[0]
        raise Invalid(f"{where}: text content blocks must contain non-whitespace text")
    _check_cache_control(block.get("cache_control"), path, breakpoints)


def _check_block(
    block: Any, role: str, path: str, breakpoints: list[int], allow_empty_text: bool
) -> None:
    if not isinstance(block, dict):
        raise Invalid(f"{path}: Input should be a valid dictionary or object")
    kind = block.get("type")
    if kind not in BLOCK_TYPES:
        expected = ", ".join(f"'{t}'" for t in BLOCK_TYPES)
        raise Invalid(
            f"{path}: Input tag '{kind}' found using 'type' does not match any of "
            f"the expected tags: {expected}"
        )
    if role == "user" and kind in ASSISTANT_ONLY:
        raise Invalid(f"{path}: `{kind}` blocks can only be in `assistant` messages")
    if role == "assistant" and kind == "tool_result":
        raise Invalid(f"{path}: `tool_result` blocks can only be in `user` messages")
    _check_cache_control(block.get("cache_control"), path, breakpoints)
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise Invalid(f"{path}.text: Field required")
        if not block["text"].strip() and not allow_empty_text:
            raise Invalid("messages: text content blocks must contain non-whitespace text")
    elif kind in ("image", "document"):
        source = block.get("source")
        if not isinstance(source, dict) or not isinstance(source.get("type"), str):
            raise Invalid(f"{path}.source: Field required")
    elif kind == "tool_use":
        for key, typ, name in (
            ("id", str, "string"),
            ("name", str, "string"),
            ("input", dict, "dictionary"),
        ):
            if not isinstance(block.get(key), typ):
                raise Invalid(f"{path}.{key}: Input should be a valid {name}")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise Invalid(f"{path}.tool_use_id: Field required")
        content = block.get("content")
        if content is not None and not isinstance(content, str | list):
            raise Invalid(f"{path}.content: Input should be a valid string or list")
        if isinstance(content, list):
            for k, inner in enumerate(content):
                _check_block(inner, "user", f"{path}.content.{k}", breakpoints, True)
        if "is_error" in block and not isinstance(block["is_error"], bool):
            raise Invalid(f"{path}.is_error: Input should be a valid boolean")
    elif kind == "thinking":
        if not isinstance(block.get("thinking"), str) or not isinstance(
            block.get("signature"), str
        ):
            raise Invalid(f"{path}: thinking blocks need `thinking` and `signature` strings")


def _check_messages(
    body: Mapping[str, Any], strict_alternation: bool, breakpoints: list[int]
) -> None:
    if "messages" not in body:
        raise Invalid("messages: Field required")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise Invalid("messages: Input should be a valid list")
    if not messages:
        raise Invalid("messages: at least one message is required")
    turns: list[tuple[str, list[tuple[int, int, dict[str, Any]]]]] = []  # merged turns
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        if not isinstance(message, dict):
            raise Invalid(f"{path}: Input should be a valid dictionary or object")
        extra = set(message) - {"role", "content"}
        if extra:
            raise Invalid(f"{path}.{sorted(extra)[0]}: Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise Invalid(f"{path}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise Invalid(f"{path}.content: Field required")
        content = message["content"]
        is_last = i == len(messages) - 1
        final_assistant = is_last and role == "assistant"
        if role == "system":
            if isinstance(content, str):
                if not content.strip():
                    raise Invalid("messages: text content blocks must contain non-whitespace text")
            elif isinstance(content, list) and content:
                for j, block in enumerate(content):
                    _check_text_block(block, f"{path}.content.{j}", breakpoints)
            else:
                raise Invalid(
                    f"{path}.content: Input should be a valid string or list of text blocks"
                )
            continue
        if isinstance(content, str):
            if not content.strip() and not final_assistant:
                raise Invalid("messages: text content blocks must contain non-whitespace text")
            blocks: list[Any] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            if not content and not final_assistant:
                raise Invalid(
                    f"{path}: all messages must have non-empty content except for "
                    "the optional final assistant message"
                )
            blocks = content
            for j, block in enumerate(content):
                _check_block(block, role, f"{path}.content.{j}", breakpoints, final_assistant)
        else:
            raise Invalid(f"{path}.content: Input should be a valid string or list")
        if final_assistant:
            tail = text_of(content) if isinstance(content, list) else content
            if tail and tail != tail.rstrip():
                raise Invalid(
                    "messages: final assistant content cannot end with trailing whitespace"
                )
        indexed = [(i, j, b) for j, b in enumerate(blocks)]
        if not turns:
            if role != "user" and strict_alternation:
                raise Invalid('messages: first message must use the "user" role')
            turns.append((role, indexed))
        elif turns[-1][0] == role:
            if strict_alternation:
                raise Invalid(
                    'messages: roles must alternate between "user" and "assistant", '
                    f'but found multiple "{role}" roles in a row'
                )
            turns[-1][1].extend(indexed)
        else:
            turns.append((role, indexed))
    _check_tool_pairing(turns)


def _check_tool_pairing(turns: list[tuple[str, list[tuple[int, int, dict[str, Any]]]]]) -> None:
    seen_ids: set[str] = set()
    for t, (role, blocks) in enumerate(turns):
        if role == "assistant":
            ids = [b["id"] for _, _, b in blocks if b.get("type") == "tool_use"]
            for tool_id in ids:
                if tool_id in seen_ids:
                    raise Invalid(f"messages: `tool_use` ids must be unique: {tool_id}")
                seen_ids.add(tool_id)
            if ids and t + 1 < len(turns):
                answered = {
                    b.get("tool_use_id")
                    for _, _, b in turns[t + 1][1]
                    if b.get("type") == "tool_result"
                }
                missing = [x for x in ids if x not in answered]
                if missing:
                    first = turns[t + 1][1][0][0]
                    raise Invalid(
                        f"messages.{first}: `tool_use` ids were found without `tool_result` "
                        f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block "
                        "must have a corresponding `tool_result` block in the next message."
                    )
        else:
            previous: set[str] = set()
            if t > 0 and turns[t - 1][0] == "assistant":
                previous = {b["id"] for _, _, b in turns[t - 1][1] if b.get("type") == "tool_use"}
            seen_other = False
            for i, j, b in blocks:
                if b.get("type") != "tool_result":
                    seen_other = True
                    continue
                if b["tool_use_id"] not in previous:
                    raise Invalid(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {b['tool_use_id']}. Each `tool_result` block "
                        "must have a corresponding `tool_use` block in the previous message."
                    )
                if seen_other:
                    raise Invalid(
                        f"messages.{i}.content.{j}: `tool_result` blocks must come "
                        "first in the content of a `user` message, before any other "
                        "content"
                    )


def _check_system(body: Mapping[str, Any], breakpoints: list[int]) -> None:
    if "system" not in body:
        return
    system = body["system"]
    if isinstance(system, str):
        return
    if not isinstance(system, list):
        raise Invalid("system: Input should be a valid string or a list of text blocks")
    for k, block in enumerate(system):
        _check_text_block(block, f"system.{k}", breakpoints)


def _check_tools(body: Mapping[str, Any], breakpoints: list[int]) -> set[str]:
    names: set[str] = set()
    if "tools" in body:
        tools = body["tools"]
        if not isinstance(tools, list):
            raise Invalid("tools: Input should be a valid list")
        for k, tool in enumerate(tools):
            path = f"tools.{k}"
            if not isinstance(tool, dict):
                raise Invalid(f"{path}: Input should be a valid dictionary or object")
            name = tool.get("name")
            if not isinstance(name, str):
                raise Invalid(f"{path}.name: Field required")
            kind = tool.get("type")
            if kind in (None, "custom"):
                if not TOOL_NAME.match(name):
                    raise Invalid(
                        f"{path}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                    )
                schema = tool.get("input_schema")
                if not isinstance(schema, dict):
                    raise Invalid(f"{path}.custom.input_schema: Field required")
                if schema.get("type") != "object":
                    raise Invalid(f"{path}.custom.input_schema.type: Input should be 'object'")
                if "description" in tool and not isinstance(tool["description"], str):
                    raise Invalid(f"{path}.custom.description: Input should be a valid string")
            if name in names:
                raise Invalid("tools: Tool names must be unique.")
            names.add(name)
            _check_cache_control(tool.get("cache_control"), path, breakpoints)
    if "tool_choice" in body:
        choice = body["tool_choice"]
        if not isinstance(choice, dict) or choice.get("type") not in (
            "auto",
            "any",
            "tool",
            "none",
        ):
            raise Invalid(
                "tool_choice: Input tag found using 'type' does not match any of the "
                "expected tags: 'auto', 'any', 'tool', 'none'"
            )
        if choice["type"] in ("any", "tool") and not names:
            raise Invalid("tool_choice: may only be specified while providing tools")
        if choice["type"] == "tool" and choice.get("name") not in names:
            raise Invalid(f"tool_choice.name: tool '{choice.get('name')}' not found in tools")
    return names


def _check_common(body: Any, allowed: frozenset[str] | None) -> None:
    if not isinstance(body, dict):
        raise Invalid("Input should be a valid dictionary or object")
    if allowed is not None:
        extra = sorted(set(body) - allowed)
        if extra:
            raise Invalid(f"{extra[0]}: Extra inputs are not permitted")
    model = body.get("model")
    if "model" not in body:
        raise Invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise Invalid("model: Input should be a valid string")


def validate_messages_request(
    body: Any,
    *,
    strict_alternation: bool = True,
    strict_fields: bool = True,
    count_tokens: bool = False,
) -> tuple[str | None, set[str]]:
    """Validate a request body. Returns (error message or None, declared tool names)."""
    fields = COUNT_TOKENS_FIELDS if count_tokens else MESSAGES_FIELDS
    breakpoints: list[int] = []
    try:
        _check_common(body, fields if strict_fields else None)
        if not count_tokens:
            if "max_tokens" not in body:
                raise Invalid("max_tokens: Field required")
            mt = body["max_tokens"]
            if isinstance(mt, bool) or not isinstance(mt, int):
                raise Invalid("max_tokens: Input should be a valid integer")
            if mt < 0:
                raise Invalid("max_tokens: Input should be greater than or equal to 0")
            if "stream" in body and not isinstance(body["stream"], bool):
                raise Invalid("stream: Input should be a valid boolean")
            stops = body.get("stop_sequences")
            if stops is not None and (
                not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            ):
                raise Invalid("stop_sequences: Input should be a list of non-empty strings")
            for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
                if name in body:
                    value = body[name]
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise Invalid(f"{name}: Input should be a valid number")
                    if not low <= value <= high:
                        raise Invalid(f"{name}: range: {low}-{high}")
            if "metadata" in body:
                meta = body["metadata"]
                if not isinstance(meta, dict) or set(meta) - {"user_id"}:
                    raise Invalid("metadata: only `user_id` is permitted")
        _check_system(body, breakpoints)
        names = _check_tools(body, breakpoints)
        _check_messages(body, strict_alternation, breakpoints)
        top = body.get("cache_control")
        if top is not None:
            _check_cache_control(top, "cache_control", breakpoints)
        if len(breakpoints) > 4:
            raise Invalid(
                "A maximum of 4 blocks with cache_control may be provided. "
                f"Found {len(breakpoints)}."
            )
    except Invalid as exc:
        return str(exc), set()
    return None, names
