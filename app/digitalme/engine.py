"""What both database engines are (:mod:`digitalme.sqlite_engine`,
:mod:`digitalme.postgres_engine`) and what they share with :mod:`digitalme.db`, which
chooses one: the connection protocols an engine drives, its errors, and the numbered
migrations both apply. Below the engines, so that they need nothing from the module that
picks them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .committer import GroupCommitter

T = TypeVar("T")

# 0001_initial.sql; 0001_initial.postgresql.sql is that migration's variant for one engine.
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.(sqlite|postgresql))?\.sql$")


class DatabaseError(Exception):
    """The database cannot be used: not writable, not migrated, or newer than this code."""


class Row(Protocol):
    """A result row: by position (``row[0]``) or column name (``row["id"]``), and
    ``dict(row)``; ``sqlite3.Row`` and :class:`digitalme.postgres_engine.PgRow` are both."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...

    def __len__(self) -> int: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class Connection(Protocol):
    """What a write job gets: the part of DB-API both engines' connections offer, with
    ``?`` placeholders on both."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


class Engine(Protocol):
    """One engine's side of :class:`Database`."""

    name: str  # "sqlite" or "postgresql"
    errors: tuple[type[Exception], ...]  # what its driver raises
    # A clause that makes a SELECT of rows to update skip rows another transaction has
    # locked (PostgreSQL's FOR UPDATE SKIP LOCKED); empty where one writer is all there is.
    skip_locked: str
    # The function that makes a JSON object of (key, value, ...) arguments, as JSON text.
    json_object: str
    # Whether several processes may use the database at once (several app hosts): then a
    # starting process must not take over what the others are doing.
    shared: bool

    def describe(self) -> str:
        """The database, for messages (a path, or a URL without its password)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def fetchall(self, sql: str, params: tuple[Any, ...]) -> list[Row]: ...

    async def lookup(self, sql: str, params: tuple[Any, ...]) -> list[Row]: ...

    async def write(self, job: Callable[[Connection], T]) -> T: ...

    async def table_exists(self, name: str) -> bool: ...

    async def apply_migrations(
        self,
        migrations: Sequence[Migration],
    ) -> list[Migration]:
        """Apply those of ``migrations`` the database lacks, recording each in
        schema_migrations, in one transaction; return those applied."""

    async def size_bytes(self) -> int: ...

    @property
    def committer(self) -> GroupCommitter | None:
        """The writer (None while closed)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    # An engine's own text of this migration, when the shared one cannot serve it
    # (NNNN_name.<engine>.sql next to NNNN_name.sql; docs/maintenance.md).
    variants: dict[str, str] = field(default_factory=dict)

    @property
    def checksum(self) -> str:
        """Of the shared file as shipped, whatever an engine makes of it (postgres_engine
        translates its column types): one checksum per migration on both engines."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def sql_for(self, engine: str) -> str:
        return self.variants.get(engine, self.sql)

    def checksum_for(self, engine: str) -> str:
        """What ``schema_migrations`` records on ``engine``: the checksum of the file that
        engine ran (its variant's, when it has one)."""
        return hashlib.sha256(self.sql_for(engine).encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def bundled_migrations() -> list[Migration]:
    """The migrations shipped in ``digitalme/migrations``, in order."""
    found = []
    variants: dict[tuple[int, str], dict[str, str]] = {}
    for entry in resources.files("digitalme.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if not match:
            continue
        key, text = (int(match[1]), match[2]), entry.read_text(encoding="utf-8")
        if match[3]:
            variants.setdefault(key, {})[match[3]] = text
        else:
            found.append(Migration(*key, text, variants.setdefault(key, {})))
    orphans = sorted(set(variants) - {(m.version, m.name) for m in found})
    if orphans:
        raise DatabaseError(f"engine variants without their shared migration: {orphans}")
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise DatabaseError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


@dataclass(frozen=True)
class MigrationState:
    pending: list[Migration]
    newer: list[int]  # applied versions this release does not know (a newer release's)

    def describe_pending(self) -> str:
        return ", ".join(m.label for m in self.pending)


def first_line(exc: BaseException) -> str:
    """An error's message on one line (PostgreSQL's carry the statement and a caret on
    more lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
