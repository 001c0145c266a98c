"""``digitalme migrate-data``: copy every row from one engine's database to an empty one
of the other, verified (docs/scale-out.md).

SQLite to PostgreSQL is how an owner moves when one host is outgrown; PostgreSQL to SQLite
is the way back. Both go the same way:

1. the target is migrated to this release's schema (``digitalme migrate``'s code) and must
   then hold no row at all: the command never merges into live data;
2. the source must have exactly this release's migrations (run ``digitalme migrate`` on it
   first), so both sides have the same tables and columns;
3. the source is read in one read-only transaction: a consistent snapshot, even of a live
   database (writes after it are not copied: stop the service, or take it out of rotation,
   before the final copy);
4. the rows are written in one transaction on the target, parents before children (the
   foreign keys' order), ids as they are; PostgreSQL's identity sequences are then moved
   past the largest id;
5. before that transaction commits, every table is read back from the target and compared
   with the source: row counts, and a SHA-256 over the rows in primary-key order, in a form
   both engines give the same (numbers of REAL columns as floats). Any difference rolls the
   whole copy back, and the target is as empty as before.

The table list and column types come from the SQLite side (``sqlite_master``,
``PRAGMA table_info``): the schema both engines share, as the migrations wrote it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DatabaseUrl
from .db import Database
from .engine import DatabaseError, first_line

Target = Path | DatabaseUrl
_SKIPPED = ("schema_migrations",)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    real_columns: frozenset[str]
    parents: frozenset[str]
    identity: bool  # an INTEGER PRIMARY KEY: an identity column on PostgreSQL


@dataclass(frozen=True)
class Copied:
    table: str
    rows: int
    sha256: str


def parse_target(raw: str) -> Target:
    """``sqlite:///path/to/file.db`` or ``postgresql://...``."""
    if raw.startswith("sqlite://"):
        path = raw.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise ValueError(f"a SQLite target is sqlite:///absolute/path.db, got {raw!r}")
        return Path(path)
    from .config import _database_url

    url = _database_url(raw)
    if url is None:
        raise ValueError("is empty")
    return url


def describe(target: Target) -> str:
    return f"sqlite://{target}" if isinstance(target, Path) else str(target)


def _schema(conn: sqlite3.Connection) -> list[Table]:
    """The shared tables, parents first."""
    names = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name"
        )
    ]
    tables = {}
    for name in names:
        if name in _SKIPPED:
            continue
        info = conn.execute(f'PRAGMA table_info("{name}")').fetchall()
        pk = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
        tables[name] = Table(
            name,
            tuple(r[1] for r in info),
            pk or tuple(r[1] for r in info),
            frozenset(r[1] for r in info if str(r[2]).upper() == "REAL"),
            frozenset(
                r[2] for r in conn.execute(f'PRAGMA foreign_key_list("{name}")') if r[2] != name
            ),
            len(pk) == 1 and any(r[1] == pk[0] and str(r[2]).upper() == "INTEGER" for r in info),
        )
    ordered: list[Table] = []
    while tables:
        ready = [t for t in tables.values() if not t.parents & set(tables)]
        if not ready:
            raise DatabaseError(f"foreign keys form a cycle among {sorted(tables)}")
        for table in sorted(ready, key=lambda t: t.name):
            ordered.append(tables.pop(table.name))
    return ordered


