"""The rules of cohort membership kept from webhooks, as pure functions of (record, batch, now).

Every store (in-process, SQLite, Redis) keeps, per cohort, a :class:`CohortRecord` and a
:class:`Pair` per (cohort, user) it has heard of, and changes them only as these functions
say: the in-process and SQLite stores call them inside their lock or transaction; the Redis
store's Lua scripts (:mod:`app.cohorts.redis_store`) say the same, and the store tests run
one table of cases against all three.

**A pair** changes only for a batch whose ``computed_time`` is not older than the one it
holds; leavers are kept with their time, so an older "enter" arriving late cannot re-add
them. ``as_of`` is the newest ``computed_time`` applied to the cohort.

**Arming.** A cohort's answers can be trusted only from a full sync, and Amplitude's
payload does not mark one: the first sync of a cohort sends every member, later syncs send
changes, and both look the same. An empty store cannot tell its first day from its first
day after losing everything (a Redis restarted empty along with every process, a restart on
a temporary SQLite file). So a cohort counts batches towards a full sync only once it is
*armed*, which says "the next sync of this cohort is a full one":

- the operator *opens* a store once, when no Amplitude sync targets it yet (a new
  installation): every cohort first heard of after that is armed by its first batch;
- the operator *arms* one cohort (after a loss) just before Amplitude sends it whole again;
- a cohort first heard of in a store that is not open is *unarmed*; one whose data the store
  may have lost is *lost* (see :mod:`app.cohorts.membership` for how that is noticed). The
  opening and the arming live in the store itself, so whatever loses the members loses them.

**The full sync** of an armed cohort is the batches of its oldest computation since it was
armed: ``sync_time`` is the smallest ``computed_time`` received that is not older than
``armed_at`` (less :data:`ARM_SLACK_SECONDS` for clock skew); one computation's batches all
carry its ``computed_time``. Each batch received with ``computed_time <= sync_time`` is
counted as part of it (``pending_sync`` until applied) and restarts the quiet
(``quiet_since``). Later computations (the changes, every minute for a real-time cohort)
neither count nor restart the quiet. Batches computed before ``armed_at`` are superseded by
the full sync: not applied.

**Authoritative**: armed, a full sync received, none of its batches still queued, and no
batch of it received for ``COHORT_SETTLE_SECONDS``. From then on a user without a pair, or
with a leaving pair, is not a member. A full-sync batch arriving later (a late retry)
restarts the quiet: the cohort waits again rather than answer without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from app.cohorts.payload import CohortBatch

ARMED, UNARMED, LOST = "armed", "unarmed", "lost"

#: How much older than ``armed_at`` a full sync's ``computed_time`` may be (Amplitude's clock
#: against ours). The recovery procedure leaves minutes between the old sync's last batch
#: and the arming, so a straggler of the old sync is never taken for the new full sync.
ARM_SLACK_SECONDS = 60

#: Why a record is unarmed or lost, for operators.
REASONS = {
    "history_unknown": "the store began without a known history (new, or lost): arm the cohort, then resync it",
    "store_opened": "the store was opened: the cohort's first batches are its full sync",
    "armed_by_operator": "armed by the operator: waiting for the full sync",
    "store_reset": "the store was emptied or replaced since this process last read the cohort",
    "record_vanished": "the store lost the cohort's record (eviction?)",
    "members_vanished": "the store lost the cohort's members (eviction?)",
}


@dataclass(frozen=True, slots=True)
class Pair:
    """What the store holds for one (cohort, user): in or out, as of which computation."""

    member: bool
    computed_time: int


@dataclass(frozen=True, slots=True)
class CohortRecord:
    """One cohort's state in a store (times are wall-clock seconds of the service's machines)."""

    cohort_id: str
    state: str = UNARMED
    reason: str = "history_unknown"
    state_since: float = 0.0
    armed_at: float | None = None
    armed_by_operator: bool = False
    #: Bumped by each arming: batches counted before it no longer count.
    generation: int = 0
    sync_time: int | None = None
    quiet_since: float | None = None
    pending_sync: int = 0
    pending: int = 0
    members: int = 0
    pairs: int = 0
    last_computed_time: int | None = None
    last_received_at: float | None = None
    last_applied_at: float | None = None
    received: int = 0
    duplicates: int = 0
    applied: int = 0
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a cohort's answers may be served from the store, and why (or why not)."""

    authoritative: bool
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    """What applying one batch does: the record after it, and the pairs to write."""

    record: CohortRecord
    writes: dict[str, Pair]
    superseded: bool


def new_record(cohort_id: str, now: float, opened_at: float | None) -> CohortRecord:
    """The record of a cohort first heard of now: armed if the store was opened, else unarmed."""
    if opened_at is None:
        return CohortRecord(cohort_id, UNARMED, "history_unknown", now)
    return CohortRecord(cohort_id, ARMED, "store_opened", now, armed_at=opened_at)


