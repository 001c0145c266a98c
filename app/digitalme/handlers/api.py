"""The HTTP API under /api/v1: conversations, messages, persona, tokens.

Handlers parse and check the request, call a store or the chat service, and shape the
answer; they never touch SQL or the SDK. Scopes are enforced by :func:`requires`, applied
in the route table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any

from aiohttp import web

from ..chat import BudgetExhausted, PersonaMissing, Turn
from ..conversations import Conversation, Message
from ..errors import ApiError, retry_after_header
from ..keys import CHAT, CONVERSATIONS, PERSONAS, REQUEST_TOKEN, SETTINGS, TOKENS
from ..llm import ClaudeRejected, ClaudeUnavailable, TextDelta
from ..openapi import openapi_document
from ..persona import PersonaError, build_prompt, document_sha256, persona_from_document
from ..tokens import SCOPES, TokenError, TokenInfo
from ..validation import choice_field, int_param, json_object, text_field

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requires(scope: str) -> Callable[[Handler], Handler]:
    """Let the request through only with a bearer token that allows ``scope``."""
    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = request[REQUEST_TOKEN]
            if token is None:
                raise ApiError(401, "unauthorized",
                               "send 'Authorization: Bearer <token>'; an admin creates one "
                               "with `digitalme token create --name NAME --scope chat`",
                               headers={"WWW-Authenticate": 'Bearer realm="digitalme"'})
            if not token.allows(scope):
                raise ApiError(403, "forbidden",
                               f"this token's scope is '{token.scope}'; this needs '{scope}'")
            return await handler(request)
        guarded.required_scope = scope  # type: ignore[attr-defined]
        return guarded
    return decorate


def _token(request: web.Request) -> TokenInfo:
    token = request[REQUEST_TOKEN]
    assert token is not None  # routes that call this are guarded by requires()
    return token


# --- conversations ------------------------------------------------------------------------


async def _conversation(request: web.Request) -> Conversation:
    """The conversation in the URL, if this token may see it (else 404, to not leak ids)."""
    conversation_id = request.match_info["conversation_id"]
    conversation = await request.app[CONVERSATIONS].get(conversation_id)
    token = _token(request)
    if conversation is None or (token.scope != "admin" and conversation.token_id != token.id):
        raise ApiError(404, "conversation_not_found",
                       f"no conversation {conversation_id!r} for this token")
    return conversation


async def create_conversation(request: web.Request) -> web.Response:
    body = await json_object(request, optional=True)
    title = text_field(body, "title", required=False, max_length=200)
    conversation = await request.app[CONVERSATIONS].create(
        "api", title=title, token_id=_token(request).id)
    return web.json_response(conversation.to_json(), status=201,
                             headers={"Location": f"/api/v1/conversations/{conversation.id}"})


async def list_conversations(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 50, 1, 500)
    token = _token(request)
    conversations = await request.app[CONVERSATIONS].list_for(
        token_id=None if token.scope == "admin" else token.id, limit=limit)
    return web.json_response({"conversations": [c.to_json() for c in conversations]})


async def get_conversation(request: web.Request) -> web.Response:
    return web.json_response((await _conversation(request)).to_json())


async def list_messages(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    limit = int_param(request, "limit", 100, 1, 1000)
    before = int_param(request, "before", 2**62, 1, 2**62)
    messages = await request.app[CONVERSATIONS].messages_json(
        conversation.id, limit=limit, before_id=before)
    return web.Response(text=f'{{"messages": {messages}}}', content_type="application/json")


def _chat_error(exc: Exception) -> ApiError:
    if isinstance(exc, ClaudeUnavailable):
        return ApiError(503, exc.code, str(exc), headers=retry_after_header(exc.retry_after))
    if isinstance(exc, BudgetExhausted):
        return ApiError(429, "daily_budget_exhausted",
                        "the clone has used its token budget for today; it will answer "
                        "again after midnight UTC", headers=retry_after_header(exc.retry_after))
    if isinstance(exc, PersonaMissing):
        return ApiError(503, "persona_missing", str(exc))
    if isinstance(exc, ClaudeRejected):
        return ApiError(502, "claude_rejected",
                        "the language model refused this request; the owner has been told "
                        "(see the service log)")
    raise exc


_CHAT_ERRORS = (ClaudeUnavailable, BudgetExhausted, PersonaMissing, ClaudeRejected)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def post_message(request: web.Request) -> web.StreamResponse:
    conversation = await _conversation(request)
    body = await json_object(request)
    text = text_field(body, "text", max_length=request.app[SETTINGS].max_message_chars)
    assert text is not None
    chat = request.app[CHAT]
    wants_stream = "text/event-stream" in request.headers.get("Accept", "")
    turn = chat.detached(chat.stream_reply(conversation, text, deltas=wants_stream))
    if not wants_stream:
        final: Turn | None = None
        try:
            async for item in turn:
                if isinstance(item, Turn):
                    final = item
        except _CHAT_ERRORS as exc:
            raise _chat_error(exc) from None
        assert final is not None
        return web.json_response({"message": final.user.to_json(),
                                  "reply": final.reply.to_json()}, status=201)
    return await _stream_turn(request, turn)


async def _stream_turn(request: web.Request,
                       turn: AsyncIterator[TextDelta | Message | Turn]) -> web.StreamResponse:
    """Server-sent events: ``message`` (the stored user message), ``delta`` (text as it
    comes), then ``done`` (the stored reply) or ``error``.

    Nothing is sent until Claude has started answering, so a failure to reach it is still
    an ordinary JSON error with its status code.
    """
    pending: list[TextDelta | Message | Turn] = []
    try:
        async for item in turn:
            pending.append(item)
            if not isinstance(item, Message):
                break
    except _CHAT_ERRORS as exc:
        raise _chat_error(exc) from None
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(item: TextDelta | Message | Turn) -> None:
        if isinstance(item, Message):
            await response.write(_sse("message", item.to_json()))
        elif isinstance(item, TextDelta):
            await response.write(_sse("delta", {"text": item.text}))
        else:
            await response.write(_sse("done", {"reply": item.reply.to_json()}))

    try:
        for item in pending:
            await send(item)
        async for item in turn:
            await send(item)
    except _CHAT_ERRORS as exc:
        error = _chat_error(exc)
        await response.write(_sse("error", {"error": error.code, "message": error.message}))
    except ConnectionResetError:
        log.info("client left during a streamed reply; it is still stored when done")
    await response.write_eof()
    return response


# --- persona ------------------------------------------------------------------------------


async def get_persona(request: web.Request) -> web.Response:
    stored = await request.app[PERSONAS].load()
    if stored is None:
        raise ApiError(404, "persona_missing",
                       "no persona has been imported yet: PUT one here or run "
                       "`digitalme persona import FILE`")
    return web.json_response({"persona": stored.persona.to_document(),
                              "source_sha256": stored.source_sha256,
                              "imported_at": stored.imported_at})


async def put_persona(request: web.Request) -> web.Response:
    body = await json_object(request)
    try:
        persona = persona_from_document(body)
    except PersonaError as exc:
        raise ApiError(400, "invalid_persona", str(exc)) from None
    stored = await request.app[PERSONAS].save(persona, document_sha256(body))
    return web.json_response({"persona": stored.persona.to_document(),
                              "source_sha256": stored.source_sha256,
                              "imported_at": stored.imported_at})


async def get_persona_prompt(request: web.Request) -> web.Response:
    stored = await request.app[PERSONAS].load()
    if stored is None:
        raise ApiError(404, "persona_missing", "no persona has been imported yet")
    return web.Response(text=build_prompt(stored.persona), content_type="text/plain")


# --- tokens -------------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await request.app[TOKENS].all()
    return web.json_response({"tokens": [t.to_json() for t in tokens]})


async def create_token(request: web.Request) -> web.Response:
    body = await json_object(request)
    name = text_field(body, "name", max_length=100)
    scope = choice_field(body, "scope", SCOPES)
    assert name is not None
    try:
        secret, info = await request.app[TOKENS].create(name, scope)
    except TokenError as exc:
        raise ApiError(400, "invalid_field", str(exc)) from None
    return web.json_response({**info.to_json(), "token": secret}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    raw = request.match_info["token_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, "token_not_found", f"no token {raw!r}")
    info = await request.app[TOKENS].revoke(int(raw))
    if info is None:
        raise ApiError(404, "token_not_found", f"no token {raw}")
    return web.json_response(info.to_json())


async def me(request: web.Request) -> web.Response:
    """Who this token is, and whom it talks to (the web chat's header)."""
    stored = await request.app[PERSONAS].load()
    token = _token(request)
    return web.json_response({
        "token": {"id": token.id, "name": token.name, "scope": token.scope},
        "clone": {"name": stored.persona.name if stored else None,
                  "languages": list(stored.persona.languages) if stored else []},
    })


# --- the API's description ----------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())
