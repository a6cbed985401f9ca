"""The priority rule's promises (see :mod:`app.budget`), for any interleaving, on each back-end.

A hypothesis state machine on a fake clock drives several processes (``UpstreamBudget``
objects sharing one back-end: the in-process window, one SQLite file, one Redis): live
requests arrive at any moment with any wait, alone or in bursts; bulk callers ask without
pause whenever the budget says they may; time moves on. Every call that leaves is
recorded as the Amplitude stand-in sees it (the moment it leaves), and after every step:

- (a) no window of ``W`` seconds holds more than the limit;
- (b) each live request got the earliest slot the limit allowed given the grants already
  made (worked out here from the stand-in's record, by brute force, not by the back-end's
  formula), and no bulk request was granted a slot while a live request waited;
- (c) where bulk work asked without pause over two windows and no live request was
  granted a slot in the first, the second ends holding the limit, up to one slot.

Without a shared tier each process keeps its own window with its share of the limit
(``limit // processes``), so there each process is checked alone and (a) also for all.
Redis reads its time from ``TIME``, which a test cannot move: its admissions here carry
the fake clock's time (``AdmitRequest.now``, for tests only).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from app.admission import CALL_ALLOWANCE_SECONDS
from app.budget import FLEET_HORIZON_SECONDS, HEARTBEAT_TIMEOUT_SECONDS, NoSlot, UpstreamBudget
from app.settings import Settings
from app.stores.redis import RedisTier
from app.stores.redis_shared import RedisShared
from app.stores.shared import GRANTED, REFUSED, AdmitReply, AdmitRequest, SharedTier
from app.stores.sqlite import SqliteShared
from app.stores.sqlite_schema import initialise
from testkit.clock import FakeClock

WINDOW = 60.5
#: Float slack: the tiers count in wall time (1.8e9 on the fake clock), where a double's step is 2.4e-7 s.
EPS = 1e-5


class OnFakeTime:
    """A shared tier whose admissions take the fake clock's time instead of the tier's own."""

    def __init__(self, tier: RedisShared, clock: FakeClock) -> None:
        self.tier = tier
        self.clock = clock
        self.name = tier.name

    def admit(self, request: AdmitRequest) -> AdmitReply:
        return self.tier.admit(replace(request, now=self.clock.time()))

    def leave_fleet(self, process_id: str) -> None:
        self.tier.leave_fleet(process_id)

    def back_off(self, seconds: float) -> None:
        self.tier.back_off(seconds)

    def close(self) -> None:
        self.tier.close()


@dataclass
class Fleet:
    """Budgets sharing a back-end: which group (log) each counts in, and each group's limit."""

    budgets: list[UpstreamBudget]
    group_of: list[int]
    limits: list[int]
    tiers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for budget in self.budgets:
            budget.close()
        for tier in self.tiers:
            tier.close()


#: Builds a fleet of *processes* budgets for *limit* on *clock*.
Backend = Callable[[int, int, FakeClock], Fleet]


