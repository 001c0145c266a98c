"""Small mechanisms with their own logic: breaker, rate limiter, history fitting,
client addresses behind proxies."""

from __future__ import annotations

import ipaddress

import pytest

from digitalme.breaker import BreakerOpen, BreakerState, CircuitBreaker
from digitalme.chat import estimate_tokens, fit_history
from digitalme.middlewares import client_address
from digitalme.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_half_opens_after_reset() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(3, 30, clock=clock, on_change=changes.append)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state == BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN
    with pytest.raises(BreakerOpen) as caught:
        breaker.before_call()
    assert caught.value.retry_after == pytest.approx(30)
    clock.now += 30
    breaker.before_call()  # the one trial
    assert breaker.state == BreakerState.HALF_OPEN
    with pytest.raises(BreakerOpen):
        breaker.before_call()  # only one trial at a time
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN
    clock.now += 30
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(2, 30, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == BreakerState.CLOSED


def test_rate_limiter_bursts_then_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(60, clock=clock)
    assert [limiter.check("a") for _ in range(60)] == [0.0] * 60
    wait = limiter.check("a")
    assert wait == pytest.approx(1.0)
    assert limiter.check("b") == 0.0  # separate bucket
    clock.now += 1.0
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0


def test_rate_limiter_off() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.check("a") == 0.0 for _ in range(1000))


def test_fit_history_keeps_newest_within_budget() -> None:
    turns = [
        ("user", "a" * 70),
        ("assistant", "b" * 70),
        ("user", "c" * 70),
        ("assistant", "d" * 70),
        ("user", "e" * 70),
    ]
    cost = estimate_tokens("a" * 70)
    messages = fit_history(turns, budget=cost * 3)
    assert [m["content"][0] for m in messages] == ["c", "d", "e"]
    # Starting on an assistant turn is not allowed: it is dropped.
    messages = fit_history(turns, budget=cost * 4)
    assert [m["content"][0] for m in messages] == ["c", "d", "e"]


def test_fit_history_always_keeps_the_new_message_and_merges_roles() -> None:
    assert fit_history([("user", "x" * 10_000)], budget=10) == [
        {"role": "user", "content": "x" * 10_000}
    ]
    assert fit_history([("user", "one"), ("user", "two")], budget=1000) == [
        {"role": "user", "content": "one\n\ntwo"}
    ]


PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.5", None, ("203.0.113.5", False)),
        ("203.0.113.5", "1.2.3.4", ("203.0.113.5", False)),  # untrusted peer: header ignored
        ("127.0.0.1", "198.51.100.7", ("198.51.100.7", True)),
        ("127.0.0.1", "6.6.6.6, 198.51.100.7", ("198.51.100.7", True)),  # spoofed left hop
        ("127.0.0.1", "198.51.100.7, 10.1.1.1", ("198.51.100.7", True)),  # chain of proxies
        ("127.0.0.1", None, ("127.0.0.1", False)),
    ],
)
def test_client_address(peer: str, xff: str | None, expected: tuple[str, bool]) -> None:
    assert client_address(peer, xff, PROXIES) == expected
