"""The background worker: processes inbox deliveries after they were acknowledged.

Owned by the app's cleanup context. At start it makes items that a crash left
``processing`` due again; then it claims due items (oldest first, at most
``DIGITALME_WORKER_CONCURRENCY`` at a time), hands each to its channel's processor, and
records the outcome. A new delivery wakes it at once; otherwise it sleeps until the next
item is due, or ``DIGITALME_WORKER_POLL_SECONDS`` at most, so an item set back to pending
by ``digitalme inbox retry`` in another process is seen too.

How an attempt ends (the processor's return value or exception):

=============================  ==============================================================
returns ``Outcome``            done or ignored, with a note
ClaudeUnavailable              pending again at its Retry-After; the attempt is given back
BudgetExhausted, PersonaMissing  pending again later; the attempt is given back
TransientError                 pending again with exponential backoff (or its Retry-After)
PermanentError, ClaudeRejected   failed, error kept
anything else (a bug)          like a transient error, logged with its traceback
=============================  ==============================================================

An item that uses up ``DIGITALME_INBOX_MAX_ATTEMPTS`` fails with its last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from .chat import BudgetExhausted, PersonaMissing
from .config import Settings
from .inbox import InboxItem, InboxStore
from .llm import ClaudeRejected, ClaudeUnavailable
from .metrics import Metrics
from .outbound import PermanentError, TransientError

log = logging.getLogger(__name__)

PERSONA_MISSING_RETRY_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Outcome:
    """How a processor finished an item: ``done`` or ``ignored``, with a short note."""

    status: str
    note: str | None = None

    @classmethod
    def done(cls, note: str | None = None) -> Outcome:
        return cls("done", note)

    @classmethod
    def ignored(cls, reason: str) -> Outcome:
        return cls("ignored", reason)


Processor = Callable[[InboxItem], Awaitable[Outcome]]


def retry_delay(settings: Settings, attempts: int) -> float:
    """Backoff before the next attempt, after ``attempts`` attempts."""
    return float(min(settings.inbox_retry_max_seconds,
                     settings.inbox_retry_base_seconds * 2 ** max(0, attempts - 1)))


def _age_seconds(received_at: str) -> float:
    try:
        return max(0.0, time.time()
                   - datetime.fromisoformat(received_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0.0


class Worker:
    def __init__(self, settings: Settings, inbox: InboxStore, metrics: Metrics,
                 processors: Mapping[str, Processor]) -> None:
        self.settings = settings
        self.inbox = inbox
        self.metrics = metrics
        self.processors = dict(processors)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def busy(self) -> int:
        return len(self._running)

    def wake(self) -> None:
        """A new delivery is in: look at once."""
        self._wake.set()

    async def start(self) -> None:
        recovered = await self.inbox.recover()
        if recovered:
            log.warning("%d inbox item(s) were interrupted by a stop; processing them again",
                        recovered)
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="inbox-worker")

    async def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Stop claiming; let running items finish within the grace, then cancel them
        (they stay ``processing`` and are recovered at the next start)."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._running:
            _done, pending = await asyncio.wait(set(self._running.values()),
                                                timeout=grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("stopped %d inbox item(s) mid-processing; they will be retried "
                            "at the next start", len(pending))
                await asyncio.wait(pending)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                self._wake.clear()
                await self._claim_and_dispatch()
                await self._sleep()
            except asyncio.CancelledError:
                raise
            except Exception:
                # e.g. the database briefly locked or full: keep the worker alive.
                log.exception("inbox worker loop failed; trying again shortly")
                await asyncio.sleep(min(5.0, self.settings.worker_poll_seconds))

    async def _claim_and_dispatch(self) -> None:
        free = self.settings.worker_concurrency - len(self._running)
        if free <= 0:
            return
        items = await self.inbox.claim(free, exclude=frozenset(self._running))
        for item in items:
            task = asyncio.create_task(self._process(item), name=f"inbox-{item.id}")
            self._running[item.id] = task
            task.add_done_callback(functools.partial(self._finished, item.id))

    def _finished(self, item_id: int, _task: asyncio.Task[None]) -> None:
        self._running.pop(item_id, None)
        self._wake.set()  # a slot is free

    async def _sleep(self) -> None:
        timeout = self.settings.worker_poll_seconds
        if len(self._running) < self.settings.worker_concurrency:
            due_in = await self.inbox.next_due_in()
            if due_in is not None:
                timeout = min(timeout, due_in)
        if timeout <= 0 and len(self._running) < self.settings.worker_concurrency:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.01))

    async def process_now(self, item: InboxItem) -> None:
        """Process one claimed item (the loop does this; tests may call it)."""
        await self._process(item)

    async def _process(self, item: InboxItem) -> None:
        channel = item.channel
        started = time.monotonic()
        try:
            processor = self.processors.get(channel)
            if processor is None:
                await self._retry_or_fail(item, f"channel {channel!r} is not configured "
                                          "in this service; it is kept until it is")
                return
            outcome = await processor(item)
        except asyncio.CancelledError:
            raise
        except ClaudeUnavailable as exc:
            await self._defer(item, exc.retry_after, f"Claude unavailable: {exc}")
        except BudgetExhausted as exc:
            await self._defer(item, exc.retry_after, "the daily token budget is spent")
        except PersonaMissing as exc:
            await self._defer(item, PERSONA_MISSING_RETRY_SECONDS, str(exc))
        except (PermanentError, ClaudeRejected) as exc:
            await self._fail(item, str(exc))
        except TransientError as exc:
            await self._retry_or_fail(item, str(exc), retry_after=exc.retry_after)
        except Exception as exc:
            log.exception("processing inbox item %d (%s) failed", item.id, channel)
            await self._retry_or_fail(item, f"{type(exc).__name__}: {exc}")
        else:
            if outcome.status == "ignored":
                await self.inbox.ignore(item.id, outcome.note or "nothing to do")
            else:
                await self.inbox.complete(item.id, outcome.note)
                self.metrics.inbox_completion_latency.labels(channel).observe(
                    _age_seconds(item.received_at))
            self.metrics.inbox_processed.labels(channel, outcome.status).inc()
            log.info("inbox item %d (%s %s) %s%s", item.id, channel, item.kind,
                     outcome.status, f": {outcome.note}" if outcome.note else "")
        finally:
            self.metrics.inbox_attempt_latency.labels(channel).observe(
                time.monotonic() - started)

    async def _defer(self, item: InboxItem, delay: float, error: str) -> None:
        delay = max(delay, self.settings.inbox_retry_base_seconds)
        await self.inbox.retry_later(item.id, delay, error, count_attempt=False)
        self.metrics.inbox_processed.labels(item.channel, "deferred").inc()
        log.warning("inbox item %d (%s) deferred %.0fs: %s", item.id, item.channel, delay,
                    error)

    async def _fail(self, item: InboxItem, error: str) -> None:
        await self.inbox.fail(item.id, error)
        self.metrics.inbox_processed.labels(item.channel, "failed").inc()
        log.error("inbox item %d (%s %s) failed: %s; `digitalme inbox retry %d` tries again",
                  item.id, item.channel, item.kind, error, item.id)

    async def _retry_or_fail(self, item: InboxItem, error: str, *,
                             retry_after: float | None = None) -> None:
        if item.attempts >= self.settings.inbox_max_attempts:
            await self._fail(item, f"gave up after {item.attempts} attempts: {error}")
            return
        delay = max(retry_delay(self.settings, item.attempts), retry_after or 0.0)
        await self.inbox.retry_later(item.id, delay, error)
        self.metrics.inbox_processed.labels(item.channel, "retry").inc()
        log.warning("inbox item %d (%s) attempt %d failed, retrying in %.1fs: %s", item.id,
                    item.channel, item.attempts, delay, error)
