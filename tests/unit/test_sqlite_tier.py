"""The SQLite tier on a temporary file and a fake clock: the Redis tier's semantics, no sockets.

Two :class:`SqliteShared` objects on one file stand for two processes of one machine.
"""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.budget import FLEET_HORIZON_SECONDS, HEARTBEAT_TIMEOUT_SECONDS, UpstreamBudget
from app.clock import Deadline
from app.errors import RateLimited
from app.stores.shared import BACKING_OFF, GRANTED, HEARTBEAT, REFUSED, AdmitRequest, SharedBusy, SharedUnavailable
from app.stores.sqlite import CONTENDED_GRACE_SECONDS, RETRY_AFTER_FAILURE_SECONDS, SqliteShared
from app.stores.sqlite_schema import initialise
from testkit.clock import FakeClock
from tests.unit.test_budget import WINDOW, most_in_any_window


def pair(path: Path, clock: FakeClock, history_known: bool = True, timeout: float = 0.5) -> tuple[SqliteShared, ...]:
    """Two processes' views of one new file."""
    initialise(str(path), clock, history_known=history_known)
    return SqliteShared(str(path), clock, timeout), SqliteShared(str(path), clock, timeout)


def ask(process: str, limit: int = 10, max_wait: float = 0.0, bulk: bool = False, **kwargs: object) -> AdmitRequest:
    fields: dict = dict(limit=limit, window=WINDOW, max_wait=max_wait, bulk=bulk, process_id=process,
                        grant_id=f"{process}:g", heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS,
                        fleet_horizon=FLEET_HORIZON_SECONDS)  # fmt: skip
    fields.update(kwargs)
    return AdmitRequest(**fields)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tiers(tmp_path: Path, clock: FakeClock):
    first, second = pair(tmp_path / "shared.sqlite3", clock)
    yield first, second
    first.close()
    second.close()


# -- profiles and claims -------------------------------------------------------------------


def test_one_claim_at_a_time_and_the_answer_released_with_it(tiers, clock):
    first, second = tiers
    taken = first.claim("lock:u1", "token-a", 2500, "p:u1", "p:n1")
    assert taken.taken and taken.entry is None and taken.negative is None
    refused = second.claim("lock:u1", "token-b", 2500, "p:u1", "p:n1")
    assert not refused.taken and refused.holder == "token-a"
    first.publish("p:u1", b"1.0\n{}", 60_000, "lock:u1", "token-a")
    assert second.get(["p:u1", "p:n1", "lock:u1", "failed:u1"]) == [b"1.0\n{}", None, None, None]
    again = second.claim("lock:u1", "token-b", 2500, "p:u1", "p:n1")
    assert again.taken and again.entry == b"1.0\n{}"


def test_a_publish_never_releases_a_successors_claim(tiers, clock):
    first, second = tiers
    first.claim("lock:u1", "token-a", 1000, "p:u1", "p:n1")
    clock.advance(1.5)  # the first holder's claim expired
    assert second.claim("lock:u1", "token-b", 1000, "p:u1", "p:n1").taken
    first.publish("p:u1", b"1.0\n{}", 60_000, "lock:u1", "token-a")  # late, but its answer is good
    assert second.get(["lock:u1", "p:u1"]) == [b"token-b", b"1.0\n{}"]


def test_an_abandoned_claim_leaves_word_for_its_waiters_only_from_its_holder(tiers, clock):
    first, second = tiers
    first.claim("lock:u1", "token-a", 2500, "p:u1", "p:n1")
    second.abandon("lock:u1", "failed:u1", "token-b", "rate_limited", 5000)  # not its claim: nothing happens
    assert first.get(["lock:u1", "failed:u1"]) == [b"token-a", None]
    first.abandon("lock:u1", "failed:u1", "token-a", "rate_limited", 5000)
    assert second.get(["lock:u1", "failed:u1"]) == [None, b"token-a\nrate_limited"]
    clock.advance(5)
    assert second.get(["failed:u1"]) == [None]


def test_an_abandon_without_a_reason_only_releases(tiers):
    first, _ = tiers
    first.claim("lock:u1", "token-a", 2500, "p:u1", "p:n1")
    first.abandon("lock:u1", "failed:u1", "token-a", "", 5000)
    assert first.get(["lock:u1", "failed:u1"]) == [None, None]


