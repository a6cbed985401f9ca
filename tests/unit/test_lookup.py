"""The lookup executor with a hand-written Amplitude and a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app.admission import Admission
from app.budget import UpstreamBudget
from app.clock import Deadline
from app.core.breaker import CircuitBreaker
from app.core.freshness import Freshness
from app.core.query import Identity, ProfileQuery
from app.errors import RateLimited, UpstreamUnavailable, UserNotFound
from app.lookup import HIT, MISS, STALE, ProfileLookup
from app.metrics import Metrics
from app.stores.profiles import ProfileStore
from testkit.clock import FakeClock

FRESHNESS = Freshness(ttl=300, stale_while_revalidate=0, stale_if_error=3600, negative_ttl=60)


class FakeAmplitude:
    """Answers every fetch with a profile, a not-found or an error, and counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failure: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()

    def fetch(self, query: ProfileQuery, deadline: Deadline, send_by: float | None = None) -> dict[str, Any]:
        self.calls += 1
        self.gate.wait(5)
        if self.failure is not None:
            raise self.failure
        if query.identity.value.startswith("unknown"):
            raise UserNotFound()
        return {"user_id": query.identity.value, "cohort_ids": ["c1"]}

    def close(self) -> None:
        pass


@pytest.fixture
def world():
    clock = FakeClock()
    amplitude = FakeAmplitude()
    budget = UpstreamBudget(600, shares=1, clock=clock)
    clock.advance(60)  # a full bucket
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=clock)
    admission = Admission(breaker, budget, None, Metrics(), clock, max_wait=0.25)
    store = ProfileStore(FRESHNESS, 1000, claim_ttl=2.5, clock=clock)
    lookup = ProfileLookup(store, admission, amplitude, clock, call_seconds=1.5, concurrency=8)  # type: ignore[arg-type]
    yield clock, amplitude, lookup, breaker
    lookup.close()


def query(user: str) -> ProfileQuery:
    return ProfileQuery(Identity("user_id", user), cohorts=True)


def test_concurrent_misses_for_one_profile_make_one_call(world):
    clock, amplitude, lookup, _ = world
    amplitude.gate.clear()
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = [pool.submit(lookup.lookup, query("user-1"), Deadline.after(clock, 1.5)) for _ in range(10)]
        amplitude.gate.set()
        results = [answer.result(timeout=10) for answer in answers]
    assert amplitude.calls == 1
    assert {result.cache for result in results} <= {MISS, HIT}
    assert all(result.profile["cohort_ids"] == ["c1"] for result in results)


def test_a_fresh_entry_is_served_without_a_call_until_its_ttl(world):
    clock, amplitude, lookup, _ = world
    assert lookup.lookup(query("user-2"), Deadline.after(clock, 1.5)).cache == MISS
    clock.advance(299)
    hit = lookup.lookup(query("user-2"), Deadline.after(clock, 1.5))
    assert (hit.cache, int(hit.age), int(hit.fresh_for)) == (HIT, 299, 1)
    assert amplitude.calls == 1


def test_not_found_is_remembered_for_its_own_ttl(world):
    clock, amplitude, lookup, _ = world
    for _ in range(3):
        with pytest.raises(UserNotFound):
            lookup.lookup(query("unknown-1"), Deadline.after(clock, 1.5))
    assert amplitude.calls == 1
    clock.advance(60)
    with pytest.raises(UserNotFound):
        lookup.lookup(query("unknown-1"), Deadline.after(clock, 1.5))
    assert amplitude.calls == 2


def test_a_failed_refresh_serves_the_old_profile_and_counts_against_the_breaker(world):
    clock, amplitude, lookup, breaker = world
    lookup.lookup(query("user-3"), Deadline.after(clock, 1.5))
    clock.advance(400)
    amplitude.failure = UpstreamUnavailable("down")
    stale = lookup.lookup(query("user-3"), Deadline.after(clock, 1.5))
    assert stale.cache == STALE and isinstance(stale.degraded_by, UpstreamUnavailable)
    with pytest.raises(UpstreamUnavailable):
        lookup.lookup(query("user-4"), Deadline.after(clock, 1.5))
    assert breaker.state == "open"
    calls = amplitude.calls
    with pytest.raises(UpstreamUnavailable):  # open: answered without a call
        lookup.lookup(query("user-5"), Deadline.after(clock, 1.5))
    assert amplitude.calls == calls


def test_a_spent_budget_refuses_without_calling(world):
    clock, amplitude, lookup, _ = world
    lookup.admission.budget.back_off(30)
    with pytest.raises(RateLimited):
        lookup.lookup(query("user-6"), Deadline.after(clock, 1.5))
    assert amplitude.calls == 0
