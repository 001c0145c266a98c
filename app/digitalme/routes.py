"""The URL table: every route of the service, with the scope it needs.

``API_ROUTES`` is also what openapi.py describes (with each handler's ``@operation``).
"""

from __future__ import annotations

from aiohttp import web

from .handlers import api, ops, webchat
from .handlers.api import requires
from .keys import CHANNELS

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
    app.add_routes(
        [
            # operations (no auth, but /metrics wants DIGITALME_METRICS_TOKEN and is refused
            # through the proxy)
            web.get("/health", ops.health),
            web.get("/health/ready", ops.ready),
            web.get("/info", ops.info),
            web.get("/metrics", ops.metrics),
            # web chat
            web.get("/", webchat.index),
            web.static("/static", webchat.STATIC_DIR, append_version=False),
            *API_ROUTES,
        ]
    )
    # platform webhooks (signed; a channel whose secret is not set answers 404)
    for channel in app[CHANNELS]:
        app.add_routes(channel.routes())