def in_process(limit: int, processes: int, clock: FakeClock) -> Fleet:
    budgets = [UpstreamBudget(limit, processes, clock=clock, window=WINDOW) for _ in range(processes)]
    clock.advance(WINDOW)  # past the start-up ramp: the record below starts empty too
    return Fleet(budgets, list(range(processes)), [limit // processes] * processes)


def on_sqlite(directory: Path) -> Backend:
    counter = itertools.count()

    def build(limit: int, processes: int, clock: FakeClock) -> Fleet:
        path = str(directory / f"shared-{next(counter)}.sqlite3")
        initialise(path, clock, history_known=True)
        tiers = [SqliteShared(path, clock) for _ in range(processes)]
        budgets = [UpstreamBudget(limit, processes, tier, clock=clock, window=WINDOW) for tier in tiers]
        return Fleet(budgets, [0] * processes, [limit], tiers)

    return build


def on_redis(url: str) -> Backend:
    def build(limit: int, processes: int, clock: FakeClock) -> Fleet:
        prefix = f"priority-{uuid.uuid4().hex[:8]}"  # a log of its own for each example
        tiers = [OnFakeTime(RedisShared(RedisTier(url, 1.0, prefix=prefix, clock=clock)), clock)
                 for _ in range(processes)]  # fmt: skip
        budgets = [UpstreamBudget(limit, processes, tier, clock=clock, window=WINDOW)  # type: ignore[arg-type]
                   for tier in tiers]  # fmt: skip
        return Fleet(budgets, [0] * processes, [limit], tiers)

    return build


def earliest_slot(stamps: list[float], now: float, limit: int, window: float = WINDOW) -> float | None:
    """The earliest moment from *now* at which one more call may leave with at most *limit* in
    any window, given *stamps* (sorted, reservations included): by brute force."""
    if limit <= 0:
        return None
    recent = [stamp for stamp in stamps if stamp > now - window]  # older ones share no window with now
    for candidate in sorted({now, *(stamp + window for stamp in recent if stamp + window > now)}):
        trial = sorted([*recent, candidate])
        if all(trial[i + limit] - trial[i] >= window - EPS for i in range(len(trial) - limit)):
            return candidate
    raise AssertionError("some candidate is always feasible")


def most_in_any_window(stamps: list[float], window: float = WINDOW) -> int:
    ordered = sorted(stamps)
    return max((bisect.bisect_left(ordered, t + window - EPS) - i for i, t in enumerate(ordered)), default=0)


@dataclass
class Departure:
    """A call as the stand-in sees it: when it leaves, its class and its group's log."""

    stamp: float
    live: bool
    group: int


class PriorityMachine(RuleBasedStateMachine):
    """Live and bulk requests across processes sharing one back-end, on a fake clock."""

    backend: Backend

    def __init__(self) -> None:
        super().__init__()
        self.fleet: Fleet | None = None

    @initialize(limit=st.one_of(st.integers(min_value=1, max_value=8), st.just(8)),
                processes=st.integers(min_value=1, max_value=3),
                bulk_from_start=st.booleans())  # fmt: skip
    def start(self, limit: int, processes: int, bulk_from_start: bool) -> None:
        self.clock = FakeClock()
        self.limit = limit
        self.fleet = self.backend(limit, processes, self.clock)
        self.processes = processes
        self.departures: list[Departure] = []
        self.asking: dict[int, float] = {}  # process -> when its bulk caller asks next
        self.groups = sorted(set(self.fleet.group_of))
        self.demand_since: dict[int, float | None] = dict.fromkeys(self.groups)
        self.contact = [self.clock.monotonic()] * processes
        if bulk_from_start:
            self.bulk_demand(0, True)

    def teardown(self) -> None:
        if self.fleet is not None:
            self.fleet.close()

    # -- the stand-in's record ----------------------------------------------------------------

    def now(self) -> float:
        return self.clock.monotonic()

    def stamps(self, group: int, live: bool | None = None) -> list[float]:
        return sorted(d.stamp for d in self.departures if d.group == group and (live is None or d.live == live))

    def keep_alive(self, now: float) -> None:
        """Heartbeats as the budgets' threads send them, so that no process looks gone quiet."""
        assert self.fleet is not None
        for process, budget in enumerate(self.fleet.budgets):
            if now - self.contact[process] > 2.0:
                budget.heartbeat()
                self.contact[process] = now

    def attempt(self, process: int, max_wait: float, bulk: bool) -> float | None:
        """One attempt at *process*: the wait for the slot taken, or None with the retry noted."""
        assert self.fleet is not None
        now = self.now()
        self.keep_alive(now)
        self.contact[process] = now
        try:
            return self.fleet.budgets[process].try_acquire(max_wait, bulk)
        except NoSlot as refused:
            self.refused_for = refused.seconds
            return None

    # -- rules ---------------------------------------------------------------------------------

    @rule(process=st.integers(min_value=0, max_value=2),
          max_wait=st.one_of(st.sampled_from([0.0, 0.25, 1.0]), st.floats(min_value=0, max_value=WINDOW)),
          count=st.sampled_from([1, 1, 1, 2, 5, 12]))  # fmt: skip
    def live(self, process: int, max_wait: float, count: int) -> None:
        """*count* live requests (a burst) arrive at once at *process*, each waiting up to *max_wait*."""
        assert self.fleet is not None
        process %= self.processes
        group = self.fleet.group_of[process]
        limit = self.fleet.limits[group]
        for _ in range(count):
            now = self.now()
            expected = earliest_slot(self.stamps(group), now, limit)
            wait = self.attempt(process, max_wait, bulk=False)
            if expected is None:
                assert wait is None
                continue
            if abs(expected - now - max_wait) < EPS:
                pass  # on the edge of its wait: either outcome is right
            elif expected - now <= max_wait:
                assert wait is not None, f"(b) refused a live slot {expected - now:.6f} s away, wait {max_wait}"
            else:
                assert wait is None, f"(b) granted a live slot beyond its wait {max_wait}"
            if wait is None:
                assert self.refused_for == pytest.approx(max(0.001, expected - now), abs=EPS)
                continue
            assert now + wait == pytest.approx(expected, abs=EPS), "(b) not the earliest slot the limit allows"
            self.departures.append(Departure(now + wait, True, group))

    @rule(process=st.integers(min_value=0, max_value=2), early=st.floats(min_value=0, max_value=2),
          max_wait=st.sampled_from([0.25, 1.0, 2.0]))  # fmt: skip
    def live_as_a_slot_frees(self, process: int, early: float, max_wait: float) -> None:
        """Time moves on to *early* seconds before the next slot of *process*'s log frees, and a
        live request arrives there: the race with bulk callers waiting for the same slot."""
        assert self.fleet is not None
        process %= self.processes
        group = self.fleet.group_of[process]
        frees = earliest_slot(self.stamps(group), self.now(), self.fleet.limits[group])
        if frees is not None:
            self.advance(max(0.0, frees - early - self.now()))
        self.live(process, max_wait, 1)

    @rule(process=st.integers(min_value=0, max_value=2), on=st.booleans())
    def bulk_demand(self, process: int, on: bool) -> None:
        """A bulk caller at *process* starts asking without pause, or stops."""
        assert self.fleet is not None
        process %= self.processes
        group = self.fleet.group_of[process]
        if on:
            self.asking.setdefault(process, self.now())
        else:
            self.asking.pop(process, None)
        asking = any(self.fleet.group_of[p] == group for p in self.asking)
        if not asking:
            self.demand_since[group] = None
        elif self.demand_since[group] is None:
            self.demand_since[group] = self.now()

    @rule(seconds=st.one_of(st.floats(min_value=0, max_value=5), st.floats(min_value=0, max_value=2 * WINDOW),
                            st.just(2.5 * WINDOW)))  # fmt: skip
    def advance(self, seconds: float) -> None:
        """Time moves on; the bulk callers ask whenever they were told to, in order. (Two and a
        half windows with no live request: room for (c) to be checked.)"""
        target = self.now() + seconds
        for asks in itertools.count():
            assert asks < 10_000, "bulk callers livelocked"
            due = min(self.asking.items(), key=lambda item: (item[1], item[0]), default=None)
            if due is None or due[1] > target:
                break
            process, when = due
            self.clock.advance(max(0.0, when - self.now()))
            self.ask_bulk(process)
        self.clock.advance(max(0.0, target - self.now()))
        for group in self.groups:
            self.check_nothing_idle(group)

    def ask_bulk(self, process: int) -> None:
        assert self.fleet is not None
        now = self.now()
        group = self.fleet.group_of[process]
        wait = self.attempt(process, 0.0, bulk=True)
        if wait is None:
            self.asking[process] = now + self.refused_for
            self.check_nothing_idle(group)  # a refusal is where a slot would sit idle
            return
        assert wait == 0.0, "bulk work never reserves"
        waiting = [stamp for stamp in self.stamps(group, live=True) if stamp > now + EPS]
        assert not waiting, f"(b) a bulk grant while a live request waits for {waiting}"
        self.departures.append(Departure(now, False, group))
        self.asking[process] = now  # and asks again at once
        self.check_nothing_idle(group)

    # -- the promises ----------------------------------------------------------------------------

    @invariant()
    def never_over_the_limit(self) -> None:
        """(a), at the stand-in: for all processes together and for each log."""
        if self.fleet is None:
            return
        assert most_in_any_window([d.stamp for d in self.departures]) <= self.limit
        for group in self.groups:
            assert most_in_any_window(self.stamps(group)) <= self.fleet.limits[group]

    def check_nothing_idle(self, group: int) -> None:
        """(c) for the window ending now, if bulk work asked over it and the one before, and no
        live request was granted a slot in the one before."""
        assert self.fleet is not None
        now = self.now()
        since = self.demand_since[group]
        if since is None or since > now - 2 * WINDOW:
            return
        if any(now - 2 * WINDOW < stamp <= now - WINDOW for stamp in self.stamps(group, live=True)):
            return
        limit = self.fleet.limits[group]
        held = sum(1 for stamp in self.stamps(group) if now - WINDOW < stamp <= now + EPS)
        assert held >= limit - 1, f"(c) the window ending now holds {held} of {limit}"


def run_machine(backend: Backend, examples: int) -> None:
    machine = type("Machine", (PriorityMachine,), {"backend": staticmethod(backend)})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=examples, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )  # fmt: skip


def test_the_rule_holds_in_process() -> None:
    run_machine(in_process, examples=100)


def test_the_rule_holds_on_one_sqlite_file(tmp_path: Path) -> None:
    run_machine(on_sqlite(tmp_path), examples=30)


def test_the_rule_holds_on_redis(redis_url: str) -> None:
    run_machine(on_redis(redis_url), examples=30)


@pytest.fixture(params=["sqlite", "redis"])
def two_processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Any, FakeClock]]:
    """Two processes' views of one shared tier, used directly (no heartbeat threads)."""
    clock = FakeClock()
    tiers: list[Any]
    if request.param == "sqlite":
        path = str(tmp_path / "shared.sqlite3")
        initialise(path, clock, history_known=True)
        tiers = [SqliteShared(path, clock) for _ in range(2)]
    else:
        url, prefix = request.getfixturevalue("redis_url"), f"pair-{uuid.uuid4().hex[:8]}"
        tiers = [OnFakeTime(RedisShared(RedisTier(url, 1.0, prefix=prefix, clock=clock)), clock) for _ in range(2)]
    yield tiers[0], tiers[1], clock
    for tier in tiers:
        tier.close()


