"""Membership answers on the in-process store and a fake clock: when the store may answer, and when not.

Each scenario runs the simulator's plan (a full sync, changes out of order, repeats, a late
full-sync batch) through the receiver and the applier, then asks about every user of the
population and compares with the simulator's truth.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.clock import Deadline
from app.cohorts.applier import CohortApplier
from app.cohorts.payload import CohortBatch
from app.cohorts.receiver import CohortReceiver, WebhookSecrets
from app.cohorts.settings import CohortSettings
from app.cohorts.store import LEASE_LOST, LEASE_SECONDS, CohortStore, Leased, LocalCohortStore, Lookup
from app.stores.shared import SharedUnavailable
from simulator.pushes import CohortPlan
from testkit import wait_until
from testkit.clock import FakeClock
from tests.cohort_support import SECRET, SETTLE, CohortRig

COHORT = "cohort_vip"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def plan_at(clock: FakeClock, users: int = 3000, step: int = 60) -> CohortPlan:
    return CohortPlan(COHORT, users=users, start=int(clock.time()), step=step, batch_size=400, properties=False)


def status_of(rig: CohortRig, cohort_id: str = COHORT) -> str:
    return {cohort.cohort_id: cohort.status for cohort in rig.membership.status().cohorts}[cohort_id]


def assert_agrees_with_truth(rig: CohortRig, plan: CohortPlan) -> None:
    answers = rig.answers(COHORT, plan.population)
    wrong = {user: answer for user, answer in answers.items() if answer != (user in plan.truth)}
    assert not wrong, f"{len(wrong)} answers disagree with the simulator, e.g. {list(wrong.items())[:5]}"


def test_an_opened_store_becomes_authoritative_after_the_full_sync_settles(clock):
    rig = CohortRig(LocalCohortStore(clock), clock)
    rig.membership.open()
    plan = plan_at(clock)
    rig.receive(plan.deliveries())
    assert status_of(rig) == "syncing"  # received, not applied: the full sync is not in yet
    assert rig.membership.member(COHORT, "user-42") is None
    rig.apply_all()
    assert status_of(rig) == "settling"
    clock.advance(SETTLE - 1)
    assert status_of(rig) == "settling"
    assert rig.membership.member(COHORT, "user-42") is None
    clock.advance(1)
    assert status_of(rig) == "authoritative"
    assert_agrees_with_truth(rig, plan)
    answer = rig.membership.member(COHORT, "user-42")
    assert answer is not None and answer.member and answer.as_of == plan.times[2]
    assert rig.membership.member(COHORT, "someone-never-synced") == replace(answer, member=False)
    assert rig.membership.member("cohort_other", "user-42") is None  # another cohort: not synced


def test_later_rounds_of_changes_keep_it_authoritative_and_true(clock):
    rig = CohortRig(LocalCohortStore(clock), clock)
    rig.membership.open()
    plan = plan_at(clock)
    rig.receive(plan.deliveries())
    rig.apply_all()
    clock.advance(SETTLE)
    for _ in range(5):  # a real-time cohort: changes every minute
        clock.advance(60)
        rig.receive(plan.flap_round(now=int(clock.time())))
        assert status_of(rig) == "authoritative"
        rig.apply_all()
        assert_agrees_with_truth(rig, plan)


def test_a_store_never_opened_does_not_trust_what_it_hears(clock):
    rig = CohortRig(LocalCohortStore(clock), clock)
    plan = plan_at(clock)
    rig.receive(plan.deliveries())
    rig.apply_all()
    clock.advance(10 * SETTLE)
    assert status_of(rig) == "unarmed"
    assert set(rig.answers(COHORT, plan.population[:50]).values()) == {None}


def test_arming_then_a_full_sync_recovers_and_forgets_what_came_before(clock):
    rig = CohortRig(LocalCohortStore(clock), clock)
    stale = plan_at(clock, step=1)
    rig.receive(stale.syncs()[1])  # changes heard before the arming: untrustworthy
    rig.apply_all()
    clock.advance(600)
    rig.membership.arm(COHORT)
    assert status_of(rig) == "waiting"
    rig.receive(stale.syncs()[2])  # a straggler of the old sync, computed before the arming
    clock.advance(120)
    plan = plan_at(clock)  # Amplitude sends the cohort whole again
    rig.receive(plan.deliveries())
    rig.apply_all()
    assert rig.applier.counts["superseded"] == 1
    clock.advance(SETTLE)
    assert status_of(rig) == "authoritative"
    assert_agrees_with_truth(rig, plan)


class SwappableStore(LocalCohortStore):
    """A store whose contents can vanish, as a Redis restarted empty (a new epoch) or one evicting keys."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.clock = clock
        self.pairs_missing = 0
        self.down = False

    def restart_empty(self) -> None:
        fresh = LocalCohortStore(self.clock)
        self.__dict__.update({name: value for name, value in fresh.__dict__.items()})

    def evict_record(self, cohort_id: str) -> None:
        del self._records[cohort_id]

    def lookup(self, cohort_id: str, user_id: str, deadline: Deadline | None = None) -> Lookup:
        if self.down:
            raise SharedUnavailable("down")
        found = super().lookup(cohort_id, user_id, deadline)
        if found.record is None:
            return found
        return replace(found, pairs_held=found.record.pairs - self.pairs_missing)


