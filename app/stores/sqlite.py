"""The shared tier in one SQLite file: every process of one machine, and no server to run.

What Redis gives the Redis tier, this gives the processes of one machine:

- **Atomic operations.** Each operation that writes is one transaction, taking the
  file's write lock before it reads anything, so it runs alone across processes as a Lua
  script runs alone in Redis: one statement (a claim is one ``INSERT ... RETURNING``; a
  publish or an abandon is one ``INSERT`` into a view whose trigger does its writes, see
  :mod:`app.stores.sqlite_schema`), or for admission, which decides in Python, one
  ``BEGIN IMMEDIATE`` transaction (:mod:`app.stores.sqlite_admission`). Within a process
  one request at a time writes (a lock in front of one connection), so the processes, not
  dozens of requests, take turns at the file. Reads are one ``SELECT`` each, on a
  connection borrowed from a small pool: WAL mode gives them a snapshot without waiting
  for the writer.
- **Never stalling the worker.** Under the gevent worker a call that waited for the file's
  lock would stall every request of the process, cached answers included: each call runs
  at once without waiting, and only if the file is busy waits on a pool thread
  (:mod:`app.stores.sqlite_calls`).
- **One clock.** Expiry and the admission log use wall time (``clock.time()``; for
  admission read with the lock held, so the log's stamps follow the order of its
  writes), which every process on one machine shares, as every client of a Redis shares
  its ``TIME``. A wall clock stepped back makes grants look newer
  (stricter); the file never holds monotonic times, which restart at boot.
- **Bounded waits.** An operation waits at most ``timeout`` for the file's lock
  (``busy_timeout``: a third of the request deadline), and a read never past the
  request's own deadline; a live admission waits as long as its request may wait for a
  slot (``max_wait``), since waiting for the lock is waiting for the slot. Only upstream
  flights write, never a request thread: a request waits for its flight only until its
  deadline, so a write queued behind this process's other writers holds up no answer. A
  missing or broken file, or one whose lock stays held, raises :class:`SharedUnavailable` and is left alone for a
  second, as an unreachable Redis is: the caller carries on with its local cache and
  budget share. A file that is only contended (its lock held past the wait by other
  writers, on a machine too busy to schedule them, while this process wrote to it in the
  last ``CONTENDED_GRACE_SECONDS``) fails that one operation (:class:`SharedBusy`) and
  stays in use: taking it for down would turn away every new user for a second.

Expired rows are deleted a few at a time by each publish, so the file holds what Redis
would: every answer until its stale-if-error horizon ends.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from app.blocking import offload
from app.clock import SYSTEM_CLOCK, Clock, Deadline
from app.stores.shared import AdmitReply, AdmitRequest, ClaimReply, SharedBusy, SharedUnavailable
from app.stores.sqlite_admission import admit
from app.stores.sqlite_calls import SqliteHandle, contended
from app.stores.sqlite_calls import transaction as in_transaction
from app.stores.sqlite_schema import connect, initialise

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The longest an operation waits for the file's lock (``busy_timeout``) by default; the
#: service passes a third of ``REQUEST_DEADLINE_SECONDS``.
TIMEOUT_SECONDS = 0.5
#: After a failure, how long to serve without the file before trying it again.
RETRY_AFTER_FAILURE_SECONDS = 1.0
#: A lock held past the wait is contention, not a fault, if this process wrote to the file
#: this recently (its heartbeat writes every 1.7 s): a lock that stays stuck is taken for
#: down within this time of the last write that went through.
CONTENDED_GRACE_SECONDS = 5.0

#: Keys one read statement looks up (every read of the stores asks for two or four).
_GET_KEYS = 4
_GET = "SELECT key, value FROM kv WHERE key IN (?, ?, ?, ?) AND expires_at > ?"

# Take the claim unless another holds it unexpired, and return its holder (our token when
# taken) with what is stored for the profile: one statement.
_CLAIM = """
INSERT INTO kv (key, value, expires_at) VALUES (:lock, :token, :until)
ON CONFLICT (key) DO UPDATE SET
  value = CASE WHEN kv.expires_at <= :now THEN excluded.value ELSE kv.value END,
  expires_at = CASE WHEN kv.expires_at <= :now THEN excluded.expires_at ELSE kv.expires_at END
