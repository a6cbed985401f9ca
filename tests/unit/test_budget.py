"""The upstream budget on a fake clock: exact, work-conserving, live before bulk, safe without Redis.

The priority rule's promises over every interleaving are checked in ``test_priority.py``;
the cases here are the rule's steps one at a time.
"""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.budget import (
    FLEET_HORIZON_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    OWN_SHARE,
    PROCESS,
    STOPPED,
    NoSlot,
    UpstreamBudget,
)
from app.core.window import SlidingWindow
from app.errors import RateLimited
from app.stores.shared import AdmitReply, AdmitRequest, SharedUnavailable
from testkit.clock import FakeClock

WINDOW = 60.5  # 60 s plus the default connect timeout


def most_in_any_window(grants: list[float], window: float = 60.0) -> int:
    grants = sorted(grants)
    return max((bisect.bisect_left(grants, t + window) - i for i, t in enumerate(grants)), default=0)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=700),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=40), st.integers(min_value=0, max_value=120),
                  st.sampled_from([0.0, 0.25, 1.0]), st.booleans()),
        max_size=60,
    ),
    delivery=st.floats(min_value=0, max_value=0.5),
)  # fmt: skip
def test_no_sixty_second_window_as_amplitude_counts_ever_holds_more_than_the_limit(limit, steps, delivery):
    """Whatever the pattern of live and bulk requests and waits, and however late (up to
    the connect timeout) each call reaches Amplitude."""
    clock = FakeClock()
    window = SlidingWindow(limit, WINDOW, clock)
    arrivals: list[float] = []
    for n, (advance, attempts, max_wait, bulk) in enumerate(steps):
        clock.advance(advance)
        for k in range(attempts):
            decision = window.admit(max_wait, bulk)
            if decision.slot is not None:
                # Alternate early and late delivery: the worst case for the window.
                arrivals.append(decision.slot + (delivery if (n + k) % 2 else 0.0))
    assert most_in_any_window(arrivals) <= limit


@settings(max_examples=50, deadline=None)
@given(limit=st.integers(min_value=1, max_value=700), seconds=st.integers(min_value=130, max_value=400),
       ramp=st.booleans())  # fmt: skip
def test_a_steady_flood_uses_every_slot_of_the_window(limit, seconds, ramp):
    clock = FakeClock()
    window = SlidingWindow(limit, WINDOW, clock)
    if ramp:  # a process without Redis starts as if its predecessor had spent the window evenly
        window.occupy(limit, spread=WINDOW)
    grants: list[float] = []
    for _ in range(seconds * 10):
        clock.advance(0.1)
        while window.reserve(0.0) is not None:
            grants.append(clock.monotonic())
    # Every slot is reused as soon as it leaves the window (the 0.1 s steps aside).
    assert len(grants) >= limit * int(seconds / (WINDOW + 0.1)) - (limit if ramp else 0)
    if ramp:  # evenly paced: any minute holds 99.2% of the limit
        last_minute = [t for t in grants if t > clock.monotonic() - 60]
        assert len(last_minute) >= int(limit * 60 / WINDOW) - 1


def test_without_redis_a_new_process_ramps_up_as_if_its_predecessor_spent_evenly():
    clock = FakeClock()
    budget = UpstreamBudget(600, shares=1, clock=clock, window=WINDOW)
    with pytest.raises(RateLimited):
        budget.acquire(0.0)
    clock.advance(WINDOW / 600 * 10)
    for _ in range(10):
        budget.acquire(0.0)
    with pytest.raises(RateLimited):
        budget.acquire(0.0)


def test_a_wait_is_slept_on_the_clock_and_reported():
    clock = FakeClock()
    budget = UpstreamBudget(60, shares=1, clock=clock, window=WINDOW)
    with pytest.raises(RateLimited) as refused:
        budget.acquire(0.0)
    assert 1 <= refused.value.retry_after <= 2
    grant = budget.acquire(max_wait=1.1)
    assert grant.waited > 0 and clock.slept == pytest.approx(grant.waited)


def test_a_429_back_off_refuses_every_call_until_it_ends():
    clock = FakeClock()
    budget = UpstreamBudget(600, shares=1, clock=clock, window=WINDOW)
    clock.advance(WINDOW)
    budget.back_off(30)
    with pytest.raises(RateLimited) as refused:
        budget.acquire(1.0)
    assert refused.value.retry_after == 30
    clock.advance(30)
    budget.acquire(0.0)


def full_budget(limit: int, clock: FakeClock) -> UpstreamBudget:
    budget = UpstreamBudget(limit, shares=1, clock=clock, window=WINDOW)
    clock.advance(WINDOW)  # past the start-up ramp
    return budget


