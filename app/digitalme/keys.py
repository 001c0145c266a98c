"""Typed keys for what the application owns (``app[SETTINGS]`` and so on)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .activity import ActivityStore
from .chat import ChatService
from .config import Settings
from .conversations import ConversationStore
from .db import Database
from .health import Readiness
from .inbox import InboxStore
from .integrations.channel import WEBHOOK_OUTCOME as WEBHOOK_OUTCOME  # how a delivery ended
from .integrations.channel import Channel
from .llm import Claude
from .marks import Mark, RouteMarks
from .metrics import Metrics
from .outbound import Outbound
from .persona import PersonaStore
from .ratelimit import RateLimiter
from .retention import Retention
from .tokens import TokenInfo, TokenStore
from .worker import Worker

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
# The installed release's description (release.py), read at start; None when not set.
RELEASE: web.AppKey[dict[str, Any] | None] = web.AppKey("release")
INBOX = web.AppKey("inbox", InboxStore)
WORKER = web.AppKey("worker", Worker)
OUTBOUND = web.AppKey("outbound", Outbound)
ACTIVITY = web.AppKey("activity", ActivityStore)
RETENTION = web.AppKey("retention", Retention)
CHANNELS: web.AppKey[tuple[Channel, ...]] = web.AppKey("channels")
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")  # openapi.openapi_document()
ROUTE_MARKS = web.AppKey("route_marks", RouteMarks)  # each route's mark (routes.py)

# Per request, set by the client middleware: the bearer token (None when absent), the
# client's address (through trusted proxies), and whether it came through such a proxy.
REQUEST_TOKEN: web.RequestKey[TokenInfo | None] = web.RequestKey("token")
CLIENT_ADDRESS = web.RequestKey("client_address", str)
VIA_PROXY = web.RequestKey("via_proxy", bool)
# The mark of the route the request is for (marks.py), set first by the request pipeline.
ROUTE_MARK = web.RequestKey("route_mark", Mark)