def ask(process: str, max_wait: float = 0.0, bulk: bool = False, heartbeat_only: bool = False) -> AdmitRequest:
    return AdmitRequest(limit=10, window=WINDOW, max_wait=max_wait, bulk=bulk, process_id=process,
                        grant_id=f"{process}:{uuid.uuid4().hex[:6]}", heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS,
                        fleet_horizon=FLEET_HORIZON_SECONDS, heartbeat_only=heartbeat_only)  # fmt: skip


def test_no_bulk_grant_jumps_a_waiting_live_request_even_when_the_ceiling_rises(two_processes):
    """While the ceiling stays put, the reservations in the log keep bulk work out by
    themselves; the latest live slot keeps it out when the ceiling rises under a waiting
    request (a process that had gone quiet is heard again, and its share comes back)."""
    first, second, clock = two_processes
    second.admit(ask("p1", heartbeat_only=True))
    clock.advance(HEARTBEAT_TIMEOUT_SECONDS + 1)  # p1 has gone quiet: its share is held back
    assert [first.admit(ask("p0")).granted for _ in range(6)] == [GRANTED] * 5 + [REFUSED]
    waiting = first.admit(ask("p0", max_wait=WINDOW))
    assert waiting.granted == GRANTED and waiting.wait == pytest.approx(WINDOW)
    second.admit(ask("p1", heartbeat_only=True))  # heard again: the whole limit is back
    refused = second.admit(ask("p1", bulk=True))
    assert refused.granted == REFUSED and refused.wait == pytest.approx(WINDOW)
    assert second.admit(ask("p1")).granted == GRANTED  # live work takes the room at once