def test_entries_expire_and_each_publish_purges_a_few_expired_rows(tiers, clock, tmp_path):
    first, _ = tiers
    for n in range(20):
        first.publish(f"p:u{n}", b"1.0\n{}", 1000, f"lock:u{n}", "t")
    clock.advance(2)
    assert first.get(["p:u0", "p:u19"]) == [None, None]
    for n in range(3):
        first.publish(f"p:v{n}", b"1.0\n{}", 60_000, f"lock:v{n}", "t")
    rows = sqlite3.connect(tmp_path / "shared.sqlite3").execute("SELECT count(*) FROM kv").fetchone()[0]
    assert rows == 3  # 20 expired, 3 x 8 purged, 3 new


# -- admission -------------------------------------------------------------------------------


def test_two_processes_share_one_log(tiers, clock):
    first, second = tiers
    granted = [tier.admit(ask(f"p{n % 2}")).granted for n, tier in enumerate([first, second] * 6)]
    assert granted == [GRANTED] * 10 + [REFUSED] * 2
    reply = first.admit(ask("p0"))
    assert reply.fleet == 2 and reply.used == 10 and reply.wait == pytest.approx(WINDOW)
    clock.advance(WINDOW)
    assert second.admit(ask("p1")).granted == GRANTED


def test_a_wait_within_max_wait_reserves_the_slot_it_waits_for(tiers, clock):
    first, second = tiers
    first.admit(ask("p0"))
    clock.advance(1)
    for _ in range(9):
        first.admit(ask("p0"))
    clock.advance(WINDOW - 1.2)
    first.admit(ask("p0", heartbeat_only=True))  # still there: its share is not held back
    reply = second.admit(ask("p1", max_wait=0.25))
    assert reply.granted == GRANTED and reply.wait == pytest.approx(0.2)
    assert first.admit(ask("p0", max_wait=0.25)).granted == REFUSED  # that slot is taken


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(min_value=1, max_value=40),
    steps=st.lists(st.tuples(st.floats(min_value=0, max_value=30), st.integers(min_value=0, max_value=30),
                             st.sampled_from([0.0, 0.25, 1.0]), st.booleans()), max_size=25),
)  # fmt: skip
def test_no_window_ever_holds_more_than_the_limit_whoever_asks(tmp_path_factory, limit, steps):
    clock = FakeClock()
    processes = pair(tmp_path_factory.mktemp("log") / "shared.sqlite3", clock)
    slots: list[float] = []
    for n, (advance, attempts, max_wait, bulk) in enumerate(steps):
        clock.advance(advance)
        for k in range(attempts):
            reply = processes[(n + k) % 2].admit(ask(f"p{(n + k) % 2}", limit, max_wait, bulk))
            if reply.granted == GRANTED:
                slots.append(clock.time() + reply.wait)
    for process in processes:
        process.close()
    assert most_in_any_window(slots, WINDOW) <= limit


def test_a_steady_flood_from_two_processes_uses_every_slot(tiers, clock):
    first, second = tiers
    grants = 0
    for tick in range(1300):  # 130 s
        clock.advance(0.1)
        tier = (first, second)[tick % 2]
        while tier.admit(ask(f"p{tick % 2}")).granted == GRANTED:
            grants += 1
    assert grants >= 10 * 2  # two full windows, every slot used as soon as it is free


def test_the_shares_of_processes_gone_quiet_are_held_back(tiers, clock):
    first, second = tiers
    second.admit(ask("p1", heartbeat_only=True))
    clock.advance(HEARTBEAT_TIMEOUT_SECONDS + 1)  # p1 went quiet: it may be granting on its own share
    replies = [first.admit(ask("p0")) for _ in range(6)]
    assert [reply.granted for reply in replies] == [GRANTED] * 5 + [REFUSED]  # 10 - 10 // 2
    clock.advance(FLEET_HORIZON_SECONDS)  # gone for good: its share is free again
    assert first.admit(ask("p0", heartbeat_only=True)).fleet == 1


