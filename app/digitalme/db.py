"""The database: one writer thread with group commit, readers, numbered migrations, on
SQLite (the default) or PostgreSQL (``DIGITALME_DATABASE_URL``).

Modules that own a table (conversations, tokens, persona, ...) write their SQL against
:class:`Database`; handlers never do. That SQL is written once, in the dialect both engines
speak: ``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING`` (SQLite 3.35+), ISO 8601
text for times. What differs between the engines lives in their engine module and nowhere
else: :mod:`digitalme.sqlite_engine` and :mod:`digitalme.postgres_engine` (placeholders,
pragmas, the migration DDL's types, catalogue lookups, sizes, row locks).

* Writes are jobs (:meth:`Database.write`: a function of a DB-API connection) run by one
  thread that commits whatever is queued as one transaction (:mod:`digitalme.committer`);
  each caller hears back only after that commit, so durability is per write, with one
  flush per batch instead of per write.
* Small indexed reads (a token by digest, a conversation by id, its latest messages) go
  through :meth:`Database.lookup`: SQLite answers them on the event loop itself from its
  cache (a few microseconds, less than a round trip to a thread); PostgreSQL over the
  network like any read. A read that could scan (lists, counts, reports) goes through
  :meth:`Database.fetchall`.
* Migrations run only from ``digitalme migrate``, all pending ones in one transaction.

Why psycopg 3 for PostgreSQL, and its *synchronous* connection in the writer thread: the
service's writes are already jobs, plain functions of a DB-API connection run by one
thread with group commit; a psycopg ``Connection`` is a DB-API connection, so every job
and the committer run on it unchanged, keeping the one-transaction-per-batch design (an
async driver such as asyncpg would have meant rewriting every job as a coroutine, with
an await per statement inside the transaction). Reads use psycopg's ``AsyncConnection``
on the event loop. psycopg is maintained by the PostgreSQL community's psycopg project,
speaks libpq (so ``~/.pgpass``, ``PGSSLMODE``, service files all work), and ships binary
wheels (``psycopg[binary]``), so hosts need no compiler or libpq headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .committer import GroupCommitter
    from .config import DatabaseUrl, Settings

from .engine import (
    Connection,
    DatabaseError,
    Engine,
    Migration,
    MigrationState,
    Row,
    bundled_migrations,
    first_line,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class Database:
    """The app's database. Open with :meth:`open`, close with :meth:`close`.

    ``Database(path)`` is SQLite at ``path``; ``Database(url)`` with a
    :class:`~digitalme.config.DatabaseUrl` is PostgreSQL. :func:`database_for` picks from
    the settings."""

    def __init__(
        self, target: Path | DatabaseUrl, migrations: Sequence[Migration] | None = None
    ) -> None:
        self.migrations = list(migrations) if migrations is not None else bundled_migrations()
        self.engine: Engine
        if isinstance(target, Path):
            from .sqlite_engine import SqliteEngine

            self.path: Path | None = target
            self.engine = SqliteEngine(target)
        else:
            from .postgres_engine import PostgresEngine

            self.path = None
            self.engine = PostgresEngine(target)

    @property
    def name(self) -> str:
        """The database, for messages: its path, or its URL without the password."""
        return self.engine.describe()

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """The exceptions the engine's driver raises (a failed write, a lost server)."""
        return self.engine.errors

    @property
    def shared(self) -> bool:
        """See :attr:`Engine.shared`."""
        return self.engine.shared

    @property
    def json_object(self) -> str:
        """See :attr:`Engine.json_object`."""
        return self.engine.json_object

    @property
    def committer(self) -> GroupCommitter | None:
        """The group committer, for its counters (tests and benches read them)."""
        return self.engine.committer

    @property
    def skip_locked(self) -> str:
        """See :attr:`Engine.skip_locked`: for a claim's SELECT of rows to update, so that
        several processes claiming at once never take the same row."""
        return self.engine.skip_locked

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        await self.engine.open()

    async def close(self) -> None:
        await self.engine.close()

    # --- queries -------------------------------------------------------------------------

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """A read that may scan. Every read sees what was committed before it started (a
        read-after-write never misses the write)."""
        return await self.engine.fetchall(sql, tuple(params))

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def lookup(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """A small indexed read (see the module's docstring); only for statements that
        touch a few rows through an index."""
        return await self.engine.lookup(sql, tuple(params))

    async def lookup_one(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        rows = await self.lookup(sql, params)
        return rows[0] if rows else None

    async def write(self, job: Callable[[Connection], T]) -> T:
        """Run ``job`` (plain SQL on the connection it gets, no awaits) as one atomic write:
        its own savepoint in a group-committed transaction. Returns its result once the
        transaction is durably committed; if it raises, its changes are rolled back and
        the exception is raised here."""
        return await self.engine.write(job)

    async def write_returning(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        """One write statement with a RETURNING clause: the row as written, without a
        second read."""
        values = tuple(params)
        return await self.write(lambda conn: next(iter(conn.execute(sql, values).fetchall()), None))

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One write statement; returns the number of rows it changed."""
        values = tuple(params)
        return await self.write(lambda conn: conn.execute(sql, values).rowcount)

    async def size_bytes(self) -> int:
        """Bytes the database takes on disk (SQLite: the file and its WAL; PostgreSQL:
        ``pg_database_size``)."""
        return await self.engine.size_bytes()

    # --- migrations ----------------------------------------------------------------------

    async def applied_migrations(self) -> dict[int, str]:
        if not await self.engine.table_exists("schema_migrations"):
            return {}
        rows = await self.fetchall("SELECT version, checksum FROM schema_migrations")
        return {row["version"]: row["checksum"] for row in rows}

    async def migration_state(self) -> MigrationState:
        """Which of this release's migrations the database has, which it lacks, and which
        it has from a newer release. Raises when an applied migration's file changed."""
        applied = await self.applied_migrations()
        return self._state(applied)

    def _state(self, applied: dict[int, str]) -> MigrationState:
        known = {m.version: m for m in self.migrations}
        for version, checksum in applied.items():
            if version in known and known[version].checksum_for(self.engine.name) != checksum:
                raise DatabaseError(
                    f"migration {known[version].label} changed after it was "
                    "applied to this database; restore the original file"
                )
        return MigrationState(
            pending=[m for m in self.migrations if m.version not in applied],
            newer=sorted(set(applied) - set(known)),
        )

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
                f"{self.name} lacks migrations {state.describe_pending()}: run "
                "`digitalme migrate` first (deployments run it as their own step)"
            )
        if state.newer:
            log.warning(
                "database %s has migrations %s from a newer release; running on it "
                "(migrations only add)",
                self.name,
                state.newer,
            )
        return state

    async def migrate(self) -> list[Migration]:
        """Apply this release's pending migrations in one transaction: all or none.
        Returns those applied."""
        pending = (await self.migration_state()).pending
        if not pending:
            return []
        try:
            applied = await self.engine.apply_migrations(self.migrations)
        except self.errors as exc:
            names = ", ".join(m.label for m in pending)
            raise DatabaseError(
                f"migrating to {names} failed: {first_line(exc)}; nothing was applied, the "
                "database is as it was"
            ) from exc
        for migration in applied:
            log.info("applied migration %s", migration.label)
        return applied


def database_for(settings: Settings) -> Database:
    """The database the settings name: PostgreSQL at ``DIGITALME_DATABASE_URL`` (with
    ``DIGITALME_DATABASE_PASSWORD``) when it is set, else SQLite at ``DIGITALME_DB_PATH``."""
    return Database(settings.database)