# -- the scenario: a flood, then a warm-up beside one live request a second ------------


class Events:
    """A tiny discrete-event loop on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (when, next(self.order), action))

    def run_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            when, _, action = heapq.heappop(self.queue)
            self.clock.advance(max(0.0, when - self.clock.monotonic()))
            action()
        self.clock.advance(max(0.0, end - self.clock.monotonic()))


@pytest.fixture(params=["in_process", "sqlite", "redis"])
def scenario_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FakeClock, Fleet]]:
    """One instance at the defaults, limit 120: one worker in process, else two sharing a tier."""
    clock = FakeClock()
    window = Settings(amplitude_secret_key="k").admission_window_seconds
    limit = 120
    if request.param == "in_process":
        fleet = Fleet([UpstreamBudget(limit, 1, clock=clock, window=window)], [0], [limit])
    else:
        if request.param == "sqlite":
            path = str(tmp_path / "shared.sqlite3")
            initialise(path, clock)  # as gunicorn makes it: a new log ramps up
            tiers: list[Any] = [SqliteShared(path, clock) for _ in range(2)]
        else:
            prefix = f"scenario-{uuid.uuid4().hex[:8]}"
            url = request.getfixturevalue("redis_url")
            tiers = [OnFakeTime(RedisShared(RedisTier(url, 1.0, prefix=prefix, clock=clock)), clock) for _ in range(2)]
            # A Redis the fleet has used for a while: the last window's limit spent evenly (as
            # the other logs start). An empty one lets the flood take the whole limit in its
            # first four seconds, and under a flood that clump keeps its place: a live request
            # a second then finds no slot freeing for most of each minute, bulk work or not.
            spent = {f"before-{n}": clock.time() - window + window * (n + 1) / limit for n in range(limit)}
            tiers[0].tier.tier.run(lambda client: client.zadd(tiers[0].tier.tier.key("admission"), spent))
        shared: list[SharedTier] = tiers
        fleet = Fleet([UpstreamBudget(limit, 2, tier, clock=clock, window=window) for tier in shared], [0, 0],
                      [limit], tiers)  # fmt: skip
    yield clock, fleet
    fleet.close()


def test_after_a_flood_a_warm_up_leaves_every_live_request_its_slot_and_together_they_use_the_limit(scenario_fleet):
    """Issue 21: a live key floods for 130 s; then a warm-up (8 bulk workers) runs while the live
    key asks for one new user a second, 65 times. At the defaults (limit 120, a 1.5 s deadline)."""
    clock, fleet = scenario_fleet
    defaults = Settings(amplitude_secret_key="k")
    live_wait = min(defaults.budget_max_wait_seconds, defaults.request_deadline_seconds - CALL_ALLOWANCE_SECONDS)
    bulk_wait = defaults.request_deadline_seconds - CALL_ALLOWANCE_SECONDS
    events = Events(clock)
    sent: list[tuple[float, str]] = []  # (leaves, class) as the stand-in sees it
    answers: list[bool] = []  # the live requests after the flood: answered with data?
    started = clock.monotonic()
    processes = itertools.cycle(fleet.budgets)

    def live(record: bool) -> None:
        try:
            wait = next(processes).try_acquire(live_wait)
        except NoSlot:
            answers.extend([False] if record else [])
            return
        sent.append((clock.monotonic() + wait, "live"))
        answers.extend([True] if record else [])

    for n in range(130 * 30):  # the flood: 30 new users a second for 130 s
        events.at(started + n / 30, lambda: live(False))
    warm_from = started + 130

    def warm_worker(budget: UpstreamBudget, asked: float) -> None:
        """One of ``app warm``'s workers: a request, its budget wait, the call; or a 503 and its pause."""
        try:
            wait = budget.try_acquire(bulk_wait, bulk=True)
        except NoSlot as refused:
            if clock.monotonic() - asked + refused.seconds <= bulk_wait:
                events.at(clock.monotonic() + refused.seconds, lambda: warm_worker(budget, asked))
            else:  # 503 rate_limited, Retry-After 1: this worker pauses alone
                events.at(clock.monotonic() + 1.0, lambda: warm_worker(budget, clock.monotonic()))
            return
        sent.append((clock.monotonic() + wait, "bulk"))
        done = clock.monotonic() + 0.1  # the call, then the next id
        events.at(done, lambda: warm_worker(budget, done))

    for worker in range(8):
        budget = fleet.budgets[worker % len(fleet.budgets)]
        events.at(warm_from + worker * 0.01, lambda budget=budget: warm_worker(budget, clock.monotonic()))
    for n in range(65):  # then one new user a second
        events.at(warm_from + 1 + n, lambda: live(True))
    end = warm_from + 1 + 64
    events.run_until(end)

    assert answers == [True] * 65, f"{answers.count(False)} of 65 live requests found no slot"
    # As Amplitude counts arrivals: a call reaches it within the send allowance and connect timeout.
    last_minute = [cls for leaves, cls in sent if end - 60 < leaves <= end]
    assert len(last_minute) >= 118, (last_minute.count("live"), last_minute.count("bulk"))
    assert most_in_any_window([leaves for leaves, _ in sent], 60.0) <= 120
