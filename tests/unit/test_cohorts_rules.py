"""The cohort rules as tables: pair ordering, the full sync's counting, authority, arming and loss."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.cohorts import rules
from app.cohorts.payload import CohortBatch
from app.cohorts.rules import ARM_SLACK_SECONDS, ARMED, LOST, UNARMED, CohortRecord, Pair

NOW = 1_800_000_000.0
T0 = 1_800_000_000
SETTLE = 300.0


def batch(computed_time: int = T0, in_cohort: bool = True, users: tuple[str, ...] = ("u1",)) -> CohortBatch:
    return CohortBatch("c1", "Cohort", in_cohort, computed_time, f"m-{computed_time}-{in_cohort}", users)


def armed_record(**changes: object) -> CohortRecord:
    return replace(CohortRecord("c1", ARMED, "store_opened", NOW - 1000, armed_at=NOW - 1000), **changes)


# -- one pair ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "computed_time", "in_cohort", "after", "members", "pairs"),
    [
        (None, T0, True, Pair(True, T0), 1, 1),  # first news of the user: a member
        (None, T0, False, Pair(False, T0), 0, 1),  # a leaver never seen: kept, with its time
        (Pair(True, T0), T0 + 60, False, Pair(False, T0 + 60), -1, 0),  # a newer leave removes
        (Pair(False, T0 + 60), T0, True, Pair(False, T0 + 60), 0, 0),  # an older enter arriving late: ignored
        (Pair(True, T0 + 60), T0, False, Pair(True, T0 + 60), 0, 0),  # an older leave arriving late: ignored
        (Pair(True, T0), T0, True, Pair(True, T0), 0, 0),  # the same computation again: nothing changes
        (Pair(False, T0), T0, True, Pair(True, T0), 1, 0),  # not older (equal): applied
        (Pair(False, T0), T0 + 1, True, Pair(True, T0 + 1), 1, 0),  # a newer enter re-adds
    ],
)
def test_a_pair_changes_only_for_a_computation_not_older(held, computed_time, in_cohort, after, members, pairs):
    record = armed_record(members=5, pairs=9)
    held_pairs = {} if held is None else {"u1": held}
    plan = rules.plan_apply(record, batch(computed_time, in_cohort), held_pairs, False, 0, NOW)
    assert {**held_pairs, **plan.writes}["u1"] == after
    assert (plan.record.members - 5, plan.record.pairs - 9) == (members, pairs)
    assert not plan.superseded


def test_as_of_is_the_newest_computation_applied_whatever_the_order():
    record = armed_record()
    record = rules.plan_apply(record, batch(T0 + 120), {}, False, 0, NOW).record
    record = rules.plan_apply(record, batch(T0 + 60, users=("u2",)), {}, False, 0, NOW).record
    assert record.last_computed_time == T0 + 120
    assert (record.applied, record.last_applied_at) == (2, NOW)


@pytest.mark.parametrize(
    ("state", "computed_time", "superseded"),
    [
        (ARMED, int(NOW - 1000 - ARM_SLACK_SECONDS) - 1, True),  # computed before the arming: the full sync wins
        (ARMED, int(NOW - 1000 - ARM_SLACK_SECONDS), False),  # within the clock-skew slack
        (ARMED, T0, False),
        (UNARMED, 1, False),  # not armed: everything applies (and the arming forgets it)
        (LOST, 1, False),
    ],
)
def test_batches_computed_before_the_arming_are_superseded(state, computed_time, superseded):
    plan = rules.plan_apply(armed_record(state=state), batch(computed_time), {}, False, 0, NOW)
    assert plan.superseded is superseded
    assert (plan.writes == {}) is superseded
    assert plan.record.applied == 1


# -- receipt: what counts towards the full sync --------------------------------------------


@pytest.mark.parametrize(
    ("record", "computed_time", "counted", "sync_time", "quiet_since"),
    [
        (None, T0, True, T0, NOW),  # first batch in an open store: the full sync begins
        (armed_record(sync_time=T0, quiet_since=NOW - 50), T0, True, T0, NOW),  # more of it: the quiet restarts
        (armed_record(sync_time=T0, quiet_since=NOW - 50), T0 + 60, False, T0, NOW - 50),  # a change: no reset
        # An older computation than the one taken for the full sync so far: it is the full sync.
        (armed_record(sync_time=T0, quiet_since=NOW - 50), T0 - 60, True, T0 - 60, NOW),
        (armed_record(), int(NOW - 1000 - ARM_SLACK_SECONDS) - 5, False, None, None),  # computed before the arming
        (CohortRecord("c1", UNARMED, "history_unknown", NOW - 10), T0, False, None, None),
        (CohortRecord("c1", LOST, "store_reset", NOW - 10), T0, False, None, None),
    ],
)
def test_receipt_counts_only_the_full_sync(record, computed_time, counted, sync_time, quiet_since):
    after, was_counted = rules.on_receipt(record, batch(computed_time), NOW, opened_at=NOW - 1000)
    assert was_counted is counted
    assert (after.sync_time, after.quiet_since) == (sync_time, quiet_since)
    assert after.pending_sync == (record.pending_sync if record else 0) + int(counted)
    before = record or CohortRecord("c1")
    assert (after.received, after.pending, after.last_received_at) == (before.received + 1, before.pending + 1, NOW)


@pytest.mark.parametrize(("opened_at", "state", "armed_at"), [(None, UNARMED, None), (NOW - 5, ARMED, NOW - 5)])
def test_a_cohort_first_heard_of_is_armed_only_in_an_open_store(opened_at, state, armed_at):
    record, counted = rules.on_receipt(None, batch(T0), NOW, opened_at)
    assert (record.state, record.armed_at, counted) == (state, armed_at, state == ARMED)


@pytest.mark.parametrize(
    ("counted", "queued_generation", "pending_sync_after"),
    [(True, 3, 1), (False, 3, 2), (True, 2, 2)],  # a batch counted before a re-arming no longer counts
)
def test_applying_a_counted_batch_of_this_generation_takes_it_off_the_sync(
    counted, queued_generation, pending_sync_after
):
    record = armed_record(generation=3, pending_sync=2, pending=4)
    plan = rules.plan_apply(record, batch(T0), {}, counted, queued_generation, NOW)
    assert (plan.record.pending_sync, plan.record.pending) == (pending_sync_after, 3)


# -- authority -----------------------------------------------------------------------------


SYNCED = armed_record(sync_time=T0, quiet_since=NOW - SETTLE, last_computed_time=T0)


@pytest.mark.parametrize(
    ("record", "authoritative", "status"),
    [
        (None, False, "unknown"),
        (CohortRecord("c1", UNARMED, "history_unknown", NOW), False, "unarmed"),
        (replace(SYNCED, state=LOST, reason="store_reset"), False, "lost"),
        (armed_record(), False, "waiting"),  # armed, nothing of the full sync yet
        (replace(SYNCED, pending_sync=1), False, "syncing"),  # a batch of it still queued
        (replace(SYNCED, quiet_since=NOW - SETTLE + 0.1), False, "settling"),
        (SYNCED, True, "authoritative"),  # quiet for exactly COHORT_SETTLE_SECONDS
        (replace(SYNCED, pending=7), True, "authoritative"),  # later changes queued: still authoritative
    ],
)
def test_verdict(record, authoritative, status):
    verdict = rules.verdict(record, NOW, SETTLE)
    assert (verdict.authoritative, verdict.status) == (authoritative, status)
    assert verdict.reason


def test_a_late_batch_of_the_full_sync_makes_the_cohort_wait_again():
    record, _ = rules.on_receipt(SYNCED, batch(T0), NOW, None)
    assert rules.verdict(record, NOW, SETTLE).status == "syncing"
    record = rules.plan_apply(record, batch(T0), {}, True, record.generation, NOW).record
    assert rules.verdict(record, NOW + SETTLE - 1, SETTLE).status == "settling"
    assert rules.verdict(record, NOW + SETTLE, SETTLE).authoritative


def test_changes_after_the_full_sync_never_delay_authority():
    record = SYNCED
    for minute in range(1, 30):  # a real-time cohort: a change every minute
        record, counted = rules.on_receipt(record, batch(T0 + 60 * minute), NOW + 60 * minute, None)
        assert not counted
        assert rules.verdict(record, NOW + 60 * minute, SETTLE).authoritative


# -- arming and loss -----------------------------------------------------------------------


@pytest.mark.parametrize("before", [None, CohortRecord("c1", LOST, "store_reset", NOW - 9, generation=4, members=7)])
def test_arming_starts_a_new_generation_waiting_for_the_full_sync(before):
    record = rules.armed(replace(before, pending_sync=3, sync_time=T0) if before else None, "c1", NOW)
    assert (record.state, record.armed_at, record.armed_by_operator) == (ARMED, NOW, True)
    assert record.generation == (before.generation if before else 0) + 1
    assert (record.sync_time, record.pending_sync, record.members, record.pairs) == (None, 0, 0, 0)
    assert rules.verdict(record, NOW + 10 * SETTLE, SETTLE).status == "waiting"


OPERATOR_ARMED = replace(SYNCED, armed_by_operator=True, generation=2)


@pytest.mark.parametrize(
    ("record", "generation", "becomes_lost"),
    [
        (None, None, True),  # a record that vanished: recreated as lost
        (SYNCED, None, True),  # auto-armed (store opened): the loss wins
        (CohortRecord("c1", UNARMED, "history_unknown", NOW), None, True),
        (OPERATOR_ARMED, None, False),  # armed by the operator after the loss: the arming stands
        (OPERATOR_ARMED, 2, True),  # this generation's pairs went missing
        (OPERATOR_ARMED, 1, False),  # an older generation's: already re-armed since
        (replace(SYNCED, state=LOST, reason="record_vanished"), None, False),  # already lost: first reason kept
    ],
)
def test_loss(record, generation, becomes_lost):
    after = rules.lost(record, "c1", "store_reset", NOW, generation)
    assert (after is not None) is becomes_lost
    if after is not None:
        assert (after.state, after.reason, after.state_since) == (LOST, "store_reset", NOW)
        assert not rules.verdict(after, NOW + 10 * SETTLE, SETTLE).authoritative
