"""The HTTP API under /api/v1: conversations, messages, persona, tokens.

Handlers read the request with its model, call a store or the chat service, and shape the
answer with its model (models.py); they never touch SQL or the SDK. Each declares what it
reads and answers with ``@operation``, from which openapi.py describes the API. Scopes are
enforced by :func:`requires`, applied in the route table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any

from aiohttp import web

from .. import models
from ..chat import BudgetExhausted, PersonaMissing, Turn
from ..conversations import Conversation, Message
from ..errors import ApiError, retry_after_header
from ..keys import CHAT, CONVERSATIONS, OPENAPI, PERSONAS, REQUEST_TOKEN, SETTINGS, TOKENS
from ..llm import ClaudeRejected, ClaudeUnavailable, TextDelta
from ..operations import Reply, operation
from ..persona import PersonaError, build_prompt, document_sha256, persona_from_document
from ..tokens import TokenError, TokenInfo
from ..validation import json_object, read_body, read_query

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requires(scope: str) -> Callable[[Handler], Handler]:
    """Let the request through only with a bearer token that allows ``scope``."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = request[REQUEST_TOKEN]
            if token is None:
                raise ApiError(
                    401,
                    "unauthorized",
                    "send 'Authorization: Bearer <token>'; an admin creates one "
                    "with `digitalme token create --name NAME --scope chat`",
                    headers={"WWW-Authenticate": 'Bearer realm="digitalme"'},
                )
            if not token.allows(scope):
                raise ApiError(
                    403, "forbidden", f"this token's scope is '{token.scope}'; this needs '{scope}'"
                )
            return await handler(request)

        guarded.required_scope = scope  # type: ignore[attr-defined]
        return guarded

    return decorate


