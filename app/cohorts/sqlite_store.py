"""The cohort store in the machine's shared SQLite file: every process of one machine agrees.

Each operation that writes is one ``BEGIN IMMEDIATE`` transaction, which runs alone across
the file's processes (as a Lua script runs alone in Redis) and decides with
:mod:`app.cohorts.rules` inside it, as the shared tier's admission does. Within a process
one writer at a time holds the connection. Reads are one statement (or one read
transaction) on a connection borrowed from a small pool: WAL mode gives them a snapshot
without waiting for the writer.

Every call goes through :class:`app.stores.sqlite_calls.SqliteHandle`, as the shared tier's
do: under the gevent worker a call waiting for the file's lock would otherwise stall every
request of the process. Receiving and applying a batch are long calls, run on a pool thread.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

import orjson

from app.blocking import offload
from app.clock import SYSTEM_CLOCK, Clock, Deadline
from app.cohorts import rules
from app.cohorts import sqlite_tables as sql
from app.cohorts.payload import CohortBatch
from app.cohorts.rules import CohortRecord, Pair
from app.cohorts.sqlite_tables import connect, initialise_cohort_tables
from app.cohorts.store import (
    APPLIED,
    DUPLICATE_WINDOW_SECONDS,
    LEASE_LOST,
    LEASE_SECONDS,
    SUPERSEDED,
    Epoch,
    Leased,
    Lookup,
    record_fields,
    record_from,
)
from app.stores.shared import SharedUnavailable
from app.stores.sqlite_calls import SqliteHandle, transaction

T = TypeVar("T")

#: The longest an operation waits for the file's lock, and for this process's writer, by
#: default: twice that stays well inside the 1 s in which a webhook batch must be answered.
TIMEOUT_SECONDS = 0.3
#: Reads under way at once in one process (gevent's pool runs ten threads by default anyway).
MAX_READERS = 10
#: The longest a read waits for one of them when the caller gives no deadline. Waiting holds
#: nothing (a greenlet, or a thread that is waiting anyway), and an answer missed here costs
#: a Profile API call.
READ_WAIT_SECONDS = 1.0
#: Pairs of an older generation deleted per transaction after an arming, and at most how many rounds.
_PURGE_ROWS, _PURGE_ROUNDS = 5000, 1000


class SqliteCohortStore:
    """:class:`app.cohorts.store.CohortStore` in the machine's shared SQLite file."""

    name = "sqlite"

    def __init__(self, path: str, clock: Clock = SYSTEM_CLOCK, timeout: float = TIMEOUT_SECONDS) -> None:
        offload(initialise_cohort_tables, path, clock)
        self.path = path
        self.timeout = timeout
        self._clock = clock
        self._writing = threading.Lock()
        self._writer: SqliteHandle | None = None
        self._readers: list[SqliteHandle] = []
        self._reading = threading.BoundedSemaphore(MAX_READERS)
        self._connections: list[SqliteHandle] = []
        self._lock = threading.Lock()

    # -- running statements --------------------------------------------------------------

    def _open(self) -> SqliteHandle:
        handle = SqliteHandle(offload(connect, self.path, self.timeout))
        with self._lock:
            self._connections.append(handle)
        return handle

    def _write(self, operation: Callable[[sqlite3.Connection, float], T], long: bool = False) -> T:
        """Run *operation* in one ``BEGIN IMMEDIATE`` transaction on this process's writing connection."""
        if not self._writing.acquire(timeout=self.timeout):
            raise SharedUnavailable("this process's cohort writes are queued past the timeout")
        try:
            if self._writer is None:
                self._writer = self._open()
            clock = self._clock
            return self._writer.run(lambda db: _transaction(db, operation, clock), int(self.timeout * 1000), long)
        except sqlite3.Error as exc:
            raise SharedUnavailable(f"shared state file: {type(exc).__name__}: {exc}") from None
        finally:
            self._writing.release()

    def _read(self, query: Callable[[sqlite3.Connection, float], T], deadline: Deadline | None = None) -> T:
        """Run *query* on a reading connection (one statement, or its own read transaction)."""
        wait = READ_WAIT_SECONDS if deadline is None else deadline.capped(READ_WAIT_SECONDS)
        if not self._reading.acquire(timeout=wait):
            raise SharedUnavailable("this process's cohort reads are queued past the timeout")
        with self._lock:
            reader = self._readers.pop() if self._readers else None
        try:
            if reader is None:
                reader = self._open()
            clock = self._clock
            return reader.run(lambda db: query(db, clock.time()), max(1, int(wait * 1000)))
        except sqlite3.Error as exc:
            raise SharedUnavailable(f"shared state file: {type(exc).__name__}: {exc}") from None
        finally:
            if reader is not None:
                with self._lock:
                    self._readers.append(reader)
            self._reading.release()

    # -- the operations ------------------------------------------------------------------

    def enqueue(self, batch: CohortBatch) -> bool:
        body = batch.queued_form()

        def receive(db: sqlite3.Connection, now: float) -> bool:
            seen = db.execute(
                "SELECT 1 FROM cohort_queue WHERE message_id = ? AND (done = 0 OR received_at > ?)",
                (batch.message_id, now - DUPLICATE_WINDOW_SECONDS),
            ).fetchone()
            record = _record(db, batch.cohort_id)
            if seen is not None:
                repeated = rules.on_duplicate(record)
                if repeated is not None:
                    _put(db, repeated)
                return False
            (opened_at,) = db.execute("SELECT value FROM cohort_meta WHERE name = 'opened_at'").fetchone()
            record, counted = rules.on_receipt(record, batch, now, opened_at)
            _put(db, record)
            db.execute(
                "INSERT OR REPLACE INTO cohort_queue (message_id, cohort_id, body, counted, generation, received_at,"
                " available_at, token, done) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, 0)",
                (batch.message_id, batch.cohort_id, body, int(counted), record.generation, now, now),
            )
            db.execute(sql.PURGE_DONE, (now - DUPLICATE_WINDOW_SECONDS,))
            return True

        return self._write(receive, long=True)

    def lease(self, lease_seconds: float = LEASE_SECONDS) -> Leased | None:
        # A read first: an idle applier polling the queue takes no write lock.
        ready = self._read(
            lambda db, now: db.execute(
                "SELECT 1 FROM cohort_queue WHERE done = 0 AND available_at <= ? LIMIT 1", (now,)
            ).fetchone()
        )
        if ready is None:
            return None
        token = uuid.uuid4().hex

        def take(db: sqlite3.Connection, now: float) -> Leased | None:
            row = db.execute(sql.LEASE, {"token": token, "until": now + lease_seconds, "now": now}).fetchone()
            if row is None:
                return None
            message_id, body, counted, generation = row
            return Leased(message_id, token, bytes(body), bool(counted), int(generation))

        return self._write(take)

    def apply(self, leased: Leased, batch: CohortBatch) -> str:
        def apply_batch(db: sqlite3.Connection, now: float) -> str:
            row = db.execute(
                "SELECT token, done FROM cohort_queue WHERE message_id = ?", (leased.message_id,)
            ).fetchone()
            if row is None or row[1] or row[0] != leased.token:
                return LEASE_LOST
            record = _record(db, batch.cohort_id) or rules.new_record(batch.cohort_id, now, None)
            held = _held(db, batch.cohort_id, record.generation, batch.user_ids)
            plan = rules.plan_apply(record, batch, held, leased.counted, leased.generation, now)
            generation = plan.record.generation
            db.executemany(
                sql.UPSERT_PAIR,
                [(batch.cohort_id, user_id, generation, int(pair.member), pair.computed_time)
                 for user_id, pair in plan.writes.items()],
            )  # fmt: skip
            _put(db, plan.record)
            db.execute(
                "UPDATE cohort_queue SET done = 1, body = NULL, token = NULL WHERE message_id = ?", (leased.message_id,)
            )
            return SUPERSEDED if plan.superseded else APPLIED

        return self._write(apply_batch, long=True)

    def discard(self, leased: Leased) -> None:
        self._write(
            lambda db, now: db.execute(
                "UPDATE cohort_queue SET done = 1, body = NULL, token = NULL WHERE message_id = ? AND token = ?",
                (leased.message_id, leased.token),
            )
        )

    def lookup(self, cohort_id: str, user_id: str, deadline: Deadline | None = None) -> Lookup:
        def select(db: sqlite3.Connection, now: float) -> Lookup:
            row = db.execute(sql.LOOKUP, {"cohort": cohort_id, "user": user_id}).fetchone()
            if row is None:
                return Lookup(None, None, None)
            epoch, raw, member, computed_time, generation = row
            record = None if raw is None else record_from(orjson.loads(raw))
            pair = None
            if record is not None and member is not None and generation == record.generation:
                pair = Pair(bool(member), int(computed_time))
            return Lookup(str(epoch), record, pair, registered=record is not None)

        return self._read(select, deadline)

    def records(self) -> tuple[Epoch | None, list[CohortRecord]]:
        def select(db: sqlite3.Connection, now: float) -> tuple[Epoch | None, list[CohortRecord]]:
            db.execute("BEGIN")  # one snapshot for the epoch and every record
            try:
                epoch = _epoch(db)
                found = [record_from(orjson.loads(raw)) for (raw,) in db.execute("SELECT record FROM cohort_records")]
            finally:
                db.execute("COMMIT")
            return epoch, found

        return self._read(select)

    def open(self) -> Epoch:
        def open_epoch(db: sqlite3.Connection, now: float) -> Epoch:
            db.execute("UPDATE cohort_meta SET value = ? WHERE name = 'opened_at' AND value IS NULL", (now,))
            epoch = _epoch(db)
            if epoch is None:  # the tables are created with it: a file changed under us
                raise sqlite3.DatabaseError("the cohort store's epoch is missing")
            return epoch

        return self._write(open_epoch)

    def arm(self, cohort_id: str) -> CohortRecord:
        def arm_cohort(db: sqlite3.Connection, now: float) -> CohortRecord:
            record = rules.armed(_record(db, cohort_id), cohort_id, now)
            _put(db, record)
            return record

        record = self._write(arm_cohort)
        # The old generation's pairs already count as absent: delete them a chunk per
        # transaction, so no other writer waits long for the file.
        names = {"cohort": cohort_id, "generation": record.generation, "rows": _PURGE_ROWS}
        for _ in range(_PURGE_ROUNDS):
            if not self._write(lambda db, now: db.execute(sql.PURGE_GENERATION, names).rowcount):
                break
        return record

    def mark_lost(self, cohort_id: str, reason: str, generation: int | None = None) -> CohortRecord | None:
        def mark(db: sqlite3.Connection, now: float) -> CohortRecord | None:
            record = rules.lost(_record(db, cohort_id), cohort_id, reason, now, generation)
            if record is not None:
                _put(db, record)
            return record

        return self._write(mark)

    def close(self) -> None:
        """Close every connection this object opened (at shutdown: nothing uses them after)."""
        with self._lock:
            connections, self._connections, self._readers = self._connections, [], []
        for db in connections:
            try:
                offload(db.close)
            except sqlite3.Error:
                pass


