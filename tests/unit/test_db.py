"""Migrations: applied once, in order, atomically; refused when they cannot be trusted."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from digitalme.db import Database, DatabaseError, Migration, bundled_migrations


async def test_bundled_migrations_apply_once(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    await db.open()
    try:
        applied = await db.migrate()
        assert [m.version for m in applied] == [m.version for m in bundled_migrations()]
        assert await db.migrate() == []
        assert await db.pending_migrations() == []
        mode = await db.fetchone("PRAGMA journal_mode")
        assert mode is not None and mode[0] == "wal"
    finally:
        await db.close()


async def test_failed_migration_rolls_back_and_says_which(tmp_path: Path) -> None:
    migrations = [
        Migration(1, "good", "CREATE TABLE a (x INTEGER);"),
        Migration(2, "bad", "CREATE TABLE b (y INTEGER); INSERT INTO nope VALUES (1);"),
    ]
    db = Database(tmp_path / "x.db", migrations)
    await db.open()
    try:
        with pytest.raises(DatabaseError, match=r"0001_good, 0002_bad failed.*nothing was applied"):
            await db.migrate()
        # A release's migrations apply together or not at all: the failure left nothing.
        assert await db.applied_migrations() == {}
        tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master")}
        assert "a" not in tables and "b" not in tables
        assert [m.version for m in await db.pending_migrations()] == [1, 2]
    finally:
        await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """Where a new, empty database is: a SQLite file, or a PostgreSQL database of the
    session's test cluster."""
    if request.param == "sqlite":
        return tmp_path / "x.db"
    return request.getfixturevalue("postgres_database")


async def test_changed_migrations_are_refused_newer_ones_tolerated(empty_database: Path) -> None:
    path = empty_database
    db = Database(path, [Migration(1, "one", "CREATE TABLE a (x INTEGER);")])
    await db.open()
    await db.migrate()
    await db.close()

    changed = Database(path, [Migration(1, "one", "CREATE TABLE a (x TEXT);")])
    await changed.open()
    with pytest.raises(DatabaseError, match="changed after it was applied"):
        await changed.migrate()
    await changed.close()

    # An older release on a newer release's database (a rollback of the code alone): its
    # own migrations are all there, the newer one is reported, nothing is refused.
    older = Database(path, [])
    await older.open()
    try:
        assert await older.migrate() == []
        state = await older.require_migrated()
        assert state.pending == [] and state.newer == [1]
    finally:
        await older.close()


async def test_an_unmigrated_database_is_refused_naming_the_command(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db", [Migration(1, "one", "CREATE TABLE a (x INTEGER);")])
    await db.open()
    try:
        with pytest.raises(
            DatabaseError, match=r"lacks migrations 0001_one: run `digitalme migrate`"
        ):
            await db.require_migrated()
        await db.migrate()
        assert (await db.require_migrated()).pending == []
    finally:
        await db.close()


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not sqlite" * 100)
    db = Database(path)
    with pytest.raises((DatabaseError, sqlite3.DatabaseError)):
        await db.open()
        await db.migrate()
    await db.close()


async def test_missing_directory_is_named(tmp_path: Path) -> None:
    db = Database(tmp_path / "nowhere" / "x.db")
    with pytest.raises(DatabaseError, match="does not exist"):
        await db.open()


# Statements an older release cannot run beside: its code would miss a table or a column.
_DESTRUCTIVE = re.compile(
    r"\b(DROP\s+(TABLE|COLUMN|INDEX|VIEW|TRIGGER)|RENAME\s+(TO|COLUMN))\b", re.IGNORECASE
)


def destructive_statements(sql: str) -> list[str]:
    code = re.sub(r"--[^\n]*", "", sql)
    return [m[0] for m in _DESTRUCTIVE.finditer(code)]


def test_the_guard_catches_destructive_changes() -> None:
    assert destructive_statements("ALTER TABLE a DROP COLUMN b;") == ["DROP COLUMN"]
    assert destructive_statements("drop table a") == ["drop table"]
    assert destructive_statements("ALTER TABLE a RENAME TO b") == ["RENAME TO"]
    assert destructive_statements("ALTER TABLE a ADD COLUMN b TEXT; -- drop table later") == []


def test_migrations_only_add() -> None:
    """A rollback of the code alone runs the previous release on the newer schema, and
    upgrades migrate while the previous release still serves (docs/maintenance.md): a
    migration may add tables, columns and indexes, never drop or rename them. A change
    that must remove something ships its removal a release after the code stopped using it.
    """
    for migration in bundled_migrations():
        assert destructive_statements(migration.sql) == [], (
            f"{migration.version:04d}_{migration.name} drops or renames"
        )
