"""Group commit: every write of the service runs in one thread, batched into transactions
that share one durable commit.

A write is a *job*, a plain function of a DB-API connection (its SQL, no awaits in the
middle): a ``sqlite3.Connection``, or for PostgreSQL a psycopg connection behind the
adapter of :mod:`digitalme.postgres_engine`. Jobs queue up while the thread commits; it
then takes all that are waiting (up to :data:`MAX_BATCH`), opens one transaction, runs
each job inside its own savepoint
(a job that raises is rolled back alone, the others keep their work), and commits once:
with SQLite's ``synchronous=FULL`` that is one ``fsync`` of the WAL for the whole batch, with
PostgreSQL one round trip and one WAL flush for the whole batch. Only then
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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Jobs in one transaction at most: bounds how long one commit holds the write lock (other
# processes, e.g. `digitalme token create`, wait for it) and how late the first job of a
# very large batch hears back.
MAX_BATCH = 256

Job = Callable[[Any], Any]


class WriterSession(Protocol):
    """The writer thread's connection, as the committer drives it; one per engine
    (:mod:`digitalme.sqlite_engine`, :mod:`digitalme.postgres_engine`). Made and used only
    in the writer thread."""

    errors: tuple[type[Exception], ...]  # what the engine's driver raises

    @property
    def connection(self) -> Any:
        """What each job is given."""

    def begin(self) -> None:
        """Open a write transaction (reconnecting first when the engine can and must)."""

    def command(self, sql: str) -> None:
        """Run a transaction-control statement (SAVEPOINT, RELEASE, ROLLBACK TO, COMMIT,
        ROLLBACK)."""

    def in_transaction(self) -> bool:
        """False once the engine has rolled the whole transaction back by itself."""

    def lost(self, cause: BaseException) -> Exception:
        """The error each job of a batch hears when the whole transaction was lost."""

    def close(self) -> None: ...


Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future[Any]


class GroupCommitter:
    """The writer thread and its connection. :meth:`start` opens it, :meth:`stop` drains
    the queue and closes it; :meth:`write` is safe from any task of the loop that started
    it."""

    def __init__(self, connect: Callable[[], WriterSession]) -> None:
        self._open_session = connect  # called in the writer thread
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
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="digitalme-db-writer", daemon=True
        )
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

    async def write(self, job: Callable[[Any], T]) -> T:
        """Run ``job`` in a write transaction; return its result once it is committed."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("the database writer is not running")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Pending(job, future))
        # A caller cancelled while it waits (a client gone) does not cancel the write: the
        # job was handed over and commits with its batch; only the answer is dropped.
        return await future

    # --- the thread ------------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[None]) -> None:
        assert self._loop is not None and self._stopped is not None
        loop, stopped = self._loop, self._stopped
        try:
            session = self._open_session()
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
                outcomes = self._commit(session, batch)
                loop.call_soon_threadsafe(_settle, outcomes)
        finally:
            session.close()
            done: list[Outcome] = [(stopped, None, None)]
            loop.call_soon_threadsafe(_settle, done)

    def _commit(self, session: WriterSession, batch: list[_Pending]) -> list[Outcome]:
        try:
            session.begin()
        except session.errors as exc:
            return [(p.future, None, exc) for p in batch]
        conn = session.connection
        outcomes: list[Outcome] = []
        for pending in batch:
            try:
                session.command("SAVEPOINT job")
                value = pending.job(conn)
                session.command("RELEASE job")
            except Exception as exc:
                if not session.in_transaction():
                    # The engine rolled the whole transaction back (SQLite: disk full, I/O
                    # error; PostgreSQL: the connection lost): the jobs before this one
                    # lost their work too.
                    lost = session.lost(exc)
                    return [(f, None, e or lost) for f, _, e in outcomes] + [
                        (p.future, None, exc if p is pending else lost)
                        for p in batch[len(outcomes) :]
                    ]
                session.command("ROLLBACK TO job")
                session.command("RELEASE job")
                outcomes.append((pending.future, None, exc))
            else:
                outcomes.append((pending.future, value, None))
        try:
            session.command("COMMIT")
        except session.errors as exc:
            if session.in_transaction():
                session.command("ROLLBACK")
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