def _answer(
    answer: models.Answer, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(answer.to_json(), status=status, headers=headers)


def _token(request: web.Request) -> TokenInfo:
    token = request[REQUEST_TOKEN]
    assert token is not None  # routes that call this are guarded by requires()
    return token


# --- conversations ------------------------------------------------------------------------


async def _conversation(request: web.Request) -> Conversation:
    """The conversation in the URL, if this token may see it (else 404, to not leak ids)."""
    conversation_id = request.match_info["conversation_id"]
    return _visible(request, conversation_id, await request.app[CONVERSATIONS].get(conversation_id))


def _visible(
    request: web.Request, conversation_id: str, conversation: Conversation | None
) -> Conversation:
    token = _token(request)
    if conversation is None or (token.scope != "admin" and conversation.token_id != token.id):
        raise ApiError(
            404, "conversation_not_found", f"no conversation {conversation_id!r} for this token"
        )
    return conversation


_NO_CONVERSATION = {404: "No such conversation for this token."}


@operation(
    "createConversation",
    "Start a conversation.",
    body=models.NewConversation,
    body_required=False,
    replies={201: Reply("Created.", models.Conversation)},
)
async def create_conversation(request: web.Request) -> web.Response:
    body = await read_body(request, models.NewConversation, optional=True)
    conversation = await request.app[CONVERSATIONS].create(
        "api", title=body.title, token_id=_token(request).id
    )
    return _answer(
        models.Conversation.model_validate(conversation),
        status=201,
        headers={"Location": f"/api/v1/conversations/{conversation.id}"},
    )


@operation(
    "listConversations",
    "Conversations of this token (all of them for admin), newest first.",
    query=models.ConversationsQuery,
    replies={200: Reply("The conversations.", models.ConversationList)},
)
async def list_conversations(request: web.Request) -> web.Response:
    query = read_query(request, models.ConversationsQuery)
    token = _token(request)
    conversations = await request.app[CONVERSATIONS].list_for(
        token_id=None if token.scope == "admin" else token.id, limit=query.limit
    )
    return _answer(
        models.ConversationList(
            conversations=[models.Conversation.model_validate(c) for c in conversations]
        )
    )


@operation(
    "getConversation",
    "One conversation.",
    errors=_NO_CONVERSATION,
    replies={200: Reply("The conversation.", models.Conversation)},
)
async def get_conversation(request: web.Request) -> web.Response:
    return _answer(models.Conversation.model_validate(await _conversation(request)))


@operation(
    "listMessages",
    "Messages, oldest first (the latest `limit`, or those before message id `before`).",
    query=models.MessagesQuery,
    errors=_NO_CONVERSATION,
    replies={200: Reply("The messages.", models.MessageList)},
)
async def list_messages(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    store = request.app[CONVERSATIONS]
    found = await store.get_with_newest(conversation_id)
    conversation = _visible(request, conversation_id, found[0] if found else None)
    query = read_query(request, models.MessagesQuery)
    # models.MessageList, rendered by SQLite (conversations.py; a test holds them equal)
    messages = await store.messages_json(
        conversation.id,
        limit=query.limit,
        before_id=query.before,
        newest=found[1] if found else None,
    )
    return web.Response(text=f'{{"messages": {messages}}}', content_type="application/json")


def _chat_error(exc: Exception) -> ApiError:
    if isinstance(exc, ClaudeUnavailable):
        return ApiError(503, exc.code, str(exc), headers=retry_after_header(exc.retry_after))
    if isinstance(exc, BudgetExhausted):
        return ApiError(
            429,
            "daily_budget_exhausted",
            "the clone has used its token budget for today; it will answer "
            "again after midnight UTC",
            headers=retry_after_header(exc.retry_after),
        )
    if isinstance(exc, PersonaMissing):
        return ApiError(503, "persona_missing", str(exc))
    if isinstance(exc, ClaudeRejected):
        return ApiError(
            502,
            "claude_rejected",
            "the language model refused this request; the owner has been told "
            "(see the service log)",
        )
    raise exc


_CHAT_ERRORS = (ClaudeUnavailable, BudgetExhausted, PersonaMissing, ClaudeRejected)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


_STREAM = "text/event-stream"


@operation(
    "postMessage",
    "Say something; the clone answers. With `Accept: text/event-stream` the "
    "reply streams as server-sent events: `message` (your stored message), `delta` ({text}) "
    "as it is written, then `done` ({reply}) or `error` ({error, message}).",
    body=models.NewMessage,
    replies={
        201: Reply(
            "Both stored messages (or an event stream).", models.MessageAndReply, media=(_STREAM,)
        ),
        200: Reply("The event stream.", media=(_STREAM,)),
    },
    errors={
        400: "Malformed body or message too long.",
        **_NO_CONVERSATION,
        502: "The language model refused the request.",
        503: "Claude or the persona is unavailable; see Retry-After.",
    },
)
async def post_message(request: web.Request) -> web.StreamResponse:
    conversation = await _conversation(request)
    body = await read_body(
        request, models.NewMessage, context={"max_chars": request.app[SETTINGS].max_message_chars}
    )
    chat = request.app[CHAT]
    wants_stream = _STREAM in request.headers.get("Accept", "")
    turn = chat.detached(chat.stream_reply(conversation, body.text, deltas=wants_stream))
    if not wants_stream:
        final: Turn | None = None
        try:
            async for item in turn:
                if isinstance(item, Turn):
                    final = item
        except _CHAT_ERRORS as exc:
            raise _chat_error(exc) from None
        assert final is not None
        return _answer(
            models.MessageAndReply(
                message=models.UserMessage.model_validate(final.user),
                reply=models.AssistantMessage.of(final.reply),
            ),
            status=201,
        )
    return await _stream_turn(request, turn)


async def _stream_turn(
    request: web.Request, turn: AsyncIterator[TextDelta | Message | Turn]
) -> web.StreamResponse:
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
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)

    async def send(item: TextDelta | Message | Turn) -> None:
        if isinstance(item, Message):
            await response.write(_sse("message", models.message_answer(item).to_json()))
        elif isinstance(item, TextDelta):
            await response.write(_sse("delta", {"text": item.text}))
        else:
            await response.write(
                _sse("done", {"reply": models.AssistantMessage.of(item.reply).to_json()})
            )

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


_NO_PERSONA = {404: "No persona imported yet."}


@operation(
    "getPersona",
    "The persona.",
    errors=_NO_PERSONA,
    replies={200: Reply("The persona.", models.ImportedPersona)},
)
async def get_persona(request: web.Request) -> web.Response:
    stored = await request.app[PERSONAS].load()
    if stored is None:
        raise ApiError(
            404,
            "persona_missing",
            "no persona has been imported yet: PUT one here or run `digitalme persona import FILE`",
        )
    return _answer(models.ImportedPersona.model_validate(stored))


@operation(
    "putPersona",
    "Replace the persona.",
    body=models.Persona,
    errors={400: "Invalid persona; the message says where."},
    replies={200: Reply("The stored persona.", models.ImportedPersona)},
)
async def put_persona(request: web.Request) -> web.Response:
    # Not read_body: the persona importer's own messages (persona.py) name the problem.
    body = await json_object(request)
    try:
        persona = persona_from_document(body)
    except PersonaError as exc:
        raise ApiError(400, "invalid_persona", str(exc)) from None
    stored = await request.app[PERSONAS].save(persona, document_sha256(body))
    return _answer(models.ImportedPersona.model_validate(stored))


@operation(
    "getPersonaPrompt",
    "The system prompt built from the persona.",
    errors=_NO_PERSONA,
    replies={200: Reply("The prompt.", media=("text/plain",))},
)
async def get_persona_prompt(request: web.Request) -> web.Response:
    stored = await request.app[PERSONAS].load()
    if stored is None:
        raise ApiError(404, "persona_missing", "no persona has been imported yet")
    return web.Response(text=build_prompt(stored.persona), content_type="text/plain")


# --- tokens -------------------------------------------------------------------------------


@operation("listTokens", "All tokens.", replies={200: Reply("The tokens.", models.TokenList)})
async def list_tokens(request: web.Request) -> web.Response:
    tokens = await request.app[TOKENS].all()
    return _answer(models.TokenList(tokens=[models.Token.model_validate(t) for t in tokens]))


@operation(
    "createToken",
    "Create a token; its secret is in this answer only.",
    body=models.NewToken,
    replies={201: Reply("Created.", models.CreatedToken)},
)
async def create_token(request: web.Request) -> web.Response:
    body = await read_body(request, models.NewToken)
    try:
        secret, info = await request.app[TOKENS].create(body.name, body.scope)
    except TokenError as exc:
        raise ApiError(400, "invalid_field", str(exc)) from None
    created = models.Token.model_validate(info)
    return _answer(models.CreatedToken(**created.model_dump(), token=secret), status=201)


@operation(
    "revokeToken",
    "Revoke a token.",
    errors={404: "No such token."},
    replies={200: Reply("The revoked token.", models.Token)},
)
async def revoke_token(request: web.Request) -> web.Response:
    raw = request.match_info["token_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, "token_not_found", f"no token {raw!r}")
    info = await request.app[TOKENS].revoke(int(raw))
    if info is None:
        raise ApiError(404, "token_not_found", f"no token {raw}")
    return _answer(models.Token.model_validate(info))


@operation(
    "getMe",
    "This token, and the name of the clone it talks to.",
    replies={200: Reply("Token and clone.", models.Me)},
)
async def me(request: web.Request) -> web.Response:
    """Who this token is, and whom it talks to (the web chat's header)."""
    stored = await request.app[PERSONAS].load()
    token = _token(request)
    return _answer(
        models.Me(
            token=models.TokenIdentity.model_validate(token),
            clone=models.Clone(
                name=stored.persona.name if stored else None,
                languages=list(stored.persona.languages) if stored else [],
            ),
        )
    )


# --- the API's description ----------------------------------------------------------------


@operation(
    "getOpenApi", "This document.", replies={200: Reply("The OpenAPI document.", models.Document)}
)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
