"""Where cohort membership lives: the operations every store offers, and the in-process store.

A store holds an *epoch* (an id made when the store is created, with the time it was
opened, if it was), a queue of received batches, one :class:`CohortRecord` per cohort and
the (cohort, user) pairs, and changes them only as :mod:`app.cohorts.rules` says. The
shared stores, Redis (:mod:`app.cohorts.redis_store`) and the machine's SQLite file
(:mod:`app.cohorts.sqlite_store`), let every worker and instance agree; the in-process
store serves one process without a shared tier (and tests). Each operation is atomic across
the processes sharing the store and raises :class:`app.stores.shared.SharedUnavailable`
rather than wait long.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

from app.clock import SYSTEM_CLOCK, Clock, Deadline
from app.cohorts import rules
from app.cohorts.payload import CohortBatch
from app.cohorts.rules import CohortRecord, Pair

if TYPE_CHECKING:
    from app.stores.redis import RedisTier

#: How long a ``message_id`` is remembered to drop its repeats. Repeats are harmless to
#: the pairs (the same computation changes nothing twice); dropping them keeps the counts
#: and the full sync's quiet true. Amplitude retries within minutes; a day is plenty.
DUPLICATE_WINDOW_SECONDS = 86_400.0
#: How long an applier holds a batch before another may take it (its process may have died).
LEASE_SECONDS = 30.0

APPLIED, SUPERSEDED, LEASE_LOST = "applied", "superseded", "lease_lost"


@dataclass(frozen=True, slots=True)
class Epoch:
    """The store's identity: made with the store, so whatever loses its data loses it too."""

    id: str
    created_at: float
    opened_at: float | None = None


@dataclass(frozen=True, slots=True)
class Leased:
    """A queued batch one applier holds until ``LEASE_SECONDS`` after it took it."""

    message_id: str
    token: str
    body: bytes
    counted: bool
    generation: int
    #: The epoch it was queued in, where the store's keys depend on it.
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Lookup:
    """One snapshot of what a store holds for (cohort, user), with what tells whether it lost some.

    ``registered``: the store's epoch lists the cohort (Redis: a record evicted alone leaves
    it listed). ``pairs_held``: how many pairs the store holds for the cohort, when it can
    tell cheaply (Redis: a members hash evicted alone no longer matches ``record.pairs``).
    """

    epoch: str | None
    record: CohortRecord | None
    pair: Pair | None
    registered: bool = False
    pairs_held: int | None = None


class CohortStore(Protocol):
    """The operations every cohort store offers, each atomic across the processes sharing it."""

    name: str

    def enqueue(self, batch: CohortBatch) -> bool:
        """Queue *batch* durably and count it towards its cohort; False if its ``message_id`` was seen."""
        ...

    def lease(self, lease_seconds: float = LEASE_SECONDS) -> Leased | None:
        """Take the oldest queued batch no live applier holds, or None."""
        ...

    def apply(self, leased: Leased, batch: CohortBatch) -> str:
        """Apply a leased batch and take it off the queue, in one operation: APPLIED, SUPERSEDED or LEASE_LOST."""
        ...

    def discard(self, leased: Leased) -> None:
        """Take a batch that cannot be read off the queue."""
        ...

    def lookup(self, cohort_id: str, user_id: str, deadline: Deadline | None = None) -> Lookup:
        """What the store holds for the cohort and the user, as of one moment (waiting at most until *deadline*)."""
        ...

    def records(self) -> tuple[Epoch | None, list[CohortRecord]]:
        """The epoch and every cohort's record."""
        ...

    def open(self) -> Epoch:
        """Mark the store open: cohorts first heard of from now on are armed by their first batch."""
        ...

    def arm(self, cohort_id: str) -> CohortRecord:
        """Arm one cohort: forget its pairs and wait for its full sync (see :func:`rules.armed`)."""
        ...

    def mark_lost(self, cohort_id: str, reason: str, generation: int | None = None) -> CohortRecord | None:
        """Record that the store lost the cohort's data (see :func:`rules.lost`); the record, if changed."""
        ...

    def close(self) -> None: ...


def record_fields(record: CohortRecord) -> dict[str, Any]:
    """The record as a flat mapping (None values left out), for a Redis hash or a JSON row."""
    values = {f.name: getattr(record, f.name) for f in fields(CohortRecord)}
    values["armed_by_operator"] = int(record.armed_by_operator)
    return {name: value for name, value in values.items() if value is not None}


_INTS = {"generation", "sync_time", "pending_sync", "pending", "members", "pairs", "last_computed_time",
         "received", "duplicates", "applied"}  # fmt: skip
_FLOATS = {"state_since", "armed_at", "quiet_since", "last_received_at", "last_applied_at"}


