"""Reading and changing a test's database behind the app's back, on either engine: what a
test that checks the stored rows, or ages them, needs. SQL with ``?`` placeholders, as the
app writes it; rows come back as plain tuples."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from digitalme.config import DatabaseUrl

Target = Path | DatabaseUrl


def rows(target: Target, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement in its own committed transaction; its rows, if any."""
    if isinstance(target, Path):
        import sqlite3

        with sqlite3.connect(target) as conn:
            return conn.execute(sql, tuple(params)).fetchall()
    import psycopg

    from digitalme.postgres_engine import to_pyformat

    with psycopg.connect(target.conninfo, autocommit=True) as pg:
        cursor = pg.execute(to_pyformat(sql), tuple(params))
        return cursor.fetchall() if cursor.description else []


def foreign_key_violations(target: Target) -> list[tuple[Any, ...]]:
    """Rows that break a foreign key. SQLite checks them with a pragma; PostgreSQL enforces
    them at every statement (the schema defers none), so it has none to report."""
    if isinstance(target, Path):
        return rows(target, "PRAGMA foreign_key_check")
    return []


def many(target: Target, sql: str, params: Iterable[Sequence[Any]]) -> None:
    """Run one statement for each parameter set, in one committed transaction."""
    if isinstance(target, Path):
        import sqlite3

        with sqlite3.connect(target) as conn:
            conn.executemany(sql, [tuple(p) for p in params])
        return
    import psycopg

    from digitalme.postgres_engine import to_pyformat

    with psycopg.connect(target.conninfo) as pg, pg.cursor() as cursor:
        cursor.executemany(to_pyformat(sql), [tuple(p) for p in params])
