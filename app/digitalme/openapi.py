"""The OpenAPI 3.1 description of /api/v1, served at /api/v1/openapi.json.

A test checks that every route in the router is described here and the other way round.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from . import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_AUTH_ERRORS = {
    "401": _error("No or invalid bearer token."),
    "403": _error("The token's scope does not allow this."),
    "429": _error("Rate limit exceeded; see Retry-After."),
}

_CONVERSATION_ID = {
    "name": "conversation_id", "in": "path", "required": True,
    "schema": {"type": "string", "maxLength": 64},
}

# Texts the persona importer accepts: at least one non-blank character (it strips them).
_TEXT = {"type": "string", "pattern": "\\S"}
# A list of texts; YAML's convenience of a single text for a one-item list holds here too,
# and null (like leaving the field out) means none.
_TEXTS = {"oneOf": [_TEXT, {"type": "array", "items": _TEXT}, {"type": "null"}]}
_OPTIONAL_TEXT = {"type": ["string", "null"]}

_TRAIT = {
    "type": "object",
    "required": ["category", "name", "weight"],
    "additionalProperties": False,
    "properties": {
        "category": _TEXT,
        "name": _TEXT,
        "description": _OPTIONAL_TEXT,
        "weight": {"type": "number", "minimum": 0, "maximum": 10},
        "examples": _TEXTS,
    },
}

_PERSONA = {
    "type": "object",
    "required": ["name", "bio"],
    "additionalProperties": False,
    "properties": {
        "name": _TEXT,
        "bio": _TEXT,
        "languages": _TEXTS,
        "values": _TEXTS,
        "communication_style": _OPTIONAL_TEXT,
        "technical_preferences": _TEXTS,
        "traits": {"type": ["array", "null"], "items": _ref("Trait")},
    },
}

_USAGE = {
    "type": "object",
    "properties": {k: {"type": ["integer", "null"]} for k in (
        "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")},
}

_MESSAGE = {
    "type": "object",
    "required": ["id", "conversation_id", "role", "text", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "conversation_id": {"type": "string"},
        "role": {"type": "string", "enum": ["user", "assistant"]},
        "text": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "model": {"type": ["string", "null"]},
        "stop_reason": {"type": ["string", "null"]},
        "usage": _USAGE,
        "cost_usd": {"type": ["number", "null"], "description": "Estimated, in US dollars."},
    },
}

_CONVERSATION = {
    "type": "object",
    "required": ["id", "channel", "created_at", "updated_at"],
    "properties": {
        "id": {"type": "string"},
        "channel": {"type": "string"},
        "title": {"type": ["string", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}

_TOKEN = {
    "type": "object",
    "required": ["id", "name", "scope", "prefix", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "scope": {"type": "string", "enum": ["chat", "admin"]},
        "prefix": {"type": "string", "description": "First characters, to recognise it."},
        "created_at": {"type": "string"},
        "last_used_at": {"type": ["string", "null"]},
        "revoked_at": {"type": ["string", "null"]},
    },
}

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "Machine-readable code."},
        "message": {"type": "string", "description": "What went wrong and what to do."},
    },
}


@cache
def openapi_document() -> dict[str, Any]:
    chat: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "DigitalMe API",
            "version": __version__,
            "description": (
                "Talk to the digital clone and manage it. Every endpoint needs a bearer "
                "token (`Authorization: Bearer dm_...`); `chat` tokens may hold their own "
                "conversations, `admin` tokens may do everything."),
        },
        "servers": [{"url": "/"}],
        "security": chat,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR, "Trait": _TRAIT, "Persona": _PERSONA, "Message": _MESSAGE,
                "Conversation": _CONVERSATION, "Token": _TOKEN,
            },
        },
        "paths": {
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenApi", "summary": "This document.",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document."),
                                  **_AUTH_ERRORS},
                },
            },
            "/api/v1/me": {
                "get": {
                    "operationId": "getMe",
                    "summary": "This token, and the name of the clone it talks to.",
                    "responses": {"200": _json({"type": "object", "properties": {
                        "token": {"type": "object"}, "clone": {"type": "object"}}},
                        "Token and clone."), **_AUTH_ERRORS},
                },
            },
            "/api/v1/conversations": {
                "post": {
                    "operationId": "createConversation",
                    "summary": "Start a conversation (scope chat).",
                    "requestBody": {"required": False, "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "title": {"type": ["string", "null"], "maxLength": 200}}}}}},
                    "responses": {"201": _json(_ref("Conversation"), "Created."),
                                  "400": _error("Malformed body."), **_AUTH_ERRORS},
                },
                "get": {
                    "operationId": "listConversations",
                    "summary": "Conversations of this token (all of them for admin), newest "
                               "first.",
                    "parameters": [{"name": "limit", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": 500}}],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "conversations": {"type": "array", "items": _ref("Conversation")}}},
                        "The conversations."), "400": _error("Bad parameter."),
                        **_AUTH_ERRORS},
                },
            },
            "/api/v1/conversations/{conversation_id}": {
                "get": {
                    "operationId": "getConversation", "summary": "One conversation.",
                    "parameters": [_CONVERSATION_ID],
                    "responses": {"200": _json(_ref("Conversation"), "The conversation."),
                                  "404": _error("No such conversation for this token."),
                                  **_AUTH_ERRORS},
                },
            },
            "/api/v1/conversations/{conversation_id}/messages": {
                "get": {
                    "operationId": "listMessages",
                    "summary": "Messages, oldest first (the latest `limit`, or those before "
                               "message id `before`).",
                    "parameters": [
                        _CONVERSATION_ID,
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "before", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 2**62}},
                    ],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "messages": {"type": "array", "items": _ref("Message")}}},
                        "The messages."), "400": _error("Bad parameter."),
                        "404": _error("No such conversation for this token."),
                        **_AUTH_ERRORS},
                },
                "post": {
                    "operationId": "postMessage",
                    "summary": "Say something; the clone answers. With `Accept: "
                               "text/event-stream` the reply streams as server-sent events: "
                               "`message` (your stored message), `delta` ({text}) as it is "
                               "written, then `done` ({reply}) or `error` ({error, message}).",
                    "parameters": [_CONVERSATION_ID],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string", "minLength": 1}}}}}},
                    "responses": {
                        "201": {
                            "description": "Both stored messages (or an event stream).",
                            "content": {
                                "application/json": {"schema": {
                                    "type": "object", "required": ["message", "reply"],
                                    "properties": {"message": _ref("Message"),
                                                   "reply": _ref("Message")}}},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        "200": {"description": "The event stream.",
                                "content": {"text/event-stream": {"schema": {
                                    "type": "string"}}}},
                        "400": _error("Malformed body or message too long."),
                        "404": _error("No such conversation for this token."),
                        "413": _error("Body too large."),
                        "502": _error("The language model refused the request."),
                        "503": _error("Claude or the persona is unavailable; see "
                                      "Retry-After."),
                        **_AUTH_ERRORS,
                    },
                },
            },
            "/api/v1/persona": {
                "get": {
                    "operationId": "getPersona", "summary": "The persona (scope admin).",
                    "responses": {"200": _json({"type": "object", "properties": {
                        "persona": _ref("Persona"), "source_sha256": {"type": "string"},
                        "imported_at": {"type": "string"}}}, "The persona."),
                        "404": _error("No persona imported yet."), **_AUTH_ERRORS},
                },
                "put": {
                    "operationId": "putPersona",
                    "summary": "Replace the persona (scope admin).",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": _ref("Persona")}}},
                    "responses": {"200": _json({"type": "object"}, "The stored persona."),
                                  "400": _error("Invalid persona; the message says where."),
                                  "413": _error("Body too large."), **_AUTH_ERRORS},
                },
            },
            "/api/v1/persona/prompt": {
                "get": {
                    "operationId": "getPersonaPrompt",
                    "summary": "The system prompt built from the persona (scope admin).",
                    "responses": {"200": {"description": "The prompt.", "content": {
                        "text/plain": {"schema": {"type": "string"}}}},
                        "404": _error("No persona imported yet."), **_AUTH_ERRORS},
                },
            },
            "/api/v1/tokens": {
                "get": {
                    "operationId": "listTokens", "summary": "All tokens (scope admin).",
                    "responses": {"200": _json({"type": "object", "properties": {
                        "tokens": {"type": "array", "items": _ref("Token")}}}, "The tokens."),
                        **_AUTH_ERRORS},
                },
                "post": {
                    "operationId": "createToken",
                    "summary": "Create a token; its secret is in this answer only "
                               "(scope admin).",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["name", "scope"],
                                   "properties": {
                                       "name": {"type": "string", "minLength": 1,
                                                "maxLength": 100},
                                       "scope": {"type": "string",
                                                 "enum": ["chat", "admin"]}}}}}},
                    "responses": {"201": _json({"allOf": [_ref("Token"), {
                        "type": "object", "properties": {"token": {"type": "string"}}}]},
                        "Created."), "400": _error("Malformed body."), **_AUTH_ERRORS},
                },
            },
            "/api/v1/tokens/{token_id}": {
                "delete": {
                    "operationId": "revokeToken", "summary": "Revoke a token (scope admin).",
                    "parameters": [{"name": "token_id", "in": "path", "required": True,
                                    "schema": {"type": "integer", "minimum": 1}}],
                    "responses": {"200": _json(_ref("Token"), "The revoked token."),
                                  "404": _error("No such token."), **_AUTH_ERRORS},
                },
            },
        },
    }
