"""The upstream budget on a fake clock: never more than the limit in any 60-second window."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.budget import TokenBucket, UpstreamBudget
from app.errors import RateLimited
from testkit.clock import FakeClock


def most_in_any_window(grants: list[float], window: float = 60.0) -> int:
    grants = sorted(grants)
    return max((bisect.bisect_left(grants, t + window) - i for i, t in enumerate(grants)), default=0)


@settings(max_examples=150, deadline=None)
@given(
    per_minute=st.integers(min_value=1, max_value=2000),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=30), st.integers(min_value=0, max_value=80),
                  st.sampled_from([0.0, 0.25, 1.0])),
        max_size=60,
    ),
)  # fmt: skip
def test_no_sixty_second_window_ever_holds_more_than_the_limit(per_minute, steps):
    clock = FakeClock()
    bucket = TokenBucket(per_minute, clock)
    grants: list[float] = []
    for advance, attempts, max_wait in steps:
        clock.advance(advance)
        for _ in range(attempts):
            wait = bucket.reserve(max_wait)
            if wait is not None:
                grants.append(clock.monotonic() + wait)  # the call leaves after the wait
    assert most_in_any_window(grants) <= per_minute


def test_a_new_bucket_starts_empty_so_a_restart_adds_no_burst():
    clock = FakeClock()
    bucket = TokenBucket(600, clock)
    assert bucket.reserve(0.0) is None
    clock.advance(1.0)
    assert bucket.reserve(0.0) == 0.0


def test_budget_turns_away_with_the_time_until_a_token():
    clock = FakeClock()
    budget = UpstreamBudget(60, shares=1, clock=clock)
    with pytest.raises(RateLimited) as refused:
        budget.acquire(0.0)
    assert 1 <= refused.value.retry_after <= 2
    budget.acquire(max_wait=1.1)  # waits on the fake clock for the first token
    assert clock.slept > 0


def test_a_429_back_off_refuses_every_call_until_it_ends():
    clock = FakeClock()
    budget = UpstreamBudget(600, shares=1, clock=clock)
    clock.advance(60)
    budget.back_off(30)
    with pytest.raises(RateLimited) as refused:
        budget.acquire(1.0)
    assert refused.value.retry_after == 30
    clock.advance(30)
    budget.acquire(0.0)


def test_each_process_gets_its_share_without_redis():
    clock = FakeClock()
    whole, half = UpstreamBudget(600, shares=1, clock=clock), UpstreamBudget(600, shares=2, clock=clock)
    clock.advance(60)
    assert half.tokens_left() == pytest.approx(whole.tokens_left() / 2, abs=1)