def counts_towards_sync(record: CohortRecord, computed_time: int) -> bool:
    """Whether a batch computed at *computed_time* is (so far) part of the cohort's full sync."""
    if record.state != ARMED or record.armed_at is None or computed_time < record.armed_at - ARM_SLACK_SECONDS:
        return False
    return record.sync_time is None or computed_time <= record.sync_time


def on_receipt(
    record: CohortRecord | None, batch: CohortBatch, now: float, opened_at: float | None
) -> tuple[CohortRecord, bool]:
    """The record after a new (not repeated) batch is queued, and whether the batch counts towards the full sync."""
    current = record or new_record(batch.cohort_id, now, opened_at)
    counted = counts_towards_sync(current, batch.computed_time)
    changed = replace(
        current,
        name=batch.cohort_name or current.name,
        received=current.received + 1,
        pending=current.pending + 1,
        last_received_at=now,
    )
    if counted:
        pending_sync = current.pending_sync + 1
        changed = replace(changed, sync_time=batch.computed_time, quiet_since=now, pending_sync=pending_sync)
    return changed, counted


def on_duplicate(record: CohortRecord | None) -> CohortRecord | None:
    """The record after a repeated ``message_id`` is dropped (nothing but the count changes)."""
    return None if record is None else replace(record, duplicates=record.duplicates + 1)


def plan_apply(
    record: CohortRecord, batch: CohortBatch, held: Mapping[str, Pair], counted: bool, generation: int, now: float
) -> ApplyPlan:
    """Apply *batch* (queued under *generation*, *counted* towards the sync then) to the pairs *held*.

    *held* are the cohort's current pairs for the batch's users (absent: never heard of).
    """
    pending_sync = record.pending_sync
    if counted and generation == record.generation and pending_sync > 0:
        pending_sync -= 1
    superseded = (
        record.state == ARMED
        and record.armed_at is not None
        and batch.computed_time < record.armed_at - ARM_SLACK_SECONDS
    )
    writes: dict[str, Pair] = {}
    members, pairs, last = record.members, record.pairs, record.last_computed_time
    if not superseded:
        joined = int(batch.in_cohort)
        for user_id in batch.user_ids:
            old = held.get(user_id)
            if old is not None and batch.computed_time < old.computed_time:
                continue  # an older computation arriving late: the pair already knows better
            writes[user_id] = Pair(batch.in_cohort, batch.computed_time)
            if old is None:
                pairs += 1
                members += joined
            else:
                members += joined - int(old.member)
        last = batch.computed_time if last is None else max(last, batch.computed_time)
    changed = replace(
        record,
        pending=max(0, record.pending - 1),
        pending_sync=pending_sync,
        members=members,
        pairs=pairs,
        last_computed_time=last,
        applied=record.applied + 1,
        last_applied_at=now,
    )
    return ApplyPlan(changed, writes, superseded)


def armed(record: CohortRecord | None, cohort_id: str, now: float) -> CohortRecord:
    """The record after the operator arms the cohort: a new generation with no pairs, waiting for the full sync."""
    current = record or CohortRecord(cohort_id, state_since=now)
    return replace(
        current,
        state=ARMED,
        reason="armed_by_operator",
        state_since=now,
        armed_at=now,
        armed_by_operator=True,
        generation=current.generation + 1,
        sync_time=None,
        quiet_since=None,
        pending_sync=0,
        members=0,
        pairs=0,
        last_computed_time=None,
    )


def lost(
    record: CohortRecord | None, cohort_id: str, reason: str, now: float, generation: int | None
) -> CohortRecord | None:
    """The record after the store is found to have lost the cohort's data, or None to leave it as it is.

    With *generation*, only that generation is lost (one already re-armed is not); without,
    an arming by the operator (made after the loss, in the store that replaced the lost one) stands.
    """
    if record is None:
        return CohortRecord(cohort_id, LOST, reason, now)
    if record.state == LOST:
        return None
    if generation is not None and record.generation != generation:
        return None
    if generation is None and record.state == ARMED and record.armed_by_operator:
        return None
    return replace(record, state=LOST, reason=reason, state_since=now)


def verdict(record: CohortRecord | None, now: float, settle_seconds: float) -> Verdict:
    """Whether the cohort is authoritative at *now*: see the module's rules."""
    if record is None:
        return Verdict(False, "unknown", "no batch of this cohort has arrived")
    if record.state in (LOST, UNARMED):
        return Verdict(False, record.state, REASONS.get(record.reason, record.reason))
    if record.sync_time is None or record.quiet_since is None:
        return Verdict(False, "waiting", "armed: no batch of its full sync has arrived yet")
    if record.pending_sync > 0:
        return Verdict(False, "syncing", f"{record.pending_sync} batch(es) of the full sync still queued")
    quiet = now - record.quiet_since
    if quiet < settle_seconds:
        return Verdict(False, "settling", f"full sync quiet for {quiet:.0f} s of {settle_seconds:.0f} s")
    return Verdict(True, "authoritative", f"full sync computed at {record.sync_time} received")