def test_bulk_is_paced_and_waits_while_a_live_request_of_another_process_waits(tiers, clock):
    first, second = tiers
    step = WINDOW / 10
    assert second.admit(ask("p1", bulk=True)).granted == GRANTED
    paced = second.admit(ask("p1", bulk=True))
    assert paced.granted == REFUSED and paced.wait == pytest.approx(step, abs=0.001)  # one a step, not all at once
    for _ in range(9):
        assert first.admit(ask("p0")).granted == GRANTED  # live work is never paced
    clock.advance(WINDOW - 0.5)
    waiting = first.admit(ask("p0", max_wait=1.0))  # the window is full: reserves the first slot to free
    assert waiting.granted == GRANTED and waiting.wait == pytest.approx(0.5)
    refused = second.admit(ask("p1", bulk=True))
    assert refused.granted == REFUSED and refused.wait == pytest.approx(0.5)  # not while it waits
    clock.advance(0.5)  # the ten free at once: one is the live request's, bulk takes the others a step apart
    assert [second.admit(ask("p1", bulk=True)).granted for _ in range(2)] == [GRANTED, REFUSED]


def test_a_429_back_off_reaches_every_process(tiers, clock):
    first, second = tiers
    first.back_off(30)
    reply = second.admit(ask("p1"))
    assert reply.granted == BACKING_OFF and reply.wait == pytest.approx(30)
    clock.advance(30)
    assert second.admit(ask("p1")).granted == GRANTED


def test_grants_made_while_cut_off_are_merged_once_each_and_heartbeats_trim(tiers, clock, tmp_path):
    first, second = tiers
    merges = (("p0:1", 1.0), ("p0:2", 2.0), ("p0:3", WINDOW + 1))
    reply = first.admit(ask("p0", heartbeat_only=True, merges=merges))
    assert reply.granted == HEARTBEAT and reply.used == 2  # the one older than the window is dropped
    # Written back again (after another outage, say): the log already holds them by id.
    assert second.admit(ask("p1", heartbeat_only=True, merges=merges[:2])).used == 2
    clock.advance(WINDOW)
    first.admit(ask("p0", heartbeat_only=True))
    assert sqlite3.connect(tmp_path / "shared.sqlite3").execute("SELECT count(*) FROM grants").fetchone()[0] == 0


def test_a_new_file_ramps_up_as_if_the_limit_had_been_spent_evenly_before_its_first_admission(tmp_path, clock):
    first, second = pair(tmp_path / "shared.sqlite3", clock, history_known=False)
    clock.advance(WINDOW)  # the workers boot: nobody asks yet
    assert first.admit(ask("p0", limit=10)).granted == REFUSED
    clock.advance(WINDOW / 10 * 3 + 0.01)  # three of the ten have left the window
    assert [first.admit(ask("p0", limit=10)).granted for _ in range(4)] == [GRANTED] * 3 + [REFUSED]
    clock.advance(WINDOW / 10)
    assert second.admit(ask("p0", limit=10)).granted == GRANTED  # the log is the file's, not a process's


def test_a_machines_file_beside_redis_counts_what_redis_held_instead_of_a_ramp(tmp_path, clock):
    first, second = pair(tmp_path / "shared.sqlite3", clock, history_known=False)
    reply = first.admit(ask("p0", limit=10, heartbeat_only=True, carried=4))  # Redis's log held four
    assert reply.used == 4
    assert first.admit(ask("p1", heartbeat_only=True, carried=9)).used == 4  # carried once, by the first
    assert [second.admit(ask("p1", limit=10)).granted for _ in range(7)] == [GRANTED] * 6 + [REFUSED]
    clock.advance(WINDOW + 2)  # the carried four have left the window with the rest
    assert second.admit(ask("p1", limit=10)).granted == GRANTED


# -- a busy, broken or foreign file ---------------------------------------------------------------


def test_a_busy_file_fails_fast_and_is_left_alone_for_a_moment(tmp_path, clock):
    path = tmp_path / "shared.sqlite3"
    (tier,) = pair(path, clock, timeout=0.05)[:1]
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with pytest.raises(SharedUnavailable):
        tier.claim("lock:u1", "t", 1000, "p:u1", "p:n1")
    holder.execute("COMMIT")
    assert not tier.available()
    with pytest.raises(SharedUnavailable):
        tier.get(["p:u1"])  # skipped, not tried
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    assert tier.claim("lock:u1", "t", 1000, "p:u1", "p:n1").taken and tier.healthy
    holder.close()
    tier.close()


