"""Typed keys for what the application owns (``app[SETTINGS]`` and so on)."""

from __future__ import annotations

from aiohttp import web

from .chat import ChatService
from .config import Settings
from .conversations import ConversationStore
from .db import Database
from .health import Readiness
from .llm import Claude
from .metrics import Metrics
from .persona import PersonaStore
from .ratelimit import RateLimiter
from .tokens import TokenInfo, TokenStore

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DATABASE = web.AppKey("database", Database)
CLAUDE = web.AppKey("claude", Claude)
CHAT = web.AppKey("chat", ChatService)
CONVERSATIONS = web.AppKey("conversations", ConversationStore)
PERSONAS = web.AppKey("personas", PersonaStore)
TOKENS = web.AppKey("tokens", TokenStore)
READINESS = web.AppKey("readiness", Readiness)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
STARTED_AT = web.AppKey("started_at", str)

# Per-request: the authenticated token (set by the auth wrapper).
REQUEST_TOKEN = "digitalme.token"  # noqa: S105 - a request key, not a secret
__all__ = ["REQUEST_TOKEN", "TokenInfo"]
