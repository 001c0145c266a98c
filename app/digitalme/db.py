"""SQLite access: one writer thread with group commit, readers, numbered migrations.

WAL mode lets readers run beside the writer; ``synchronous=FULL`` makes every commit
durable before it is acknowledged, so a reply the client saw survives ``kill -9`` and a
power cut. Modules that own a table (conversations, tokens, persona, ...) write their SQL
against :class:`Database`; handlers never do.

* Writes are jobs (:meth:`Database.write`: a function of the connection) run by one thread
  that commits whatever is queued as one transaction (:mod:`digitalme.committer`); each
  caller hears back only after that commit, so durability is per write as before, with one
  ``fsync`` per batch instead of per write.
* Small indexed reads (a token by digest, a conversation by id, its latest messages) run
  on the event loop itself (:meth:`Database.lookup`): from SQLite's cache they take a few
  microseconds, several times less than a round trip to a database thread. A read that
  could scan (lists, counts, reports) goes to the reader thread (:meth:`Database.fetchall`).
* Migrations use their own connection (:attr:`Database.writer`), only from
  ``digitalme migrate``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .committer import GroupCommitter

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
_PRAGMAS = (f"busy_timeout={BUSY_TIMEOUT_MS}", "synchronous=FULL", "foreign_keys=ON")
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
        self._committer: GroupCommitter | None = None
        self._quick: sqlite3.Connection | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            raise DatabaseError(f"directory {self.path.parent} does not exist")
        try:
            self._writer = await self._connect()
            await _pragma(self._writer, "journal_mode=WAL")
            self._reader = await self._connect()
            self._committer = GroupCommitter(self.path, _PRAGMAS)
            await self._committer.start()
            self._quick = self._connect_quick()
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

    def _connect_quick(self) -> sqlite3.Connection:
        # A WAL reader does not wait for the writer or for checkpoints; it could meet a
        # lock only while another connection recovers the WAL after a crash, which happens
        # when the writer opens, before this connection exists.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in _PRAGMAS:
                conn.execute(f"PRAGMA {pragma}").fetchall()
        except BaseException:
            conn.close()
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

    async def lookup(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """A small indexed read, run on the event loop (see the module's docstring); only
        for statements that touch a few rows through an index."""
        if self._quick is None:
            raise DatabaseError("database is not open")
        return self._quick.execute(sql, tuple(params)).fetchall()

    async def lookup_one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.lookup(sql, params)
        return rows[0] if rows else None

    async def write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` (plain SQL on the connection it gets, no awaits) as one atomic write:
        its own savepoint in a group-committed transaction. Returns its result once the
        transaction is durably committed; if it raises, its changes are rolled back and
        the exception is raised here."""
        if self._committer is None:
            raise DatabaseError("database is not open")
        return await self._committer.write(job)

    async def write_returning(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        """One write statement with a RETURNING clause: the row as written, without a
        second read."""
        values = tuple(params)
        return await self.write(lambda conn: next(iter(conn.execute(sql, values).fetchall()),
                                                  None))

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One write statement; returns lastrowid."""
        values = tuple(params)
        return await self.write(lambda conn: conn.execute(sql, values).lastrowid or 0)

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
