"""Per-client rate limiting: a token bucket per key, refilled continuously.

A client may make ``per_minute`` requests in a burst and then one every 60/per_minute
seconds. Buckets of idle clients are dropped so memory stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_TRACKED_CLIENTS = 100_000


class RateLimiter:
    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        # key -> (tokens, last refill time); ordered by last use for eviction
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def peek(self, key: str) -> float:
        """Like :meth:`check`, without taking a request: 0.0 if one would be allowed."""
        if not self.enabled:
            return 0.0
        tokens, last = self._buckets.get(key, (float(self.per_minute), self._clock()))
        tokens = min(float(self.per_minute), tokens + (self._clock() - last) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def check(self, key: str) -> float:
        """Take one request for ``key``: 0.0 if allowed, else seconds until it would be."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            allowed = 0.0
        else:
            self._buckets[key] = (tokens, now)
            allowed = (1.0 - tokens) / self._rate
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed
