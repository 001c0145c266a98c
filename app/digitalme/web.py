"""The application factory: ``create_app(settings)`` wires everything, without I/O.

Resources that need I/O (the database, the Claude client) are opened and closed by the
application's cleanup context, when the server starts and stops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from . import __version__
from .accesslog import AccessLogger
from .activity import ActivityStore
from .backup import backup_check, replication_metrics_refresher
from .chat import ChatService
from .config import Settings
from .conversations import ConversationStore
from .db import Database, database_for
from .health import (
    CheckResult,
    Readiness,
    claude_check,
    database_check,
    migrations_check,
    persona_check,
)
from .inbox import InboxStore
from .integrations.channel import Channel, ChannelContext
from .integrations.clickup.channel import ClickUpChannel
from .integrations.github.channel import GitHubChannel
from .integrations.slack.channel import SlackChannel
from .integrations.telegram.channel import TelegramChannel
from .keys import (
    ACTIVITY,
    CHANNELS,
    CHAT,
    CLAUDE,
    CONVERSATIONS,
    DATABASE,
    INBOX,
    METRICS,
    OPENAPI,
    OUTBOUND,
    PERSONAS,
    RATE_LIMITER,
    READINESS,
    RELEASE,
    RETENTION,
    ROUTE_MARKS,
    SETTINGS,
    STARTED_AT,
    TOKENS,
    WORKER,
)
from .llm import Claude
from .marks import RouteMarks
from .metrics import Metrics
from .middlewares import add_security_headers, request_pipeline
from .openapi import openapi_document
from .outbound import Outbound
from .persona import PersonaStore
from .ratelimit import RateLimiter
from .release import RELEASE_FIELDS, read_json_object
from .retention import Retention
from .routes import setup_routes
from .tokens import TokenStore
from .tool_actions import ToolActionLog
from .worker import Worker

log = logging.getLogger(__name__)

# The channels, in the order readiness, metrics and the activity digest list them. A new
# platform is a package of integrations/ and a line here (its settings: config.py).
CHANNEL_TYPES: tuple[type[Channel], ...] = (
    TelegramChannel,
    SlackChannel,
    GitHubChannel,
    ClickUpChannel,
)

SHUTDOWN_GRACE_SECONDS = 20.0


async def _resources(app: web.Application) -> AsyncIterator[None]:
    db, claude = app[DATABASE], app[CLAUDE]
    settings = app[SETTINGS]
    await db.open()
    try:
        # Migrations are their own step (`digitalme migrate`), never a side effect of start.
        await db.require_migrated()
        await claude.start()
        app[STARTED_AT] = datetime.now(UTC).isoformat(timespec="seconds")
        app[RELEASE] = read_json_object(settings.release_info, RELEASE_FIELDS)
        commit = settings.commit or (app[RELEASE] or {}).get("commit") or "unknown"
        app[METRICS].build_info.labels(__version__, str(commit), settings.environment).set(1)
        log.info(
            "DigitalMe %s (%s, release %s) ready to listen",
            __version__,
            settings.environment,
            (app[RELEASE] or {}).get("release", "unknown"),
        )
        yield
        await app[CHAT].drain(SHUTDOWN_GRACE_SECONDS)
    finally:
        await claude.close()
        await db.close()


async def _channels(app: web.Application) -> AsyncIterator[None]:
    """The outbound HTTP session, the inbox worker and the retention prune; they stop
    before the database closes (cleanup contexts unwind in reverse)."""
    outbound, worker, retention = app[OUTBOUND], app[WORKER], app[RETENTION]
    await outbound.start()
    try:
        await worker.start()
        await retention.start()
        for channel in app[CHANNELS]:
            status = channel.status()
            log.log(
                logging.INFO if status.ok else logging.WARNING,
                "channel %s: %s",
                channel.name,
                status.detail,
            )
        yield
        await retention.stop()
        await worker.stop()
    finally:
        await outbound.close()


def _inbox_check(inbox: InboxStore, worker: Worker) -> Callable[[], Awaitable[CheckResult]]:
    async def check() -> CheckResult:
        counts = await inbox.counts()
        by_status = {
            status: sum(n for (_, s), n in counts.items() if s == status)
            for status in ("pending", "processing", "failed")
        }
        oldest = await inbox.oldest_due_age()
        data = {**by_status, "oldest_due_seconds": round(oldest, 1) if oldest else 0}
        if not worker.running:
            return CheckResult(False, "the inbox worker is not running", data)
        detail = "worker running"
        if by_status["failed"]:
            detail += f"; {by_status['failed']} failed (see `digitalme inbox list --status failed`)"
        return CheckResult(True, detail, data)

    return check


def _wire_channels(
    app: web.Application,
    settings: Settings,
    metrics: Metrics,
    db: Database,
    chat: ChatService,
    conversations: ConversationStore,
    readiness: Readiness,
) -> None:
    inbox = InboxStore(db)
    activity = ActivityStore(
        db, settings, {c.name: c.title for c in CHANNEL_TYPES if c.records_activity}
    )
    outbound = Outbound(settings, metrics)
    worker = Worker(settings, inbox, metrics, processors={})
    ctx = ChannelContext(
        settings,
        metrics,
        inbox,
        chat,
        conversations,
        activity,
        outbound,
        ToolActionLog(db),
        worker.wake,
    )
    channels = tuple(channel_type(ctx) for channel_type in CHANNEL_TYPES)
    for channel in channels:
        worker.processors[channel.name] = channel.process
        readiness.add(channel.name, channel.check, required=False)
        for tool in channel.tools():
            chat.add_tool(tool)
    readiness.add(
        "inbox", _inbox_check(inbox, worker), required=any(channel.enabled for channel in channels)
    )
    chat.add_context_provider(activity.digest)

    async def refresh_inbox_gauges() -> None:
        for (channel_name, status), count in (await inbox.counts()).items():
            metrics.inbox_items.labels(channel_name, status).set(count)

    metrics.on_scrape(refresh_inbox_gauges)

    app[INBOX] = inbox
    app[ACTIVITY] = activity
    app[RETENTION] = Retention(db, settings, metrics)
    app[OUTBOUND] = outbound
    app[WORKER] = worker
    app[CHANNELS] = channels
    app.cleanup_ctx.append(_channels)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_pipeline],
        client_max_size=settings.max_body_bytes,
        # The runner keeps its logger and format; the line is written by ours (accesslog.py).
        handler_args={"access_log_class": AccessLogger},
    )
    metrics = Metrics(litestream=settings.litestream_socket is not None)
    db = database_for(settings)
    claude = Claude(settings, metrics)
    conversations = ConversationStore(db)
    personas = PersonaStore(db)

    async def refresh_db_size() -> None:
        metrics.db_size.set(await db.size_bytes())

    metrics.on_scrape(refresh_db_size)

    readiness = Readiness()
    readiness.add("database", database_check(db))
    readiness.add("migrations", migrations_check(db))
    readiness.add("persona", persona_check(personas))
    readiness.add("claude", claude_check(claude))
    if settings.litestream_socket is not None or settings.backup_drill_result is not None:
        # Reported, not required: a stalled replica must show, but it must not take the
        # only instance out of rotation (docs/operations/backup-and-recovery.md).
        readiness.add("backup", backup_check(settings), required=False)
    if settings.litestream_socket is not None:
        metrics.on_scrape(
            replication_metrics_refresher(settings.litestream_socket, settings.db_path, metrics)
        )

    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[DATABASE] = db
    app[CLAUDE] = claude
    app[CONVERSATIONS] = conversations
    app[PERSONAS] = personas
    app[TOKENS] = TokenStore(db)
    chat = ChatService(settings, conversations, personas, claude, metrics)
    app[CHAT] = chat
    app[READINESS] = readiness
    app[RATE_LIMITER] = RateLimiter(settings.rate_limit_per_minute)
    app[STARTED_AT] = ""
    app[RELEASE] = None
    app.cleanup_ctx.append(_resources)
    _wire_channels(app, settings, metrics, db, chat, conversations, readiness)
    app.on_response_prepare.append(add_security_headers)
    app[ROUTE_MARKS] = RouteMarks()
    setup_routes(app)
    app[OPENAPI] = openapi_document()
    return app