def synced(clock: FakeClock, store: CohortStore) -> tuple[CohortRig, CohortPlan]:
    rig = CohortRig(store, clock)
    rig.membership.open()
    plan = plan_at(clock)
    rig.receive(plan.deliveries())
    rig.apply_all()
    clock.advance(SETTLE)
    assert rig.membership.member(COHORT, "user-42") is not None
    return rig, plan


def test_a_store_that_restarted_empty_is_lost_and_incremental_batches_do_not_make_it_authoritative(clock):
    store = SwappableStore(clock)
    rig, plan = synced(clock, store)
    store.restart_empty()
    assert rig.membership.member(COHORT, "user-42") is None
    cohort = rig.membership.status().cohorts[0]
    assert (cohort.status, cohort.authoritative) == ("lost", False)
    assert "emptied or replaced" in cohort.reason
    # Amplitude goes on sending changes only: no amount of quiet makes them a full sync.
    clock.advance(60)
    rig.receive(plan.flap_round(now=int(clock.time())))
    rig.apply_all()
    clock.advance(10 * SETTLE)
    assert rig.membership.member(COHORT, "user-42") is None
    assert status_of(rig) == "lost"
    # The operator's recovery: arm, then Amplitude sends the cohort whole.
    rig.membership.arm(COHORT)
    clock.advance(120)
    again = plan_at(clock)
    rig.receive(again.deliveries())
    rig.apply_all()
    clock.advance(SETTLE)
    assert_agrees_with_truth(rig, again)


def test_another_process_that_remembers_marks_the_loss_even_if_the_new_store_was_opened(clock):
    store = SwappableStore(clock)
    rig, plan = synced(clock, store)
    store.restart_empty()
    store.open()  # someone opened the new store: the cohort's first batches would be taken as a full sync
    rig.receive(plan.flap_round(now=int(clock.time()) + 60))
    rig.apply_all()
    clock.advance(10 * SETTLE)
    assert rig.membership.member(COHORT, "user-42") is None
    assert status_of(rig) == "lost"


def test_a_record_evicted_alone_is_lost(clock):
    store = SwappableStore(clock)
    rig, _ = synced(clock, store)
    store.evict_record(COHORT)
    assert rig.membership.member(COHORT, "user-42") is None
    assert status_of(rig) == "lost"


def test_pairs_evicted_alone_are_lost(clock):
    store = SwappableStore(clock)
    rig, _ = synced(clock, store)
    store.pairs_missing = 1
    assert rig.membership.member(COHORT, "user-42") is None
    store.pairs_missing = 0
    assert rig.membership.member(COHORT, "user-42") is None  # marked: stays lost until armed
    assert status_of(rig) == "lost"


