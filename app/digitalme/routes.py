"""The URL table: every route of the service, with the scope it needs and its mark
(marks.py).

``API_ROUTES`` is also what openapi.py describes (with each handler's ``@operation``).
"""

from __future__ import annotations

from aiohttp import web

from .handlers import api, ops, webchat
from .handlers.api import requires
from .keys import CHANNELS, ROUTE_MARKS
from .marks import API, OPS, PUBLIC, webhook

chat, admin = requires("chat"), requires("admin")

API_ROUTES = [
    web.get("/api/v1/openapi.json", chat(api.openapi)),
    web.get("/api/v1/me", chat(api.me)),
    web.post("/api/v1/conversations", chat(api.create_conversation)),
    web.get("/api/v1/conversations", chat(api.list_conversations)),
    web.get("/api/v1/conversations/{conversation_id}", chat(api.get_conversation)),
    web.get("/api/v1/conversations/{conversation_id}/messages", chat(api.list_messages)),
    web.post("/api/v1/conversations/{conversation_id}/messages", chat(api.post_message)),
    web.get("/api/v1/persona", admin(api.get_persona)),
    web.put("/api/v1/persona", admin(api.put_persona)),
    web.get("/api/v1/persona/prompt", admin(api.get_persona_prompt)),
    web.get("/api/v1/tokens", admin(api.list_tokens)),
    web.post("/api/v1/tokens", admin(api.create_token)),
    web.delete("/api/v1/tokens/{token_id}", admin(api.revoke_token)),
]


def setup_routes(app: web.Application) -> None:
    """Every route, with its mark (marks.py: how the request pipeline admits it)."""
    marks = app[ROUTE_MARKS]
    # operations (no token; /metrics wants DIGITALME_METRICS_TOKEN and is refused through
    # the proxy)
    marks.add(
        app,
        OPS,
        [
            web.get("/health", ops.health),
            web.get("/health/ready", ops.ready),
            web.get("/info", ops.info),
            web.get("/metrics", ops.metrics),
        ],
    )
    # web chat
    marks.add(
        app,
        PUBLIC,
        [
            web.get("/", webchat.index),
            web.static("/static", webchat.STATIC_DIR, append_version=False),
        ],
    )
    marks.add(app, API, API_ROUTES)
    # platform webhooks (signed; a channel whose secret is not set answers 404)
    for channel in app[CHANNELS]:
        marks.add(app, webhook(channel.name), channel.routes())
