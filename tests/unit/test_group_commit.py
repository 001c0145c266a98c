"""Group commit (digitalme.committer through Database.write): writes that queue up share
one transaction and one durable commit; no caller hears "done" before that commit; a job
that fails is rolled back alone; a commit that fails fails every job of its batch."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from digitalme.db import Database, Migration

SCHEMA = Migration(
    1,
    "test",
    """
CREATE TABLE parent (id INTEGER PRIMARY KEY);
CREATE TABLE item (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
CREATE TABLE child (id INTEGER PRIMARY KEY,
                    parent_id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
""",
)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "x.db", [SCHEMA])
    await database.open()
    await database.migrate()
    try:
        yield database
    finally:
        await database.close()


def committed(db: Database, sql: str) -> list[tuple[object, ...]]:
    """What another connection (another process, a crash's survivor) sees."""
    with sqlite3.connect(db.path) as conn:
        return conn.execute(sql).fetchall()


class Gate:
    """A job that holds the writer thread until released, so that writes queue up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sqlite3.Connection) -> str:
        self.entered.set()
        assert self.release.wait(10)
        conn.execute("INSERT INTO item (text) VALUES ('gate')")
        return "gate"


async def hold_writer(db: Database) -> tuple[Gate, asyncio.Task[str]]:
    gate = Gate()
    task = asyncio.create_task(db.write(gate))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    return gate, task


def insert(text: str) -> Callable[[sqlite3.Connection], int]:
    return lambda conn: conn.execute("INSERT INTO item (text) VALUES (?)", (text,)).lastrowid or 0


async def test_queued_writes_share_one_commit_and_answer_only_after_it(db: Database) -> None:
    gate, held = await hold_writer(db)
    batches = db.committer.batches if db.committer else -1
    writes = [asyncio.create_task(db.write(insert(f"m{n}"))) for n in range(20)]
    await asyncio.sleep(0.2)
    # Queued behind the open transaction: nobody was told "done", nothing is visible.
    assert not any(task.done() for task in writes)
    assert committed(db, "SELECT text FROM item") == []
    gate.release.set()
    assert await held == "gate"
    ids = await asyncio.gather(*writes)
    assert len(set(ids)) == 20
    # Each caller's row is committed by the time it hears back, and 21 writes took two
    # transactions: the gate's, and one for the 20 that queued behind it.
    assert len(committed(db, "SELECT text FROM item")) == 21
    assert db.committer is not None and db.committer.batches - batches == 2


async def test_a_failing_write_is_rolled_back_alone(db: Database) -> None:
    gate, held = await hold_writer(db)

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO item (text) VALUES ('half')")
        conn.execute("INSERT INTO item (text) VALUES ('gate')")  # UNIQUE violation

    before = asyncio.create_task(db.write(insert("before")))
    failing = asyncio.create_task(db.write(half_then_fail))
    after = asyncio.create_task(db.write(insert("after")))
    await asyncio.sleep(0.1)
    gate.release.set()
    await held
    await before
    with pytest.raises(sqlite3.IntegrityError):
        await failing
    await after
    assert sorted(r[0] for r in committed(db, "SELECT text FROM item")) == [
        "after",
        "before",
        "gate",
    ]


async def test_a_failed_commit_fails_every_write_of_its_batch(db: Database) -> None:
    # A deferred foreign key is checked at COMMIT: one orphan fails the whole transaction,
    # and no write of that batch may be reported done.
    await db.execute("INSERT INTO parent (id) VALUES (1)")
    gate, held = await hold_writer(db)
    good = asyncio.create_task(db.execute("INSERT INTO child (parent_id) VALUES (1)"))
    orphan = asyncio.create_task(db.execute("INSERT INTO child (parent_id) VALUES (99)"))
    await asyncio.sleep(0.1)
    gate.release.set()
    assert await held == "gate"  # its own batch, committed before the two queued
    for task in (good, orphan):
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            await task
    assert committed(db, "SELECT * FROM child") == []
    # The writer carries on with the next batch.
    assert await db.execute("INSERT INTO child (parent_id) VALUES (1)") > 0


async def test_a_write_that_ends_the_transaction_loses_only_its_batch(db: Database) -> None:
    gate, held = await hold_writer(db)

    def rogue(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # a bug: jobs must not manage the transaction

    victim = asyncio.create_task(db.write(insert("victim")))
    rolled_back = asyncio.create_task(db.write(rogue))
    await asyncio.sleep(0.1)
    gate.release.set()
    assert await held == "gate"
    with pytest.raises(sqlite3.OperationalError, match="rolled back"):
        await victim  # its work was in the transaction that the rogue job ended
    with pytest.raises(sqlite3.OperationalError):
        await rolled_back
    assert committed(db, "SELECT text FROM item") == [("gate",)]
    await db.execute("INSERT INTO item (text) VALUES ('later')")
    assert committed(db, "SELECT text FROM item") == [("gate",), ("later",)]


async def test_a_cancelled_caller_does_not_cancel_its_write(db: Database) -> None:
    gate, held = await hold_writer(db)
    write = asyncio.create_task(db.write(insert("kept")))
    await asyncio.sleep(0.1)
    write.cancel()
    gate.release.set()
    await held
    with pytest.raises(asyncio.CancelledError):
        await write
    await db.execute("INSERT INTO item (text) VALUES ('next')")  # after the batch above
    assert sorted(r[0] for r in committed(db, "SELECT text FROM item")) == ["gate", "kept", "next"]


async def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db", [SCHEMA])
    await db.open()
    await db.migrate()
    gate, held = await hold_writer(db)
    queued = [asyncio.create_task(db.write(insert(f"q{n}"))) for n in range(5)]
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(db.close())
    await asyncio.sleep(0.1)
    gate.release.set()
    await closing
    await asyncio.gather(held, *queued)
    assert len(committed(db, "SELECT text FROM item")) == 6
    with pytest.raises(Exception, match="not open"):
        await db.execute("INSERT INTO item (text) VALUES ('late')")