def test_a_store_that_cannot_be_read_answers_nothing(clock):
    store = SwappableStore(clock)
    rig, _ = synced(clock, store)
    store.down = True
    assert rig.membership.member(COHORT, "user-42") is None
    store.down = False
    assert rig.membership.member(COHORT, "user-42") is not None


def test_a_batch_whose_applier_died_is_applied_once_by_another(clock):
    store = LocalCohortStore(clock)
    rig = CohortRig(store, clock)
    rig.membership.open()
    rig.receive(plan_at(clock).syncs()[0][:1])
    dead = store.lease()  # taken by an applier that dies before applying it
    assert dead is not None
    assert rig.applier.apply_pending() == 0  # leased: nobody else takes it yet
    clock.advance(LEASE_SECONDS)
    assert rig.applier.apply_pending() == 1
    assert store.apply(dead, CohortBatch.from_queued(dead.body)) == LEASE_LOST  # the dead one, back too late
    (record,) = store.records()[1]
    assert (record.applied, record.pending, record.pending_sync) == (1, 0, 0)


class DamagedStore(LocalCohortStore):
    """A store whose queued bodies come back damaged."""

    def lease(self, lease_seconds: float = LEASE_SECONDS) -> Leased | None:
        leased = super().lease(lease_seconds)
        return None if leased is None else replace(leased, body=b"{broken")


def test_an_unreadable_queued_batch_is_discarded(clock):
    store = DamagedStore(clock)
    rig = CohortRig(store, clock)
    rig.receive(plan_at(clock).syncs()[0][:1])
    assert rig.applier.apply_pending() == 1
    assert rig.applier.counts == {"discarded": 1}
    assert store.lease() is None


def test_a_real_time_cohort_silent_too_long_is_flagged(clock):
    settings = CohortSettings((SECRET,), realtime_ids=(COHORT, "cohort_never_seen"), realtime_max_silence_seconds=900)
    rig = CohortRig(LocalCohortStore(clock), clock, settings)
    rig.receive(plan_at(clock).syncs()[0][:1])
    clock.advance(900)
    silent = {cohort.cohort_id: cohort.silent for cohort in rig.membership.status().cohorts}
    assert silent == {COHORT: False, "cohort_never_seen": False}
    clock.advance(1)
    silent = {cohort.cohort_id: cohort.silent for cohort in rig.membership.status().cohorts}
    assert silent == {COHORT: True, "cohort_never_seen": True}
    rig.receive(plan_at(clock).flap_round(now=int(clock.time())))
    cohort = {cohort.cohort_id: cohort for cohort in rig.membership.status().cohorts}[COHORT]
    assert (cohort.silent, cohort.last_batch_age, cohort.realtime) == (False, 0.0, True)


def test_the_background_applier_applies_what_is_queued_when_woken(clock):
    store = LocalCohortStore(clock)
    outcomes: list[str] = []
    applier = CohortApplier(store, on_outcome=outcomes.append)
    rig = CohortRig(store, clock)
    rig.receiver = CohortReceiver(WebhookSecrets((SECRET,)), store, clock, on_queued=applier.wake)
    applier.start()
    try:
        rig.receive(plan_at(clock).syncs()[0])
        wait_until(lambda: store.records()[1][0].pending == 0, timeout=10)
    finally:
        applier.close()
    assert set(outcomes) == {"applied"}


def test_the_operators_page_alone_notices_a_store_that_restarted_empty(clock):
    store = SwappableStore(clock)
    rig, _ = synced(clock, store)
    rig.membership.status()  # remembered from the page, not only from lookups
    store.restart_empty()
    cohorts = rig.membership.status().cohorts
    assert [(cohort.cohort_id, cohort.status, cohort.members) for cohort in cohorts] == [(COHORT, "lost", 0)]


def test_the_operators_page_alone_notices_a_record_evicted(clock):
    store = SwappableStore(clock)
    rig, _ = synced(clock, store)
    store.evict_record(COHORT)
    cohorts = rig.membership.status().cohorts
    assert [(cohort.cohort_id, cohort.status) for cohort in cohorts] == [(COHORT, "lost")]
