"""Litestream 0.5's control socket, locally: HTTP on a Unix socket, as ``replicate`` serves it.

Answers ``GET /list`` and ``GET /info`` with the shapes Litestream 0.5.17 gives (recorded
from the pinned binary)::

    GET /list -> {"databases": [{"path": "/var/lib/digitalme/digitalme.db",
                                 "status": "replicating",
                                 "last_sync_at": "2026-11-26T04:10:51.916384589Z"}]}
    GET /info -> {"version": "0.5.17", "pid": 2792, "uptime_seconds": 11,
                  "started_at": "2026-11-26T04:10:08.833275265Z", "database_count": 1}

``last_sync_at`` is the end of the last successful sync to the replica; it stops advancing
while the replica refuses writes. Litestream prints Go's zero time for a database that never
synced. Controls: ``standin.synced(seconds_ago)``, ``standin.never_synced()``,
``standin.databases = [...]`` (the raw entries), ``standin.hang()`` (accept, never answer:
a stopped process), ``standin.requests`` (paths asked).

    async with run_litestream_socket(path, db_path) as standin:
        standin.synced(120)   # the replica has not accepted anything for two minutes
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def go_time(moment: datetime) -> str:
    """RFC 3339 with nanoseconds, as Go's time.Time marshals to JSON."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


class LitestreamSocketStandin:
    def __init__(self, socket_path: Path, db_path: Path) -> None:
        self.socket_path = socket_path
        self.databases: list[dict[str, Any]] = [
            {
                "path": os.path.abspath(db_path),
                "status": "replicating",
                "last_sync_at": go_time(datetime.now(UTC)),
            }
        ]
        self.requests: list[str] = []
        self._release = asyncio.Event()
        self._release.set()
        self._started = datetime.now(UTC)

    def synced(self, seconds_ago: float) -> None:
        self.databases[0]["last_sync_at"] = go_time(
            datetime.now(UTC) - timedelta(seconds=seconds_ago)
        )

    def never_synced(self) -> None:
        self.databases[0]["last_sync_at"] = GO_ZERO_TIME

    def hang(self) -> None:
        self._release.clear()

    def recover(self) -> None:
        self._release.set()

    async def _list(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        await self._release.wait()
        return web.json_response({"databases": self.databases})

    async def _info(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        await self._release.wait()
        return web.json_response(
            {
                "version": "0.5.17",
                "pid": os.getpid(),
                "uptime_seconds": int((datetime.now(UTC) - self._started).total_seconds()),
                "started_at": go_time(self._started),
                "database_count": len(self.databases),
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/list", self._list)
        app.router.add_get("/info", self._info)
        return app


@asynccontextmanager
async def run_litestream_socket(
    socket_path: Path,
    db_path: Path,
) -> AsyncIterator[LitestreamSocketStandin]:
    standin = LitestreamSocketStandin(socket_path, db_path)
    runner = web.AppRunner(standin.app(), shutdown_timeout=0.1)
    await runner.setup()
    site = web.UnixSite(runner, str(socket_path))
    await site.start()
    socket_path.chmod(0o600)  # as Litestream leaves it
    try:
        yield standin
    finally:
        standin.recover()
        await runner.cleanup()