RETURNING value,
  (SELECT value FROM kv WHERE key = :entry AND expires_at > :now),
  (SELECT value FROM kv WHERE key = :negative AND expires_at > :now)
"""


class SqliteShared:
    """:class:`app.stores.shared.SharedTier` in one SQLite file shared by a machine's processes."""

    name = "sqlite"

    def __init__(self, path: str, clock: Clock = SYSTEM_CLOCK, timeout: float = TIMEOUT_SECONDS) -> None:
        initialise(path, clock)
        self.path = path
        self.timeout = timeout
        self._clock = clock
        self._now = clock.monotonic
        self._writing = threading.Lock()
        self._writer: SqliteHandle | None = None
        self._readers: list[SqliteHandle] = []  # idle reading connections
        self._connections: list[SqliteHandle] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._last_write = float("-inf")
        self._healthy = True
        self._closed = False
        self.last_error: str | None = None
        #: Whether this process's last write went through. Readers are not blocked by a
        #: writer in WAL mode, so a file whose write lock is stuck still reads: health as
        #: operators see it (/readyz, proxy_shared_file_available) follows the writes, which
        #: the budget heartbeat makes every 1.7 s.
        self.writes_ok = True

    # -- health ------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    def available(self) -> bool:
        return not self._closed and (self._healthy or self._now() >= self._down_until)

    def retry_now(self) -> None:
        with self._lock:
            self._down_until = 0.0

    def _failed(self, exc: BaseException) -> SharedUnavailable:
        with self._lock:
            self._down_until = self._now() + RETRY_AFTER_FAILURE_SECONDS
            self.last_error = type(exc).__name__
            if self._healthy:
                self._healthy = False
                log.warning(
                    "shared state file unavailable (%s: %s); serving from local cache and local budget share",
                    type(exc).__name__,
                    exc,
                )
        return SharedUnavailable(str(exc))

    def _succeeded(self) -> None:
        if not self._healthy:
            with self._lock:
                if not self._healthy:
                    self._healthy = True
                    log.warning("shared state file answers again; sharing cache and budget through it")

    def _check(self) -> None:
        if not self.available():
            raise SharedUnavailable(self.last_error or "shared state unavailable")

    # -- running operations --------------------------------------------------------------

    def _open(self) -> SqliteHandle:
        handle = SqliteHandle(offload(connect, self.path, self.timeout))
        with self._lock:
            self._connections.append(handle)
        return handle

    def _read(self, query: Callable[[sqlite3.Connection, float], T], deadline: Deadline | None) -> T:
        """Run *query* (one statement: its own snapshot) on a reading connection."""
        self._check()
        wait_ms = int((self.timeout if deadline is None else deadline.capped(self.timeout)) * 1000)
        if wait_ms <= 0:
            raise SharedUnavailable("no time left to read shared state")
        with self._lock:
            reader = self._readers.pop() if self._readers else None
        try:
            if reader is None:
                reader = self._open()
            result = reader.run(lambda db: query(db, self._clock.time()), wait_ms)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        finally:
            if reader is not None:
                with self._lock:
                    self._readers.append(reader)
        self._succeeded()
        return result

    def _write(
        self, operation: Callable[[sqlite3.Connection, float], T], transaction: bool = True, wait: float = 0.0
    ) -> T:
        """Run *operation* on this process's one writing connection: in one ``BEGIN
        IMMEDIATE`` transaction, alone across processes, or (``transaction=False``) as the
        one statement it is, which is a transaction of its own. It waits for the file's
        lock for ``timeout``, or *wait* if longer."""
        self._check()
        wait = max(wait, self.timeout)
        if not self._writing.acquire(timeout=max(wait, 3 * self.timeout)):
            raise self._busy(TimeoutError("this process's writes are queued past the timeout"))
        try:
            self._check()  # the writer before this one may have found the file broken
            writer = self._writer
            if writer is None:
                writer = self._writer = self._open()
            clock = self._clock
            result = writer.run(lambda db: _run_write(db, operation, transaction, clock), int(wait * 1000))
        except sqlite3.Error as exc:
            raise (self._busy(exc) if contended(exc) else self._failed(exc)) from None
        finally:
            self._writing.release()
        self.writes_ok = True
        self._last_write = self._now()
        self._succeeded()
        return result

    def _busy(self, exc: BaseException) -> SharedUnavailable:
        """The lock was held past the wait: contention while this process's writes go through
        lately (:class:`SharedBusy`: the file stays in use), else a fault."""
        self.writes_ok = False
        if self._now() - self._last_write < CONTENDED_GRACE_SECONDS:
            return SharedBusy(f"shared state file busy: {exc}")
        return self._failed(exc)

    # -- the operations ------------------------------------------------------------------

    def get(self, keys: Sequence[str], deadline: Deadline | None = None) -> list[bytes | None]:
        def select(db: sqlite3.Connection, now: float) -> list[bytes | None]:
            found: dict[str, bytes] = {}
            for start in range(0, len(keys), _GET_KEYS):  # one statement (one snapshot) for up to four
                chunk = list(keys[start : start + _GET_KEYS])
                chunk += chunk[:1] * (_GET_KEYS - len(chunk))
                found.update((key, bytes(value)) for key, value in db.execute(_GET, (*chunk, now)))
            return [found.get(key) for key in keys]

        return self._read(select, deadline)

    def claim(self, lock: str, token: str, ttl_ms: int, entry: str, negative: str) -> ClaimReply:
        def take(db: sqlite3.Connection, now: float) -> ClaimReply:
            names = {"lock": lock, "token": token.encode(), "until": now + ttl_ms / 1000, "now": now,
                     "entry": entry, "negative": negative}  # fmt: skip
            ((holder, stored, not_found),) = db.execute(_CLAIM, names).fetchall()
            if bytes(holder) == names["token"]:
                return ClaimReply(True, _bytes(stored), _bytes(not_found))
            return ClaimReply(False, holder=bytes(holder).decode())

        return self._write(take, transaction=False)

    def publish(self, key: str, value: bytes, ttl_ms: int, lock: str, token: str) -> None:
        self._write(
            lambda db, now: db.execute(
                "INSERT INTO publish VALUES (?, ?, ?, ?, ?, ?)",
                (key, value, now + ttl_ms / 1000, lock, token.encode(), now),
            ),
            transaction=False,
        )

    def abandon(self, lock: str, note: str, token: str, failure: str, note_ms: int) -> None:
        note_value = f"{token}\n{failure}".encode() if failure else None
        self._write(
            lambda db, now: db.execute(
                "INSERT INTO abandon VALUES (?, ?, ?, ?, ?, ?)",
                (lock, token.encode(), note, note_value, now + note_ms / 1000, now),
            ),
            transaction=False,
        )

    def admit(self, request: AdmitRequest) -> AdmitReply:
        asked = self._now()

        def decide(db: sqlite3.Connection, now: float) -> AdmitReply:
            # Time spent waiting for the lock was spent waiting for the slot.
            spent = self._now() - asked
            if spent > 0:
                return admit(db, replace(request, max_wait=max(0.0, request.max_wait - spent)), now)
            return admit(db, request, now)

        return self._write(decide, wait=request.max_wait)

    def leave_fleet(self, process_id: str) -> None:
        self._write(lambda db, now: db.execute("DELETE FROM fleet WHERE member = ?", (process_id,)), False)

    def back_off(self, seconds: float) -> None:
        self._write(
            lambda db, now: db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES ('backoff', x'31', ?)",
                (now + max(0.001, seconds),),
            ),
            transaction=False,
        )

    def close(self) -> None:
        """Close every connection this object opened (at shutdown: nothing uses them after)."""
        self._closed = True
        with self._lock:
            connections, self._connections = self._connections, []
        for handle in connections:
            try:
                handle.close()
            except sqlite3.Error:
                pass


def _bytes(raw: object) -> bytes | None:
    return bytes(raw) if isinstance(raw, (bytes, memoryview)) else None


def _run_write(
    db: sqlite3.Connection, operation: Callable[[sqlite3.Connection, float], T], transaction: bool, clock: Clock
) -> T:
    """The operation, in a transaction of its own when asked (rolled back if it fails: safe to try again)."""
    if not transaction:
        return operation(db, clock.time())
    return in_transaction(db, lambda db: operation(db, clock.time()))
