"""One deadline per request: what is left, and how long one wait may take."""

from __future__ import annotations

import pytest

from app.clock import Deadline
from testkit.clock import FakeClock


def test_deadline_counts_down_on_the_clock_it_was_given():
    clock = FakeClock()
    deadline = Deadline.after(clock, 1.5)
    assert deadline.remaining() == 1.5 and not deadline.expired()
    clock.advance(1.0)
    assert deadline.remaining() == pytest.approx(0.5)
    assert deadline.capped(0.25) == 0.25
    assert deadline.capped(2.0) == pytest.approx(0.5)
    clock.advance(0.6)
    assert deadline.expired() and deadline.remaining() == 0.0 and deadline.capped(0.25) == 0.0


def test_a_deadline_counts_from_arrival_not_from_when_work_starts():
    clock = FakeClock()
    arrival = clock.monotonic()
    clock.advance(0.4)  # queued before a thread took the request
    assert Deadline.after(clock, 1.5, start=arrival).remaining() == pytest.approx(1.1)


def test_fake_sleep_moves_time_instead_of_waiting():
    clock = FakeClock()
    before = clock.time(), clock.monotonic()
    clock.sleep(3.0)
    assert (clock.time() - before[0], clock.monotonic() - before[1]) == (3.0, 3.0)