def record_from(mapping: dict[str, Any]) -> CohortRecord:
    """Read back :func:`record_fields` (values may be bytes or str, as Redis returns them)."""
    values: dict[str, Any] = {}
    for name, raw in mapping.items():
        key = name.decode() if isinstance(name, bytes) else name
        value = raw.decode() if isinstance(raw, bytes) else raw
        if key in _INTS:
            values[key] = int(float(value))
        elif key in _FLOATS:
            values[key] = float(value)
        elif key == "armed_by_operator":
            values[key] = bool(int(value))
        elif key in ("cohort_id", "state", "reason", "name"):
            values[key] = value
    return CohortRecord(**values)


@dataclass
class _Entry:
    batch_body: bytes
    cohort_id: str
    counted: bool
    generation: int
    received_at: float
    available_at: float
    token: str | None = None


class LocalCohortStore:
    """A store in this process's memory: one process, no shared tier; forgets everything at exit."""

    name = "process"

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._epoch = Epoch(uuid.uuid4().hex, clock.time())
        self._records: dict[str, CohortRecord] = {}
        self._pairs: dict[str, dict[str, Pair]] = {}
        self._queue: dict[str, _Entry] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()

    def enqueue(self, batch: CohortBatch) -> bool:
        now = self._clock.time()
        with self._lock:
            while self._seen and next(iter(self._seen.values())) <= now - DUPLICATE_WINDOW_SECONDS:
                self._seen.popitem(last=False)
            record = self._records.get(batch.cohort_id)
            if batch.message_id in self._seen or batch.message_id in self._queue:
                repeated = rules.on_duplicate(record)
                if repeated is not None:
                    self._records[batch.cohort_id] = repeated
                return False
            record, counted = rules.on_receipt(record, batch, now, self._epoch.opened_at)
            self._records[batch.cohort_id] = record
            self._seen[batch.message_id] = now
            self._queue[batch.message_id] = _Entry(
                batch.queued_form(), batch.cohort_id, counted, record.generation, now, now
            )
            return True

    def lease(self, lease_seconds: float = LEASE_SECONDS) -> Leased | None:
        now = self._clock.time()
        with self._lock:
            for message_id, entry in self._queue.items():
                if entry.available_at <= now:
                    entry.token = uuid.uuid4().hex
                    entry.available_at = now + lease_seconds
                    return Leased(message_id, entry.token, entry.batch_body, entry.counted, entry.generation)
        return None

    def apply(self, leased: Leased, batch: CohortBatch) -> str:
        now = self._clock.time()
        with self._lock:
            entry = self._queue.get(leased.message_id)
            if entry is None or entry.token != leased.token:
                return LEASE_LOST
            del self._queue[leased.message_id]
            record = self._records.get(batch.cohort_id) or rules.new_record(batch.cohort_id, now, None)
            pairs = self._pairs.setdefault(batch.cohort_id, {})
            plan = rules.plan_apply(record, batch, pairs, leased.counted, leased.generation, now)
            pairs.update(plan.writes)
            self._records[batch.cohort_id] = plan.record
            return SUPERSEDED if plan.superseded else APPLIED

    def discard(self, leased: Leased) -> None:
        with self._lock:
            entry = self._queue.get(leased.message_id)
            if entry is not None and entry.token == leased.token:
                del self._queue[leased.message_id]

    def lookup(self, cohort_id: str, user_id: str, deadline: Deadline | None = None) -> Lookup:
        with self._lock:
            record = self._records.get(cohort_id)
            pair = self._pairs.get(cohort_id, {}).get(user_id)
            return Lookup(self._epoch.id, record, pair, registered=record is not None)

    def records(self) -> tuple[Epoch | None, list[CohortRecord]]:
        with self._lock:
            return self._epoch, list(self._records.values())

    def open(self) -> Epoch:
        with self._lock:
            if self._epoch.opened_at is None:
                self._epoch = replace(self._epoch, opened_at=self._clock.time())
            return self._epoch

    def arm(self, cohort_id: str) -> CohortRecord:
        with self._lock:
            record = rules.armed(self._records.get(cohort_id), cohort_id, self._clock.time())
            self._records[cohort_id] = record
            self._pairs[cohort_id] = {}
            return record

    def mark_lost(self, cohort_id: str, reason: str, generation: int | None = None) -> CohortRecord | None:
        with self._lock:
            record = rules.lost(self._records.get(cohort_id), cohort_id, reason, self._clock.time(), generation)
            if record is not None:
                self._records[cohort_id] = record
            return record

    def close(self) -> None:
        pass


def open_store(redis: RedisTier | None, shared_state_path: str | None, clock: Clock = SYSTEM_CLOCK) -> CohortStore:
    """The store for the service's shared tier: Redis, else the machine's SQLite file, else this process.

    :raises sqlite3.Error: the SQLite file cannot be prepared (at start, like the shared tier's own).
    """
    if redis is not None:
        from app.cohorts.redis_store import RedisCohortStore

        return RedisCohortStore(redis, clock)
    if shared_state_path:
        from app.cohorts.sqlite_store import SqliteCohortStore

        return SqliteCohortStore(shared_state_path, clock)
    return LocalCohortStore(clock)
