"""The application factory: ``create_app(settings)`` wires everything, without I/O.

Resources that need I/O (the database, the Claude client) are opened and closed by the
application's cleanup context, when the server starts and stops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web

from . import __version__
from .chat import ChatService
from .config import Settings
from .conversations import ConversationStore
from .db import Database
from .health import Readiness, claude_check, database_check, migrations_check, persona_check
from .keys import (
    CHAT,
    CLAUDE,
    CONVERSATIONS,
    DATABASE,
    METRICS,
    PERSONAS,
    RATE_LIMITER,
    READINESS,
    SETTINGS,
    STARTED_AT,
    TOKENS,
)
from .llm import Claude
from .metrics import Metrics
from .middlewares import (
    add_security_headers,
    client_middleware,
    error_middleware,
    metrics_middleware,
)
from .persona import PersonaStore
from .ratelimit import RateLimiter
from .routes import setup_routes
from .tokens import TokenStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 20.0


async def _resources(app: web.Application) -> AsyncIterator[None]:
    db, claude = app[DATABASE], app[CLAUDE]
    await db.open()
    try:
        applied = await db.migrate()
        if applied:
            log.info("database %s migrated to version %d", db.path, applied[-1].version)
        await claude.start()
        app[STARTED_AT] = datetime.now(UTC).isoformat(timespec="seconds")
        log.info("DigitalMe %s (%s) ready to listen", __version__, app[SETTINGS].environment)
        yield
        await app[CHAT].drain(SHUTDOWN_GRACE_SECONDS)
    finally:
        await claude.close()
        await db.close()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, client_middleware],
        client_max_size=settings.max_body_bytes,
    )
    metrics = Metrics()
    metrics.build_info.labels(__version__, settings.commit or "unknown",
                              settings.environment).set(1)
    db = Database(settings.db_path)
    claude = Claude(settings, metrics)
    conversations = ConversationStore(db)
    personas = PersonaStore(db)

    async def refresh_db_size() -> None:
        metrics.db_size.set(db.size_bytes())
    metrics.on_scrape(refresh_db_size)

    readiness = Readiness()
    readiness.add("database", database_check(db))
    readiness.add("migrations", migrations_check(db))
    readiness.add("persona", persona_check(personas))
    readiness.add("claude", claude_check(claude))

    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[DATABASE] = db
    app[CLAUDE] = claude
    app[CONVERSATIONS] = conversations
    app[PERSONAS] = personas
    app[TOKENS] = TokenStore(db)
    app[CHAT] = ChatService(settings, conversations, personas, claude, metrics)
    app[READINESS] = readiness
    app[RATE_LIMITER] = RateLimiter(settings.rate_limit_per_minute)
    app[STARTED_AT] = ""
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(add_security_headers)
    setup_routes(app)
    return app
