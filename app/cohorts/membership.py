"""Answers from the cohort store, and the watch that keeps a store that forgot from answering.

:meth:`CohortMembership.member` is what the membership route calls: ``None`` unless the
cohort is authoritative (:func:`app.cohorts.rules.verdict`), else whether the user is a
member and ``as_of``. It never answers ``False`` from a store that may have forgotten:

- **the store's epoch changed** (a Redis restarted empty, an epoch hash evicted, a SQLite file
  replaced): every cohort this process had seen in the old epoch is marked *lost* in the new
  one, with reason ``store_reset``. The new epoch is not open anyway, so no cohort in it is
  authoritative before it is armed; the mark says why, where operators look;
- **a cohort's record is gone** while the epoch lists it, or this process had seen it
  (``record_vanished``), or **its pairs are fewer than its record counts**
  (``members_vanished``, Redis only: a members hash evicted on its own): the cohort is marked
  lost;
- a store that cannot be read answers nothing (``None``): the route falls back as for any
  cohort that is not authoritative.

A lost cohort stays lost until the operator arms it again (:meth:`CohortMembership.arm`) and
Amplitude sends it whole: remove the cohort's webhook sync in Amplitude, wait two minutes
(so that no batch of the old sync is computed after the arming), arm the cohort, then add the
sync again, whose first run sends every member. After a loss of the whole store, arm every
cohort that way; open a store (:meth:`CohortMembership.open`) only when no Amplitude sync
targets it yet.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from app.clock import SYSTEM_CLOCK, Clock, Deadline
from app.cohorts import rules
from app.cohorts.rules import CohortRecord
from app.cohorts.settings import CohortSettings
from app.cohorts.store import CohortStore, Epoch, Lookup
from app.stores.shared import SharedUnavailable

log = logging.getLogger(__name__)

#: Cohorts one process remembers having seen (a deployment syncs a few dozen).
MEMORY_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class CohortAnswer:
    """A member or not, as of the newest ``computed_time`` applied to the cohort."""

    member: bool
    as_of: int


@dataclass(frozen=True, slots=True)
class CohortStatus:
    """One cohort as operators and metrics see it (ages in seconds, None: never)."""

    cohort_id: str
    name: str | None
    authoritative: bool
    status: str
    reason: str
    members: int
    last_computed_time: int | None
    last_batch_age: float | None
    last_applied_age: float | None
    queued: int
    received: int
    applied: int
    duplicates: int
    realtime: bool
    #: A real-time cohort without a batch for longer than COHORT_REALTIME_MAX_SILENCE_SECONDS.
    silent: bool


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The store's epoch and every cohort it knows of, or that is declared real-time."""

    store: str
    epoch: Epoch | None
    cohorts: tuple[CohortStatus, ...]