def _canonical(table: Table, rows: Sequence[Sequence[Any]]) -> Copied:
    """Count and SHA-256 of rows, in primary-key order, in a form both engines give."""
    position = {c: i for i, c in enumerate(table.columns)}
    real = [position[c] for c in table.real_columns]

    def normal(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for i in real:
            if values[i] is not None:
                values[i] = float(values[i])
        return values

    keys = [position[c] for c in table.primary_key]
    digest = hashlib.sha256()
    for row in sorted(
        (normal(r) for r in rows), key=lambda r: [(v is None, v) for v in (r[k] for k in keys)]
    ):
        digest.update(json.dumps(row, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return Copied(table.name, len(rows), digest.hexdigest())


class _Side:
    """One database, opened for the copy: read a table, write rows, inside one
    transaction. Both engines' connections answer the same SELECT."""

    conn: Any

    def read(self, table: Table) -> list[tuple[Any, ...]]:
        columns = ", ".join(f'"{c}"' for c in table.columns)
        return [tuple(r) for r in self.conn.execute(f'SELECT {columns} FROM "{table.name}"')]

    def write(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def after_writes(self, tables: list[Table]) -> None:
        """Set what follows the largest copied ids (PostgreSQL's sequences)."""


class _SqliteSide(_Side):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def write(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        columns = ", ".join(f'"{c}"' for c in table.columns)
        marks = ", ".join("?" * len(table.columns))
        self.conn.executemany(f'INSERT INTO "{table.name}" ({columns}) VALUES ({marks})', rows)


class _PgSide(_Side):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def write(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        columns = ", ".join(f'"{c}"' for c in table.columns)
        with (
            self.conn.cursor() as cursor,
            cursor.copy(f'COPY "{table.name}" ({columns}) FROM STDIN') as copy,
        ):
            for row in rows:
                copy.write_row(row)

    def after_writes(self, tables: list[Table]) -> None:
        for table in tables:
            if table.identity:
                key = table.primary_key[0]
                self.conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', '{key}'),"
                    f' COALESCE((SELECT MAX("{key}") FROM "{table.name}"), 0) + 1, false)'
                )


@contextmanager
def _opened(target: Target, *, read_only: bool) -> Iterator[_Side]:
    """A side in one transaction: a snapshot when reading; when writing, committed by the
    caller's ``commit`` flag (see :func:`copy_data`)."""
    if isinstance(target, Path):
        if read_only:
            conn = sqlite3.connect(f"file:{target}?mode=ro", uri=True, isolation_level=None)
        else:
            conn = sqlite3.connect(target, isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            yield _SqliteSide(conn)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
        return
    import psycopg

    from .postgres_engine import CONNECT_TIMEOUT_SECONDS

    with psycopg.connect(
        target.conninfo,
        password=target.password,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        autocommit=True,
    ) as pg:
        pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if read_only else "BEGIN")
        try:
            yield _PgSide(pg)
        finally:
            if pg.info.transaction_status != 0:  # not idle: roll back what was not committed
                pg.execute("ROLLBACK")


def _commit(side: _Side) -> None:
    if isinstance(side, _SqliteSide):
        side.conn.execute("COMMIT")
    elif isinstance(side, _PgSide):
        side.conn.execute("COMMIT")


async def _prepare(source: Target, target: Target) -> None:
    """The source has this release's migrations; the target gets them."""
    for where, migrate in ((source, False), (target, True)):
        db = Database(where)
        await db.open()
        try:
            if migrate:
                await db.migrate()
            state = await db.require_migrated()
            if state.newer:
                raise DatabaseError(
                    f"{db.name} has migrations {state.newer} of a newer release: copy with "
                    "that release's digitalme"
                )
        finally:
            await db.close()


def copy_data(source: Target, target: Target) -> list[Copied]:
    """Copy every row of ``source`` into ``target`` (migrated here, and empty), verified;
    returns what each table holds on both sides. Raises DatabaseError, leaving the target
    without any row, when anything does not match."""
    if isinstance(source, Path) == isinstance(target, Path):
        raise DatabaseError("copy from SQLite to PostgreSQL or back: both are the same engine")
    if isinstance(source, Path) and not source.exists():
        raise DatabaseError(f"{source} does not exist")
    asyncio.run(_prepare(source, target))
    sqlite_path = source if isinstance(source, Path) else target
    assert isinstance(sqlite_path, Path)
    with sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True) as conn:
        tables = _schema(conn)
    try:
        with _opened(source, read_only=True) as reader, _opened(target, read_only=False) as writer:
            for table in tables:
                if writer.read(table):
                    raise DatabaseError(
                        f"{describe(target)} is not empty (table {table.name} has rows): "
                        "migrate-data copies into an empty database only"
                    )
            copied = []
            for table in tables:
                rows = reader.read(table)
                writer.write(table, rows)
                copied.append(_canonical(table, rows))
            writer.after_writes(tables)
            for table, expected in zip(tables, copied, strict=True):
                found = _canonical(table, writer.read(table))
                if found != expected:
                    raise DatabaseError(
                        f"table {table.name}: copied {found.rows} rows (sha256 "
                        f"{found.sha256[:12]}), the source has {expected.rows} (sha256 "
                        f"{expected.sha256[:12]}); nothing was copied"
                    )
            _commit(writer)
    except DatabaseError:
        raise
    except Exception as exc:
        errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        try:
            import psycopg

            errors += (psycopg.Error,)
        except ImportError:  # pragma: no cover - psycopg is a dependency
            pass
        if isinstance(exc, errors):
            raise DatabaseError(f"copy failed: {first_line(exc)}; nothing was copied") from exc
        raise
    return copied
