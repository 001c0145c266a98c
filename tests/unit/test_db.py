"""Migrations: applied once, in order, atomically; refused when they cannot be trusted."""

from __future__ import annotations

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
    migrations = [Migration(1, "good", "CREATE TABLE a (x INTEGER);"),
                  Migration(2, "bad", "CREATE TABLE b (y INTEGER); INSERT INTO nope VALUES (1);")]
    db = Database(tmp_path / "x.db", migrations)
    await db.open()
    try:
        with pytest.raises(DatabaseError, match="migration 0002_bad failed"):
            await db.migrate()
        assert set(await db.applied_migrations()) == {1}
        tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master")}
        assert "a" in tables and "b" not in tables  # the failed one left nothing behind
    finally:
        await db.close()


async def test_changed_or_unknown_migrations_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = Database(path, [Migration(1, "one", "CREATE TABLE a (x INTEGER);")])
    await db.open()
    await db.migrate()
    await db.close()

    changed = Database(path, [Migration(1, "one", "CREATE TABLE a (x TEXT);")])
    await changed.open()
    with pytest.raises(DatabaseError, match="changed after it was applied"):
        await changed.migrate()
    await changed.close()

    older = Database(path, [])
    await older.open()
    with pytest.raises(DatabaseError, match="newer DigitalMe"):
        await older.migrate()
    await older.close()


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