def ask_until_granted(budget: UpstreamBudget, clock: FakeClock, bulk: bool) -> float:
    """Ask as a caller that never gives up does, sleeping as told; the moment of the grant."""
    while True:
        try:
            clock.advance(budget.try_acquire(1.0, bulk))
            return clock.monotonic()
        except NoSlot as refused:
            clock.advance(refused.seconds)


def test_bulk_work_takes_an_idle_window_at_the_steady_rate_and_fills_it_in_one_window():
    clock = FakeClock()
    budget = full_budget(10, clock)
    step = WINDOW / 10
    started = clock.monotonic()
    grants = [ask_until_granted(budget, clock, bulk=True) for _ in range(10)]
    assert grants[-1] - started < WINDOW  # the whole limit within the window: nothing idle
    # One a step, never at once (to the millisecond a retry on this clock may take).
    assert [b - a for a, b in zip(grants, grants[1:], strict=False)] == pytest.approx([step] * 9, abs=0.002)
    with pytest.raises(NoSlot) as refused:
        budget.try_acquire(0.0, bulk=True)
    assert refused.value.seconds == pytest.approx(started + WINDOW - clock.monotonic())  # the first to free
    # A live request arriving now finds slots freeing at the steady rate: the next within a step
    # (and the millisecond by which a bulk grant may come early).
    assert budget.try_acquire(step + 0.002) == pytest.approx(step, abs=0.002)


def test_while_a_live_request_waits_for_its_slot_no_bulk_request_is_granted_one():
    clock = FakeClock()
    budget = full_budget(10, clock)
    step = WINDOW / 10
    first = clock.monotonic()
    for _ in range(10):  # live traffic fills the window, one a step
        budget.try_acquire(0.0)
        clock.advance(step)
    clock.advance(-0.5)  # half a second before the first of them frees
    frees_at = first + WINDOW
    waiting = budget.try_acquire(1.0)  # a live request reserves that slot
    assert clock.monotonic() + waiting == pytest.approx(frees_at)
    with pytest.raises(NoSlot) as refused:
        budget.try_acquire(0.0, bulk=True)
    assert clock.monotonic() + refused.value.seconds == pytest.approx(frees_at + step)  # not before the next
    clock.advance(waiting)
    with pytest.raises(NoSlot):
        budget.try_acquire(0.0, bulk=True)  # at the moment it freed: the live request's
    clock.advance(step)
    assert budget.try_acquire(0.0, bulk=True) == 0.0  # the next one: nobody live waits for it


class DownTier:
    """A shared tier that never answers (a hand-written fake: no socket, no file)."""

    name = "down"

    def admit(self, request: AdmitRequest) -> AdmitReply:
        raise SharedUnavailable("down")

    def leave_fleet(self, process_id: str) -> None:
        raise SharedUnavailable("down")


def test_cut_off_from_the_shared_tier_a_process_waits_a_window_then_uses_its_fleet_share_for_a_while():
    clock = FakeClock()
    budget = UpstreamBudget(60, shares=4, shared=DownTier(), clock=clock, window=WINDOW)  # type: ignore[arg-type]
    budget.close()  # stops its heartbeat thread
    with pytest.raises(RateLimited) as refused:
        budget.acquire(0.0)  # what the fleet spent through Redis may still be in the window
    assert refused.value.retry_after >= WINDOW
    clock.advance(WINDOW + HEARTBEAT_TIMEOUT_SECONDS)
    granted = 0
    for _ in range(30):
        try:
            budget.acquire(0.0)
            granted += 1
        except RateLimited:
            pass
    assert granted == 60 // 4
    clock.advance(FLEET_HORIZON_SECONDS)  # the others no longer hold this share back
    with pytest.raises(RateLimited):
        budget.acquire(0.0)


def test_the_mode_says_how_the_budget_admits_as_an_outage_goes_on():
    clock = FakeClock()
    assert UpstreamBudget(60, shares=1, clock=clock, window=WINDOW).mode() == PROCESS
    budget = UpstreamBudget(60, shares=4, shared=DownTier(), clock=clock, window=WINDOW)  # type: ignore[arg-type]
    budget.close()
    with pytest.raises(RateLimited):
        budget.acquire(0.0)
    assert budget.mode() == STOPPED  # cut off: nothing until its share is safe
    clock.advance(WINDOW + HEARTBEAT_TIMEOUT_SECONDS)
    assert budget.mode() == OWN_SHARE
    clock.advance(FLEET_HORIZON_SECONDS)
    assert budget.mode() == STOPPED  # cut off too long: the others no longer hold its share back


def test_a_ramp_for_a_huge_limit_costs_no_memory_and_frees_slots_evenly():
    clock = FakeClock()
    window = SlidingWindow(1_000_000_000, WINDOW, clock)
    window.occupy(window.limit, spread=WINDOW)
    assert window.used() == 1_000_000_000
    clock.advance(WINDOW / 2)
    assert window.used() == pytest.approx(500_000_000, rel=1e-6)
    assert window.reserve(0.0) == 0.0
