"""The circuit breaker on a fake clock: open, cool down, one probe, close or reopen."""

from __future__ import annotations

from app.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from testkit.clock import FakeClock


def opened(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    return breaker


def test_opens_after_threshold_consecutive_failures_only():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
    for _ in range(2):
        breaker.allow()
        breaker.record_failure()
    breaker.allow()
    breaker.record_success()  # a success resets the count
    for _ in range(2):
        breaker.allow()
        breaker.record_failure()
    assert breaker.state == CLOSED
    breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()


def test_after_the_cooldown_exactly_one_probe_goes_through():
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(9.9)
    assert not breaker.allow() and breaker.seconds_until_retry() > 0
    clock.advance(0.1)
    assert breaker.state == HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # the probe is in flight


def test_a_successful_probe_closes_and_a_failed_one_reopens():
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow()


def test_a_probe_slot_given_back_unused_lets_the_next_caller_probe():
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(10)
    assert breaker.allow()
    breaker.release()  # e.g. the budget refused the call
    assert breaker.allow()
