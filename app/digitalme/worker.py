"""The background worker: processes inbox deliveries after they were acknowledged.

Owned by the app's cleanup context. At start it makes items that a crash left
``processing`` due again (on a database several processes share, only those of processes
that are gone: it keeps its own row in ``workers`` fresh, and takes back the items of
workers whose rows went stale, at start and while it runs; :mod:`digitalme.inbox`); then
it claims due items (oldest first, at most
``DIGITALME_WORKER_CONCURRENCY`` claimed and unfinished at a time), hands each to its
channel's processor, and records the outcome. A new delivery wakes it at once; otherwise it
sleeps until the next item is due, or ``DIGITALME_WORKER_POLL_SECONDS`` at most, so an item
set back to pending by ``digitalme inbox retry`` in another process is seen too.

Requests come first: webhook acknowledgements (and the API) share the event loop with
the worker, and a platform waits for its acknowledgement (Slack for 3 s) while a reply may
come later. A probe measures how late the loop runs a timer; while it lags and requests
keep coming (they queue behind the worker's work), the worker halves how many items it
lets run at once, down to none (items already started finish), and adds one back each
time the loop is prompt again or no request came. Paused, it leaves the loop to the
requests, which then find it prompt, so it goes on a little at a time even under a steady
flood; a burst is acknowledged first and answered at full speed right after.
``digitalme_inbox_worker_slots`` shows the current number.

Items of one conversation (a Telegram chat, a Slack thread, a GitHub issue: the lane the
channel gave the delivery when it came, ``InboxItem.lane``) are processed one at a time,
in the order they were received, so a conversation's replies come in the order of its
messages and its turns never race; items of different conversations run side by side.
Across processes sharing a database the claim sees to it (:meth:`InboxStore.claim` takes
no delivery while an earlier one of its conversation is due or with another process);
within this one, each lane's task works through its items in order. An item that fails
and is retried later does not hold its conversation up: the next ones go on, and the
retried message reaches Claude after them (the chat service asks it last).

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
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from .chat import BudgetExhausted, PersonaMissing
from .config import Settings
from .inbox import LEASE_SECONDS, ClaimLost, InboxItem, InboxStore
from .llm import ClaudeRejected, ClaudeUnavailable
from .metrics import Metrics
from .outbound import PermanentError, TransientError

log = logging.getLogger(__name__)

PERSONA_MISSING_RETRY_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0
# The lag probe: how often it looks, and the lateness (seconds) above which the worker
# backs off and below which it speeds up again.
LAG_PROBE_SECONDS = 0.05
LAG_BACK_OFF_SECONDS = 0.02
LAG_PROMPT_SECONDS = 0.005


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
    return float(
        min(
            settings.inbox_retry_max_seconds,
            settings.inbox_retry_base_seconds * 2 ** max(0, attempts - 1),
        )
    )


def _age_seconds(received_at: str) -> float:
    try:
        return max(
            0.0,
            time.time() - datetime.fromisoformat(received_at.replace("Z", "+00:00")).timestamp(),
        )
    except ValueError:
        return 0.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        inbox: InboxStore,
        metrics: Metrics,
        processors: Mapping[str, Processor],
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.metrics = metrics
        self.processors = dict(processors)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        # Claimed and not finished: item id -> its lane; each lane's task works through
        # its queue in order.
        self._claimed: dict[int, str] = {}
        self._queues: dict[str, collections.deque[InboxItem]] = {}
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        # How many items may be processed at once now (see the module's docstring), how
        # many are, and a signal that one more may start.
        self.slots = settings.worker_concurrency
        self._active = 0
        self._slot_freed = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None
        metrics.inbox_worker_slots.set(self.slots)
        # Who claims (inbox.claimed_by; new at every start, so that what a stopped run held
        # is not taken for the new run's), and whether others claim from the same inbox.
        self.id = ""
        self.shared = inbox.db.shared
        self._lease_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def busy(self) -> int:
        """Items claimed and not finished (processing, or waiting for their lane)."""
        return len(self._claimed)

    def wake(self) -> None:
        """A new delivery is in: look at once."""
        self._wake.set()

    async def start(self) -> None:
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        if self.shared:
            await self.inbox.heartbeat(self.id)
        recovered = await self.inbox.recover(
            alive_since=time.time() - LEASE_SECONDS if self.shared else None
        )
        if recovered:
            log.warning(
                "%d inbox item(s) were interrupted by a stop; processing them again", recovered
            )
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="inbox-worker")
        self._probe_task = asyncio.create_task(self._probe(), name="inbox-worker-probe")
        if self.shared:
            self._lease_task = asyncio.create_task(self._keep_lease(), name="inbox-lease")

    async def _keep_lease(self) -> None:
        """Several processes: say this one is alive, and take back the items of those
        that are not (a host that died holds its claims until then)."""
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                await self.inbox.heartbeat(self.id)
                recovered = await self.inbox.recover(alive_since=time.time() - LEASE_SECONDS)
            except Exception:
                log.exception("inbox heartbeat failed; trying again in %.0f s", LEASE_SECONDS / 3)
                continue
            if recovered:
                log.warning("took back %d inbox item(s) of an app process that is gone", recovered)
                self.wake()

    async def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Stop claiming; give back claimed items that have not started; let running items
        finish within the grace, then cancel them (they stay ``processing`` and are
        recovered at the next start, or on a shared database by another process)."""
        self._stopping = True
        # Before any await, so that no lane takes another item meanwhile.
        waiting = [item.id for queue in self._queues.values() for item in queue]
        for queue in self._queues.values():
            queue.clear()
        self._wake.set()
        self._slot_freed.set()  # lanes waiting for a slot see the stop
        for task in (self._loop_task, self._probe_task, self._lease_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._probe_task = self._lease_task = None
        if waiting:
            await self.inbox.release(waiting)
            for item_id in waiting:
                self._claimed.pop(item_id, None)
        if self._lane_tasks:
            _done, pending = await asyncio.wait(
                set(self._lane_tasks.values()), timeout=grace_seconds
            )
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "stopped %d inbox item(s) mid-processing; they will be retried "
                    "at the next start",
                    len(pending),
                )
                await asyncio.wait(pending)
        if self.shared:
            # Gone: the other processes take back what it still held at their next beat.
            try:
                await self.inbox.leave(self.id)
            except Exception:
                log.exception(
                    "could not sign the inbox worker off; its items are taken "
                    "back once its lease runs out"
                )

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

    def _room(self) -> int:
        """How many items to claim now: none while busy, else every free slot. Busy means
        fewer than a quarter of the slots free, so a worker at full tilt claims in batches
        (one write for several items) rather than one item per finished one."""
        concurrency = self.settings.worker_concurrency
        free = concurrency - len(self._claimed)
        return free if free > 0 and (not self._claimed or free >= concurrency // 4) else 0

    async def _claim_and_dispatch(self) -> None:
        free = self._room()
        if not free:
            return
        items = await self.inbox.claim(free, exclude=frozenset(self._claimed), owner=self.id)
        for item in items:
            self._dispatch(item)

    @staticmethod
    def _lane(item: InboxItem) -> str:
        return item.lane if item.lane is not None else f"item:{item.id}"

    def _dispatch(self, item: InboxItem) -> None:
        lane = self._lane(item)
        self._claimed[item.id] = lane
        queue = self._queues.get(lane)
        if queue is not None:
            queue.append(item)  # its lane is busy with an earlier item of the conversation
            return
        self._queues[lane] = collections.deque([item])
        task = asyncio.create_task(self._work_lane(lane), name=f"inbox-lane-{lane}")
        self._lane_tasks[lane] = task

    async def _work_lane(self, lane: str) -> None:
        queue = self._queues[lane]
        try:
            while queue:
                while self._active >= self.slots and not self._stopping:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                if not queue:
                    return  # stop() gave its items back
                item = queue.popleft()
                self._active += 1
                try:
                    await self._process(item)
                finally:
                    self._active -= 1
                    self._claimed.pop(item.id, None)
                    self._slot_freed.set()
                    self._wake.set()  # a slot is free
        finally:
            del self._queues[lane]
            del self._lane_tasks[lane]

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started, answered = loop.time(), self.metrics.http.answered
            await asyncio.sleep(LAG_PROBE_SECONDS)
            self.adjust(
                loop.time() - started - LAG_PROBE_SECONDS,
                requests=self.metrics.http.answered - answered,
            )

    def adjust(self, lag: float, *, requests: int) -> None:
        """Fewer items at once (down to none) while the loop runs ``lag`` seconds late with
        ``requests`` coming in; more when it is prompt or nobody is waiting (a loop slowed by the
        machine, or by the worker alone, is no reason to answer deliveries later)."""
        if lag > LAG_BACK_OFF_SECONDS and requests:
            self.slots //= 2
        elif (
            lag < LAG_PROMPT_SECONDS or not requests
        ) and self.slots < self.settings.worker_concurrency:
            self.slots += 1
            self._slot_freed.set()
        else:
            return
        self.metrics.inbox_worker_slots.set(self.slots)

    async def _sleep(self) -> None:
        timeout = self.settings.worker_poll_seconds
        room = self._room() > 0
        if room:
            due_in = await self.inbox.next_due_in()
            if due_in is not None:
                timeout = min(timeout, due_in)
        if timeout <= 0 and room:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.01))

    async def process_now(self, item: InboxItem) -> None:
        """Process one claimed item (the loop does this; tests may call it)."""
        await self._process(item)

    async def _process(self, item: InboxItem) -> None:
        try:
            await self._attempt(item)
        except ClaimLost:
            # This process stalled past its lease and another took the item back: it is
            # that one's now, and nothing more is written or sent for it here.
            self.metrics.inbox_processed.labels(item.channel, "taken_over").inc()
            log.warning(
                "inbox item %d (%s): taken over by another worker while this one had it "
                "(this process did not renew its lease in time); left to that one",
                item.id,
                item.channel,
            )

    async def _attempt(self, item: InboxItem) -> None:
        channel = item.channel
        started = time.monotonic()
        try:
            processor = self.processors.get(channel)
            if processor is None:
                await self._retry_or_fail(
                    item,
                    f"channel {channel!r} is not configured "
                    "in this service; it is kept until it is",
                )
                return
            outcome = await processor(item)
        except (asyncio.CancelledError, ClaimLost):
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
                    _age_seconds(item.received_at)
                )
            self.metrics.inbox_processed.labels(channel, outcome.status).inc()
            log.info(
                "inbox item %d (%s %s) %s%s",
                item.id,
                channel,
                item.kind,
                outcome.status,
                f": {outcome.note}" if outcome.note else "",
            )
        finally:
            self.metrics.inbox_attempt_latency.labels(channel).observe(time.monotonic() - started)

    async def _defer(self, item: InboxItem, delay: float, error: str) -> None:
        delay = max(delay, self.settings.inbox_retry_base_seconds)
        await self.inbox.retry_later(item.id, delay, error, count_attempt=False)
        self.metrics.inbox_processed.labels(item.channel, "deferred").inc()
        log.warning("inbox item %d (%s) deferred %.0fs: %s", item.id, item.channel, delay, error)

    async def _fail(self, item: InboxItem, error: str) -> None:
        await self.inbox.fail(item.id, error)
        self.metrics.inbox_processed.labels(item.channel, "failed").inc()
        log.error(
            "inbox item %d (%s %s) failed: %s; `digitalme inbox retry %d` tries again",
            item.id,
            item.channel,
            item.kind,
            error,
            item.id,
        )

    async def _retry_or_fail(
        self, item: InboxItem, error: str, *, retry_after: float | None = None
    ) -> None:
        if item.attempts >= self.settings.inbox_max_attempts:
            await self._fail(item, f"gave up after {item.attempts} attempts: {error}")
            return
        delay = max(retry_delay(self.settings, item.attempts), retry_after or 0.0)
        await self.inbox.retry_later(item.id, delay, error)
        self.metrics.inbox_processed.labels(item.channel, "retry").inc()
        log.warning(
            "inbox item %d (%s) attempt %d failed, retrying in %.1fs: %s",
            item.id,
            item.channel,
            item.attempts,
            delay,
            error,
        )
