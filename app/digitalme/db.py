"""SQLite access: one writer connection behind a lock, one reader, numbered migrations.

WAL mode lets the reader run beside the writer; ``synchronous=FULL`` makes every commit
durable before it is acknowledged, so a reply the client saw survives ``kill -9`` and a
power cut. Modules that own a table (conversations, tokens, persona, ...) write their SQL
against :class:`Database`; handlers never do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseError(Exception):
    """The database cannot be used: not writable, not migrated, or newer than this code."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled_migrations() -> list[Migration]:
    """The migrations shipped in ``digitalme/migrations``, in order."""
    found = []
    for entry in resources.files("digitalme.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise DatabaseError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


async def _pragma(conn: aiosqlite.Connection, pragma: str) -> None:
    # Fetch the result: a pragma's statement stays active (holding locks) until it is.
    async with conn.execute(f"PRAGMA {pragma}") as cursor:
        await cursor.fetchall()


@dataclass(frozen=True)
class MigrationState:
    pending: list[Migration]
    newer: list[int]  # applied versions this release does not know (a newer release's)

    def describe_pending(self) -> str:
        return ", ".join(f"{m.version:04d}_{m.name}" for m in self.pending)


class Database:
    """The app's SQLite database. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path, migrations: Sequence[Migration] | None = None) -> None:
        self.path = path
        self.migrations = list(migrations) if migrations is not None else bundled_migrations()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            raise DatabaseError(f"directory {self.path.parent} does not exist")
        try:
            self._writer = await self._connect()
            await _pragma(self._writer, "journal_mode=WAL")
            self._reader = await self._connect()
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise DatabaseError(f"cannot open {self.path}: {exc}") from exc

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await _pragma(conn, f"busy_timeout={BUSY_TIMEOUT_MS}")
            await _pragma(conn, "synchronous=FULL")
            await _pragma(conn, "foreign_keys=ON")
        except BaseException:
            # Close it, or its (non-daemon) worker thread keeps the process alive.
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
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

    # --- queries -------------------------------------------------------------------------

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # One call into the reader's thread runs, steps and finishes the statement, so no
        # other read can interleave with it and stretch its snapshot: every read sees what
        # was committed before it started (a read-after-write never misses the write).
        rows = await self.reader.execute_fetchall(sql, tuple(params))
        return list(rows)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Serialised write transaction; committed (durably) when the block exits."""
        async with self._write_lock:
            conn = self.writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def write_returning(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        """One write statement with a RETURNING clause, in its own transaction: the row as
        written, without a second read."""
        async with self.transaction() as conn:
            rows = await conn.execute_fetchall(sql, tuple(params))
        return next(iter(rows), None)

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One write statement in its own transaction; returns lastrowid."""
        async with self.transaction() as conn, conn.execute(sql, tuple(params)) as cursor:
            return cursor.lastrowid or 0

    # --- migrations ----------------------------------------------------------------------

    async def applied_migrations(self) -> dict[int, str]:
        exists = await self.fetchone(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'")
        if not exists:
            return {}
        rows = await self.fetchall("SELECT version, checksum FROM schema_migrations")
        return {row["version"]: row["checksum"] for row in rows}

    async def migration_state(self) -> MigrationState:
        """Which of this release's migrations the database has, which it lacks, and which
        it has from a newer release. Raises when an applied migration's file changed."""
        applied = await self.applied_migrations()
        known = {m.version: m for m in self.migrations}
        for version, checksum in applied.items():
            if version in known and known[version].checksum != checksum:
                raise DatabaseError(
                    f"migration {version:04d}_{known[version].name} changed after it was "
                    "applied to this database; restore the original file")
        return MigrationState(
            pending=[m for m in self.migrations if m.version not in applied],
            newer=sorted(set(applied) - set(known)))

    async def pending_migrations(self) -> list[Migration]:
        return (await self.migration_state()).pending

    async def require_migrated(self) -> MigrationState:
        """Refuse a database this release's migrations have not all been applied to.

        Only ``digitalme migrate`` changes the schema (a deployment runs it as its own step,
        after a snapshot); serving or administering an unmigrated database would fail later
        in stranger ways. A database ahead of this release (migrations of a newer one) is
        accepted: migrations only add (docs/maintenance.md), so an older release still runs
        on it, which is what a rollback of the code alone needs.
        """
        state = await self.migration_state()
        if state.pending:
            raise DatabaseError(
                f"{self.path} lacks migrations {state.describe_pending()}: run "
                "`digitalme migrate` first (deployments run it as their own step)")
        if state.newer:
            log.warning("database %s has migrations %s from a newer release; running on it "
                        "(migrations only add)", self.path, state.newer)
        return state

    async def migrate(self) -> list[Migration]:
        """Apply this release's pending migrations in one transaction: all or none.
        Returns those applied."""
        await self.writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
            " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
        pending = await self.pending_migrations()
        if not pending:
            return []
        script = ["BEGIN IMMEDIATE;"]
        for migration in pending:
            script += [
                migration.sql, ";",
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ("
                f"{migration.version}, '{migration.name}', '{migration.checksum}');"]
        script.append("COMMIT;")
        async with self._write_lock:
            try:
                await self.writer.executescript("\n".join(script))
            except sqlite3.Error as exc:
                if self.writer.in_transaction:
                    await self.writer.execute("ROLLBACK")
                names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
                raise DatabaseError(
                    f"migrating to {names} failed: {exc}; nothing was applied, the database "
                    "is as it was") from exc
        for migration in pending:
            log.info("applied migration %04d_%s", migration.version, migration.name)
        return pending

    def size_bytes(self) -> int:
        """Bytes on disk of the database and its WAL (two stat calls; cheap enough to run
        on the event loop)."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += Path(str(self.path) + suffix).stat().st_size
            except FileNotFoundError:
                pass
        return total
