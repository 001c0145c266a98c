"""Group commit: every write of the service runs in one thread, batched into transactions
that share one durable commit.

A write is a *job*, a plain function of a ``sqlite3.Connection`` (its SQL, no awaits in
the middle). Jobs queue up while the thread commits; it then takes all that are waiting
(up to :data:`MAX_BATCH`), opens one transaction, runs each job inside its own savepoint
(a job that raises is rolled back alone, the others keep their work), and commits once:
with ``synchronous=FULL`` that is one ``fsync`` of the WAL for the whole batch. Only then
is each job's caller given its result, so **a write is never reported done before it is
durable**, however many share its commit; if the commit itself fails, every job of the
batch gets the error and none is reported done.

Why: with one write transaction at a time driven from the event loop (``BEGIN``, each
statement, ``COMMIT`` as separate round trips to a database thread), writes queued
behind each other's round trips and fsyncs; under load (webhook bursts, the inbox worker,
concurrent chat turns) the lock, not the disk, was the limit. Here the thread runs a
whole batch without waiting for the event loop, and the loop hears back once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Jobs in one transaction at most: bounds how long one commit holds the write lock (other
# processes, e.g. `digitalme token create`, wait for it) and how late the first job of a
# very large batch hears back.
MAX_BATCH = 256

Job = Callable[[sqlite3.Connection], Any]


Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future[Any]


class GroupCommitter:
    """The writer thread and its connection. :meth:`start` opens it, :meth:`stop` drains
    the queue and closes it; :meth:`write` is safe from any task of the loop that started
    it."""

    def __init__(self, path: Path, pragmas: tuple[str, ...]) -> None:
        self.path = path
        self.pragmas = pragmas
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self.batches = 0  # transactions committed (tests and benches read them)
        self.jobs = 0  # jobs committed

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        opened: asyncio.Future[None] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,),
                                        name="digitalme-db-writer", daemon=True)
        self._thread.start()
        try:
            await opened
        except BaseException:
            await self._stopped
            self._thread = None
            raise

    async def stop(self) -> None:
        """Commit what is queued, then close the connection and end the thread."""
        if self._thread is None or self._stopped is None:
            return
        self._queue.put(None)
        await asyncio.shield(self._stopped)
        self._thread = None

    async def write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` in a write transaction; return its result once it is committed."""
        if self._thread is None or self._loop is None:
            raise sqlite3.ProgrammingError("the database writer is not running")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Pending(job, future))
        # A caller cancelled while it waits (a client gone) does not cancel the write: the
        # job was handed over and commits with its batch; only the answer is dropped.
        return await future

    # --- the thread ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in self.pragmas:
                conn.execute(f"PRAGMA {pragma}").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, opened: asyncio.Future[None]) -> None:
        assert self._loop is not None and self._stopped is not None
        loop, stopped = self._loop, self._stopped
        try:
            conn = self._connect()
        except BaseException as exc:
            failed: list[Outcome] = [(opened, None, exc), (stopped, None, None)]
            loop.call_soon_threadsafe(_settle, failed)
            return
        ready: list[Outcome] = [(opened, None, None)]
        loop.call_soon_threadsafe(_settle, ready)
        try:
            running = True
            while running:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        running = False
                        break
                    batch.append(more)
                outcomes = self._commit(conn, batch)
                loop.call_soon_threadsafe(_settle, outcomes)
        finally:
            conn.close()
            done: list[Outcome] = [(stopped, None, None)]
            loop.call_soon_threadsafe(_settle, done)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Pending],
                ) -> list[Outcome]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(p.future, None, exc) for p in batch]
        outcomes: list[Outcome] = []
        for pending in batch:
            try:
                conn.execute("SAVEPOINT job")
                value = pending.job(conn)
                conn.execute("RELEASE job")
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (disk full, I/O error):
                    # the jobs before this one lost their work too.
                    lost = sqlite3.OperationalError(f"the transaction was rolled back: {exc}")
                    return [(f, None, e or lost) for f, _, e in outcomes] + \
                        [(p.future, None, exc if p is pending else lost)
                         for p in batch[len(outcomes):]]
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                outcomes.append((pending.future, None, exc))
            else:
                outcomes.append((pending.future, value, None))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("a group commit of %d write(s) failed: %s", len(batch), exc)
            return [(f, None, e or exc) for f, _, e in outcomes]
        self.batches += 1
        self.jobs += len(batch)
        return outcomes


def _settle(outcomes: list[Outcome]) -> None:
    for future, value, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