def _transaction(db: sqlite3.Connection, operation: Callable[[sqlite3.Connection, float], T], clock: Clock) -> T:
    """*operation* in a transaction of its own (rolled back if it fails: safe to try again)."""
    return transaction(db, lambda db: operation(db, clock.time()))


def _record(db: sqlite3.Connection, cohort_id: str) -> CohortRecord | None:
    row = db.execute("SELECT record FROM cohort_records WHERE cohort_id = ?", (cohort_id,)).fetchone()
    return None if row is None else record_from(orjson.loads(row[0]))


def _put(db: sqlite3.Connection, record: CohortRecord) -> None:
    db.execute(
        "INSERT OR REPLACE INTO cohort_records (cohort_id, record) VALUES (?, ?)",
        (record.cohort_id, orjson.dumps(record_fields(record))),
    )


def _held(db: sqlite3.Connection, cohort_id: str, generation: int, user_ids: Sequence[str]) -> dict[str, Pair]:
    # The ids travel as one JSON array parameter, so the statement's text never depends on them.
    rows = db.execute(
        "SELECT user_id, member, computed_time FROM cohort_members WHERE cohort_id = ? AND generation = ?"
        " AND user_id IN (SELECT value FROM json_each(?))",
        (cohort_id, generation, orjson.dumps(list(user_ids)).decode()),
    )
    return {user_id: Pair(bool(member), int(ct)) for user_id, member, ct in rows}


def _epoch(db: sqlite3.Connection) -> Epoch | None:
    meta = dict(db.execute("SELECT name, value FROM cohort_meta WHERE name IN ('epoch', 'created_at', 'opened_at')"))
    if "epoch" not in meta:
        return None
    opened_at = meta.get("opened_at")
    return Epoch(str(meta["epoch"]), float(meta["created_at"]), None if opened_at is None else float(opened_at))
