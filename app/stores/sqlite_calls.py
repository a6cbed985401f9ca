"""SQLite calls that never stall the worker: run at once when the file is free, else wait off its thread.

Under the gevent worker every request of a process shares one OS thread, and SQLite's
wait for the file's lock (its busy handler sleeps in C) would stall all of them. Handing
every call to a pool thread (:func:`app.blocking.offload`) avoids that, but costs each call
two switches of the interpreter lock between threads, which on a busy machine took longer
than the calls themselves (``docs/benchmarks.md``: a stampede of new users on two cores
beside two CPU hogs). So a call first runs right here with no busy timeout at all: a read
in WAL mode, or a write while no other process is writing, takes microseconds. Only when
the file is busy does the call go to a pool thread and wait there, up to its timeout.
Under plain threads the call simply runs with its timeout.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from app.blocking import cooperative, offload

T = TypeVar("T")

#: The primary result codes of "another connection holds the lock" (extended codes share them).
_CONTENDED = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def contended(exc: sqlite3.Error) -> bool:
    """Whether *exc* says only that other connections held the file's lock past the wait."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CONTENDED


class SqliteHandle:
    """One connection and the busy timeout it is set to; used by one caller at a time."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._busy_ms: int | None = None

    def run(self, call: Callable[[sqlite3.Connection], T], wait_ms: int, long: bool = False) -> T:
        """``call(connection)``, waiting for the file's lock at most *wait_ms* (ms).

        A call must be safe to run again when its first try finds the file busy: one
        statement, or one transaction that rolls back on failure. A *long* call (applying a
        batch of a thousand users, say: milliseconds of work) goes to a pool thread at once.

        :raises sqlite3.Error: as the call raises it, or busy past *wait_ms*.
        """
        if not cooperative():
            self._set_busy(wait_ms)
            return call(self.db)
        if long:
            return offload(self._waiting, call, wait_ms)
        self._set_busy(0)
        try:
            return call(self.db)
        except sqlite3.OperationalError as exc:
            if not contended(exc) or wait_ms <= 0:
                raise
        return offload(self._waiting, call, wait_ms)

    def close(self) -> None:
        self.db.close()

    def _waiting(self, call: Callable[[sqlite3.Connection], T], wait_ms: int) -> T:
        # On a pool thread: the busy handler may sleep here without stalling anyone.
        self._set_busy(wait_ms)
        try:
            return call(self.db)
        finally:
            self._set_busy(0)

    def _set_busy(self, wait_ms: int) -> None:
        if self._busy_ms != wait_ms:
            self.db.execute(f"PRAGMA busy_timeout = {wait_ms:d}")
            self._busy_ms = wait_ms


def transaction(db: sqlite3.Connection, operation: Callable[[sqlite3.Connection], T]) -> T:
    """*operation* in one ``BEGIN IMMEDIATE`` transaction, alone across the file's processes
    (rolled back if it fails, so it is safe to try again)."""
    try:
        db.execute("BEGIN IMMEDIATE")
        result = operation(db)
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
    return result


def prepare_file(path: str, connect: Callable[[str, float], sqlite3.Connection], timeout: float) -> sqlite3.Connection:
    """Create *path* readable by the service's user only (it holds personal data), unless it
    exists, open it and put it in WAL mode: the connection to set its tables up with.

    :raises sqlite3.Error: the file cannot be created, opened, or put in WAL mode.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise sqlite3.OperationalError(f"cannot create the file: {exc.strerror}") from None
    db = connect(path, timeout)
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal mode {mode}, not WAL")
    except BaseException:
        db.close()
        raise
    return db
