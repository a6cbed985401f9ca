"""A machine that was the whole fleet goes on without Redis, exactly, through its own file.

Budgets on a fake clock, sharing a real Redis (each example its own prefix, the fake
clock's time passed to the admission script as tests may: ``AdmitRequest.now``) and, per
machine, one SQLite file. "Redis goes away" is a hand-written switch in front of it.
Heartbeats are called where a test needs them (the budget's own heartbeat thread beats
in real time, which the fake clock does not follow).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from app.budget import HEARTBEAT_TIMEOUT_SECONDS, MACHINE, OWN_SHARE, SHARED, STOPPED, NoSlot, UpstreamBudget
from app.errors import RateLimited
from app.machine import MachineLog
from app.stores.redis import RedisTier
from app.stores.redis_shared import RedisShared
from app.stores.shared import AdmitReply, AdmitRequest, SharedUnavailable
from app.stores.sqlite_machine import AWAY, HANDING_BACK, QUIET, MachineFile
from app.stores.sqlite_schema import initialise
from testkit.clock import FakeClock

WINDOW = 60.5
LIMIT = 10


class SwitchedRedis:
    """Redis behind a switch (down: every operation fails as an unreachable Redis does), on the fake clock."""

    def __init__(self, tier: RedisShared, clock: FakeClock) -> None:
        self.tier = tier
        self.clock = clock
        self.name = tier.name
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise SharedUnavailable("redis is down")

    def admit(self, request: AdmitRequest) -> AdmitReply:
        self._check()
        return self.tier.admit(replace(request, now=self.clock.time()))

    def leave_fleet(self, process_id: str) -> None:
        self._check()
        self.tier.leave_fleet(process_id)

    def back_off(self, seconds: float) -> None:
        self._check()
        self.tier.back_off(seconds)

    def retry_now(self) -> None:
        pass

    def close(self) -> None:
        self.tier.close()


class Fleet:
    """Budgets sharing one Redis, each on a machine (a SQLite file) of its own or shared."""

    def __init__(self, url: str, directory: Path, clock: FakeClock) -> None:
        self.url = url
        self.prefix = f"machine-{uuid.uuid4().hex[:8]}"
        self.directory = directory
        self.clock = clock
        self.switches: list[SwitchedRedis] = []
        self.budgets: list[UpstreamBudget] = []
        self._files = itertools.count()

    def machine(self) -> str:
        """A new machine: a new file."""
        path = str(self.directory / f"machine-{next(self._files)}.sqlite3")
        initialise(path, self.clock)
        return path

    def process(self, machine: str) -> UpstreamBudget:
        tier = RedisShared(RedisTier(self.url, 1.0, prefix=self.prefix, clock=self.clock))
        switch = SwitchedRedis(tier, self.clock)
        switch.down = any(s.down for s in self.switches)
        budget = UpstreamBudget(LIMIT, 1, switch, clock=self.clock, window=WINDOW,  # type: ignore[arg-type]
                                machine=MachineLog(MachineFile(machine, self.clock), self.clock))  # fmt: skip
        self.switches.append(switch)
        self.budgets.append(budget)
        budget.heartbeat()
        return budget

    def redis_down(self, down: bool = True) -> None:
        for switch in self.switches:
            switch.down = down

    def redis_log(self) -> int:
        client = redis.Redis.from_url(self.url)
        try:
            return int(client.zcard(f"{self.prefix}:admission"))
        finally:
            client.close()

    def lose_redis_state(self) -> None:
        """Redis restarted empty (or failed over before a replica had the last writes)."""
        client = redis.Redis.from_url(self.url)
        try:
            keys = list(client.scan_iter(f"{self.prefix}:*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    def beat(self) -> None:
        for budget in self.budgets:
            budget.heartbeat()

    def close(self) -> None:
        self.redis_down(False)
        for budget in self.budgets:
            budget.close()
        for switch in self.switches:
            switch.close()


@pytest.fixture
def fleet(redis_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Fleet]:
    made = Fleet(redis_url, tmp_path, clock)
    yield made
    made.close()


def grants(ask: Callable[[], float], attempts: int) -> int:
    """How many of *attempts* live attempts (no wait) were granted."""
    granted = 0
    for _ in range(attempts):
        try:
            ask()
            granted += 1
        except NoSlot:
            pass
    return granted


def test_one_machine_goes_on_through_its_file_at_once_and_never_past_the_limit(fleet, clock):
    machine = fleet.machine()
    first, second = fleet.process(machine), fleet.process(machine)
    assert [first.mode(), second.mode()] == [SHARED, SHARED]
    for n in range(6):  # through Redis, each copied into the machine's file
        (first, second)[n % 2].try_acquire(0.0)
        clock.advance(0.5)
    fleet.redis_down()
    # The next attempt, whichever process makes it, goes to the file: 4 more, and no more.
    assert grants(lambda: first.try_acquire(0.0), 3) + grants(lambda: second.try_acquire(0.0), 3) == LIMIT - 6
    assert [first.mode(), second.mode()] == [MACHINE, MACHINE]
    clock.advance(WINDOW - 3.0 + 0.51)  # the first two Redis grants (at 0 and 0.5 s) have left the window
    fleet.beat()  # (every 1.7 s in the service: a process not heard from has its share held back)
    assert grants(lambda: second.try_acquire(0.0), 5) == 2


def test_back_on_redis_the_file_grants_are_written_back_before_any_redis_grant(fleet, clock):
    machine = fleet.machine()
    first, second = fleet.process(machine), fleet.process(machine)
    assert grants(lambda: first.try_acquire(0.0), 4) == 4
    fleet.redis_down()
    assert grants(lambda: second.try_acquire(0.0), 10) == LIMIT - 4  # through the file
    fleet.lose_redis_state()  # Redis comes back empty
    fleet.redis_down(False)
    clock.advance(1.0)
    first.heartbeat()  # the first process to reach Redis hands the episode back
    assert fleet.redis_log() == LIMIT  # every grant of the window, the file's and Redis's own
    assert first.mode() == SHARED
    # The other process finds the episode over and asks Redis, which knows the window is full.
    assert grants(lambda: second.try_acquire(0.0), 3) == 0
    assert second.mode() == SHARED
    assert fleet.redis_log() == LIMIT


def test_several_machines_keep_waiting_a_window_before_their_share(fleet, clock):
    first, second = fleet.process(fleet.machine()), fleet.process(fleet.machine())
    assert grants(lambda: first.try_acquire(0.0), 2) == 2
    fleet.redis_down()
    with pytest.raises(RateLimited) as refused:
        second.acquire(1.0)
    assert refused.value.retry_after >= WINDOW
    assert second.mode() == STOPPED
    clock.advance(WINDOW + HEARTBEAT_TIMEOUT_SECONDS)
    assert grants(lambda: second.try_acquire(0.0), 10) == LIMIT // 2  # its share of a fleet of two
    assert second.mode() == OWN_SHARE


def test_a_machine_that_left_counts_until_its_grants_leave_the_window(fleet, clock):
    here, elsewhere = fleet.process(fleet.machine()), fleet.process(fleet.machine())
    assert grants(lambda: elsewhere.try_acquire(0.0), 3) == 3
    elsewhere.close()  # its last process leaves the fleet: its grants are still in the window
    clock.advance(1.0)
    here.heartbeat()
    fleet.redis_down()
    with pytest.raises(RateLimited):
        here.acquire(0.5)  # not alone: the other machine's grants are not in this machine's file
    fleet.redis_down(False)
    clock.advance(WINDOW)
    here.heartbeat()  # they have left the window: this machine is the whole fleet now
    fleet.redis_down()
    assert grants(lambda: here.try_acquire(0.0), LIMIT + 2) == LIMIT
    assert here.mode() == MACHINE


def test_a_process_that_never_reached_redis_joins_the_episode(fleet, clock):
    machine = fleet.machine()
    first = fleet.process(machine)
    assert grants(lambda: first.try_acquire(0.0), 3) == 3
    fleet.redis_down()
    first.heartbeat()  # the machine switches to its file, idle or not
    assert first.mode() == MACHINE
    newcomer = fleet.process(machine)  # a worker started while Redis is away
    assert newcomer.mode() == MACHINE
    assert grants(lambda: newcomer.try_acquire(0.0), LIMIT) == LIMIT - 3


def test_a_live_request_waits_out_a_hand_back_under_way(fleet, clock, monkeypatch):
    machine = fleet.machine()
    first, second = fleet.process(machine), fleet.process(machine)
    fleet.redis_down()
    first.heartbeat()
    second.heartbeat()
    fleet.redis_down(False)
    other = MachineFile(machine, clock)  # a third process, midway through handing back
    begun, handed = other.hand_back(WINDOW)
    assert begun.away == HANDING_BACK and handed == []

    def finish_during_the_wait(seconds: float) -> None:
        FakeClock.sleep(clock, seconds)
        if other.state().away == HANDING_BACK:
            other.handed_back(begun.epoch, ok=True)

    monkeypatch.setattr(clock, "sleep", finish_during_the_wait)
    granted = first.acquire(1.0)  # settles after the hand-back, then takes a slot from Redis
    assert granted.waited < 1.0 and first.mode() == SHARED
    assert fleet.redis_log() == 1
    other.close()


# -- the machine's file, one operation at a time ---------------------------------------------------


def test_a_redis_grant_is_copied_only_while_the_machine_is_unchanged(tmp_path, clock):
    path = str(tmp_path / "machine.sqlite3")
    initialise(path, clock)
    one, two = MachineFile(path, clock), MachineFile(path, clock)
    assert one.identity() == two.identity() != MachineFile(str(_new(tmp_path, clock)), clock).identity()
    quiet = one.state()
    assert quiet.away == QUIET and one.mirror(clock.time(), "a:1", quiet.epoch)
    assert two.go_away(may_start=True).away == AWAY  # Redis failed for the other process
    assert not one.mirror(clock.time(), "a:2", quiet.epoch)  # asked Redis before that: not used
    assert one.go_away(may_start=False).away == AWAY  # joins the episode running
    begun, handed = one.hand_back(WINDOW)
    assert begun.away == HANDING_BACK and [grant_id for grant_id, _ in handed] == ["a:1"]
    assert two.go_away(may_start=True).away == HANDING_BACK  # no new episode while handing back
    clock.advance(6.0)  # the process handing back died: its hand-back is taken over
    assert two.go_away(may_start=False).away == AWAY
    assert one.handed_back(begun.epoch, ok=True).away == AWAY  # too late: it was taken over
    for file in (one, two):
        file.close()


def test_a_file_kept_from_version_2_is_brought_up_to_date(tmp_path, clock):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in (
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL)",
        "CREATE TABLE grants (stamp REAL NOT NULL)",
        "CREATE INDEX grants_stamp ON grants (stamp)",
        "CREATE TABLE fleet (member TEXT PRIMARY KEY, seen REAL NOT NULL)",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value REAL)",
        "CREATE VIEW admitted (member, now, slot, live_until, bulk_due) AS SELECT 0, 0, 0, 0, 0 WHERE 0",
        "INSERT INTO grants (stamp) VALUES (1.0)",
        "PRAGMA user_version = 2",
    ):
        db.execute(statement)
    db.close()
    initialise(str(path), clock)
    upgraded = MachineFile(str(path), clock)
    assert len(upgraded.identity()) == 32
    assert sqlite3.connect(path).execute("SELECT count(*), max(id) FROM grants").fetchone() == (1, None)
    upgraded.close()


def _new(directory: Path, clock: FakeClock) -> Path:
    path = directory / f"other-{uuid.uuid4().hex[:6]}.sqlite3"
    initialise(str(path), clock)
    return path