def test_a_contended_file_fails_one_operation_and_stays_in_use(tmp_path, clock):
    """The lock held past the wait while this process's writes went through lately (a busy
    machine): that operation fails and the file stays in use; a lock that stays held is
    taken for down once the grace has passed."""
    path = tmp_path / "shared.sqlite3"
    (tier,) = pair(path, clock, timeout=0.05)[:1]
    assert tier.claim("lock:u1", "t", 1000, "p:u1", "p:n1").taken  # a write that went through
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(SharedBusy):
        tier.claim("lock:u2", "t", 1000, "p:u2", "p:n2")
    assert tier.available() and tier.healthy and not tier.writes_ok  # operators see the failed write
    assert tier.get(["p:u1"]) == [None]  # still tried, not skipped
    clock.advance(CONTENDED_GRACE_SECONDS)
    with pytest.raises(SharedUnavailable) as stuck:
        tier.claim("lock:u2", "t", 1000, "p:u2", "p:n2")
    assert not isinstance(stuck.value, SharedBusy) and not tier.available()
    holder.execute("COMMIT")
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    assert tier.claim("lock:u2", "t", 1000, "p:u2", "p:n2").taken and tier.healthy and tier.writes_ok
    holder.close()
    tier.close()


def test_a_contended_admission_turns_away_that_request_alone(tmp_path, clock):
    """A budget on the file: an admission that finds the lock held past its wait is refused,
    and the next one, once the lock is free, is granted at once (no pause after a fault, no
    wait for a safe local share)."""
    path = tmp_path / "shared.sqlite3"
    (tier,) = pair(path, clock, timeout=0.05)[:1]
    budget = UpstreamBudget(10, shares=1, shared=tier, clock=clock, window=WINDOW)
    budget.acquire(max_wait=0.0)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(RateLimited):
        budget.acquire(max_wait=0.0)
    holder.execute("COMMIT")
    budget.acquire(max_wait=0.0)
    assert tier.admit(ask("other", heartbeat_only=True)).used == 2  # the refused attempt took nothing
    holder.close()
    budget.close()
    tier.close()


def test_readers_do_not_wait_for_the_writer(tiers, tmp_path):
    first, _ = tiers
    first.publish("p:u1", b"1.0\n{}", 60_000, "lock:u1", "t")
    holder = sqlite3.connect(tmp_path / "shared.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    assert first.get(["p:u1"]) == [b"1.0\n{}"]
    holder.execute("ROLLBACK")
    holder.close()


def test_a_read_never_waits_past_the_deadline(tiers, clock):
    first, _ = tiers
    with pytest.raises(SharedUnavailable):
        first.get(["p:u1"], Deadline.after(clock, 0.0))
    assert first.available()  # the request ran out of time; nothing is wrong with the file


def test_writes_queue_in_turn_within_a_process(tiers):
    first, _ = tiers
    threads = [threading.Thread(target=first.admit, args=(ask("p0", limit=1000),)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert first.admit(ask("p0", limit=1000, heartbeat_only=True)).used == 20


def test_the_file_is_private_and_in_wal_mode(tiers, tmp_path):
    path = tmp_path / "shared.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b""])
def test_a_foreign_file_is_refused_at_start_and_an_empty_one_made_a_store(tmp_path, clock, content):
    path = tmp_path / "shared.sqlite3"
    path.write_bytes(content)
    if content:
        with pytest.raises(sqlite3.DatabaseError):
            SqliteShared(str(path), clock)
    else:
        SqliteShared(str(path), clock).close()


def test_a_file_of_another_schema_version_is_refused(tmp_path, clock):
    path = tmp_path / "shared.sqlite3"
    initialise(str(path), clock)
    sqlite3.connect(path, isolation_level=None).execute("PRAGMA user_version = 99")
    with pytest.raises(sqlite3.DatabaseError, match="version 99"):
        initialise(str(path), clock)