class CohortMembership:
    """The query side of the cohort store, with this process's memory of what it has seen."""

    def __init__(self, store: CohortStore, settings: CohortSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._epoch: str | None = None
        self._seen: set[str] = set()
        #: Losses noticed but not yet written (the store failed meanwhile): cohort -> reason.
        self._to_mark: dict[str, str] = {}

    def member(self, cohort_id: str, user_id: str, deadline: Deadline | None = None) -> CohortAnswer | None:
        """Whether *user_id* is in *cohort_id*, or None when the store is not authoritative for it
        (or cannot say before *deadline*, the request's)."""
        try:
            found = self.store.lookup(cohort_id, user_id, deadline)
            record = self._checked(cohort_id, found)
        except SharedUnavailable as exc:
            log.warning("cohort store unavailable (%s): membership answered by other means", exc)
            return None
        if record is None or not rules.verdict(record, self._clock.time(), self.settings.settle_seconds).authoritative:
            return None
        as_of = record.last_computed_time or record.sync_time or 0
        return CohortAnswer(found.pair is not None and found.pair.member, as_of)

    def status(self) -> StoreStatus:
        """Every cohort's status, for the operators' page and the metrics.

        :raises SharedUnavailable: the store cannot be read.
        """
        epoch, records = self.store.records()
        self._observe_epoch(epoch.id if epoch else None)
        with self._lock:
            vanished = self._seen - {record.cohort_id for record in records}
            for cohort_id in vanished:
                self._to_mark.setdefault(cohort_id, "record_vanished")
        if self._write_marks():
            epoch, records = self.store.records()  # show the marks just written
        now = self._clock.time()
        by_id = {record.cohort_id: record for record in records}
        with self._lock:
            if epoch is not None and self._epoch == epoch.id:
                self._remember(by_id)
        cohorts = [
            self._cohort_status(cohort_id, by_id.get(cohort_id), epoch, now)
            for cohort_id in sorted(set(by_id) | set(self.settings.realtime_ids))
        ]
        return StoreStatus(self.store.name, epoch, tuple(cohorts))

    def open(self) -> Epoch:
        """Open the store: only when no Amplitude sync targets it yet (see :mod:`app.cohorts.rules`)."""
        epoch = self.store.open()
        log.warning("cohort store opened: every cohort first heard of from now on is armed by its first batch")
        return epoch

    def arm(self, cohort_id: str) -> CohortRecord:
        """Arm one cohort just before Amplitude sends it whole (see this module's recovery steps)."""
        record = self.store.arm(cohort_id)
        log.warning("cohort %s armed: its pairs are forgotten until its full sync arrives", cohort_id)
        return record

    # -- noticing losses -----------------------------------------------------------------

    def _checked(self, cohort_id: str, found: Lookup) -> CohortRecord | None:
        """The record to judge, once every sign of a loss in *found* is marked in the store."""
        self._observe_epoch(found.epoch)
        record = found.record
        with self._lock:
            seen = cohort_id in self._seen
            if record is not None and found.epoch == self._epoch:
                self._remember({cohort_id: record})
        if record is None and (seen or found.registered):
            self._mark(cohort_id, "record_vanished")
        elif record is not None and found.pairs_held is not None and found.pairs_held != record.pairs:
            if record.state != rules.LOST:
                self._mark(cohort_id, "members_vanished", record.generation)
            record = None  # whatever the mark did, these pairs are not to be trusted
        if cohort_id in self._write_marks():
            return None  # judged before the mark: judge nothing of it
        return record

    def _observe_epoch(self, epoch: str | None) -> None:
        with self._lock:
            if epoch == self._epoch:
                return
            if self._epoch is not None:
                log.warning(
                    "cohort store epoch changed (%s -> %s): marking the %d cohorts seen before as lost",
                    self._epoch, epoch, len(self._seen),
                )  # fmt: skip
                for cohort_id in self._seen:
                    self._to_mark.setdefault(cohort_id, "store_reset")
            self._epoch, self._seen = epoch, set()

    def _remember(self, records: dict[str, CohortRecord]) -> None:
        for cohort_id in records:
            if len(self._seen) < MEMORY_LIMIT:
                self._seen.add(cohort_id)

    def _mark(self, cohort_id: str, reason: str, generation: int | None = None) -> None:
        log.warning("cohort %s lost (%s): not authoritative until armed and synced again", cohort_id, reason)
        try:
            self.store.mark_lost(cohort_id, reason, generation)
        except SharedUnavailable:
            with self._lock:
                self._to_mark.setdefault(cohort_id, reason)

    def _write_marks(self) -> set[str]:
        """Write the losses noticed (those that fail are kept for the next call); returns the cohorts concerned."""
        with self._lock:
            marks, self._to_mark = self._to_mark, {}
        for cohort_id, reason in marks.items():
            try:
                self.store.mark_lost(cohort_id, reason)
            except SharedUnavailable:
                with self._lock:
                    self._to_mark.setdefault(cohort_id, reason)
        return set(marks)

    def _cohort_status(
        self, cohort_id: str, record: CohortRecord | None, epoch: Epoch | None, now: float
    ) -> CohortStatus:
        verdict = rules.verdict(record, now, self.settings.settle_seconds)
        realtime = cohort_id in self.settings.realtime_ids
        last_received = record.last_received_at if record else None
        quiet_since = last_received if last_received is not None else (epoch.created_at if epoch else now)
        return CohortStatus(
            cohort_id=cohort_id,
            name=record.name if record else None,
            authoritative=verdict.authoritative,
            status=verdict.status,
            reason=verdict.reason,
            members=record.members if record else 0,
            last_computed_time=record.last_computed_time if record else None,
            last_batch_age=None if last_received is None else max(0.0, now - last_received),
            last_applied_age=None if record is None or record.last_applied_at is None else now - record.last_applied_at,
            queued=record.pending if record else 0,
            received=record.received if record else 0,
            applied=record.applied if record else 0,
            duplicates=record.duplicates if record else 0,
            realtime=realtime,
            silent=realtime and now - quiet_since > self.settings.realtime_max_silence_seconds,
        )
