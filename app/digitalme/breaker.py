"""A circuit breaker: after N consecutive failures, refuse calls for a while.

While Claude is down, requests fail in microseconds with a "try again in S seconds"
instead of piling up behind timeouts. After ``reset_seconds`` one trial call is let
through (half-open); its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerOpen(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"circuit open; retry in {retry_after:.1f}s")


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        reset_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if self._on_change:
                self._on_change(state)

    def retry_after(self) -> float:
        return max(0.0, self._opened_at + self.reset_seconds - self._clock())

    def before_call(self) -> None:
        """Raise BreakerOpen unless a call may go ahead now."""
        if self._state == BreakerState.CLOSED:
            return
        if self._state == BreakerState.OPEN:
            if self.retry_after() > 0:
                raise BreakerOpen(self.retry_after())
            self._set(BreakerState.HALF_OPEN)
        if self._trial_in_flight:
            raise BreakerOpen(max(1.0, self.reset_seconds / 10))
        self._trial_in_flight = True

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._trial_in_flight = False
        self._failures += 1
        if self._state == BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def record_neutral(self) -> None:
        """A call ended in a way that says nothing about Claude's health (e.g. cancelled)."""
        self._trial_in_flight = False
