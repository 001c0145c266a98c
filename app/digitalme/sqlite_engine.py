"""SQLite, the default engine: a file, WAL mode, ``synchronous=FULL``.

WAL mode lets readers run beside the writer; ``synchronous=FULL`` makes every commit
durable before it is acknowledged, so a reply the client saw survives ``kill -9`` and a
power cut. Writes go through :class:`~digitalme.committer.GroupCommitter` on its own
connection; scanning reads through an aiosqlite connection (its thread); small indexed
lookups on the event loop, on a third connection (see :mod:`digitalme.db`). Migrations
use the aiosqlite writer connection, only from ``digitalme migrate``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .committer import GroupCommitter
from .engine import DatabaseError, Migration, Row

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
_PRAGMAS = (f"busy_timeout={BUSY_TIMEOUT_MS}", "synchronous=FULL", "foreign_keys=ON")
_SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
    " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)


async def _pragma(conn: aiosqlite.Connection, pragma: str) -> None:
    # Fetch the result: a pragma's statement stays active (holding locks) until it is.
    async with conn.execute(f"PRAGMA {pragma}") as cursor:
        await cursor.fetchall()


def _connect_sync(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            conn.execute(f"PRAGMA {pragma}").fetchall()
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteWriterSession:
    """The group committer's connection (:class:`~digitalme.committer.WriterSession`)."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.connection = _connect_sync(path)

    def begin(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def command(self, sql: str) -> None:
        self.connection.execute(sql)

    def in_transaction(self) -> bool:
        return self.connection.in_transaction

    def lost(self, cause: BaseException) -> Exception:
        return sqlite3.OperationalError(f"the transaction was rolled back: {cause}")

    def close(self) -> None:
        self.connection.close()


class SqliteEngine:
    name = "sqlite"
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    skip_locked = ""  # one process writes; its writer thread runs one claim at a time
    json_object = "json_object"
    shared = False  # one service process per file (the socket hands over between releases)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._committer: GroupCommitter | None = None
        self._quick: sqlite3.Connection | None = None

    def describe(self) -> str:
        return str(self.path)

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            raise DatabaseError(f"directory {self.path.parent} does not exist")
        try:
            self._writer = await self._connect()
            await _pragma(self._writer, "journal_mode=WAL")
            self._reader = await self._connect()
            path = self.path
            self._committer = GroupCommitter(lambda: SqliteWriterSession(path))
            await self._committer.start()
            # A WAL reader does not wait for the writer or for checkpoints; it could meet a
            # lock only while another connection recovers the WAL after a crash, which
            # happens when the writer opens, before this connection exists.
            self._quick = _connect_sync(self.path)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise DatabaseError(f"cannot open {self.path}: {exc}") from exc

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in _PRAGMAS:
                await _pragma(conn, pragma)
        except BaseException:
            # Close it, or its (non-daemon) worker thread keeps the process alive.
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._quick is not None:
            self._quick.close()
            self._quick = None
        if self._committer is not None:
            await self._committer.stop()
            self._committer = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise DatabaseError("database is not open")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise DatabaseError("database is not open")
        return self._reader

    @property
    def committer(self) -> GroupCommitter | None:
        return self._committer

    # --- queries -------------------------------------------------------------------------

    async def fetchall(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        # One call into the reader's thread runs, steps and finishes the statement, so no
        # other read can interleave with it and stretch its snapshot: every read sees what
        # was committed before it started (a read-after-write never misses the write).
        rows = await self.reader.execute_fetchall(sql, params)
        return list(rows)

    async def lookup(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        if self._quick is None:
            raise DatabaseError("database is not open")
        rows: list[Row] = self._quick.execute(sql, params).fetchall()
        return rows

    async def write(self, job: Callable[[Any], T]) -> T:
        if self._committer is None:
            raise DatabaseError("database is not open")
        return await self._committer.write(job)

    async def table_exists(self, name: str) -> bool:
        rows = await self.fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        )
        return bool(rows)

    async def apply_migrations(self, migrations: Sequence[Migration]) -> list[Migration]:
        await self.writer.execute(_SCHEMA_MIGRATIONS)
        async with self._write_lock:
            applied = {
                row[0]
                for row in await self.writer.execute_fetchall(
                    "SELECT version FROM schema_migrations"
                )
            }
            pending = [m for m in migrations if m.version not in applied]
            if not pending:
                return []
            # One script, so that SQLite runs every statement of every file in one
            # transaction (executescript: a file holds several statements).
            script = ["BEGIN IMMEDIATE;"]
            for migration in pending:
                script += [
                    migration.sql_for(self.name),
                    ";",
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ("
                    f"{migration.version}, '{migration.name}',"
                    f" '{migration.checksum_for(self.name)}');",
                ]
            script.append("COMMIT;")
            try:
                await self.writer.executescript("\n".join(script))
            except sqlite3.Error:
                if self.writer.in_transaction:
                    await self.writer.execute("ROLLBACK")
                raise
        return pending

    async def size_bytes(self) -> int:
        return _size_on_disk(self.path)


def _size_on_disk(path: Path) -> int:
    """Bytes on disk of the database and its WAL (two stat calls; cheap enough to run on
    the event loop)."""
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += Path(str(path) + suffix).stat().st_size
        except FileNotFoundError:
            pass
    return total
