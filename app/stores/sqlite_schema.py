"""The SQLite tier's file: its tables, the operations stored in it, and how it is created.

Tables: ``kv`` (profiles, not-founds, claims, failure notes and the 429 back-off, each
with a wall-time expiry), ``grants`` (the admission log: each grant's stamp, and its id
where it has one, so a grant written back twice is counted once), ``fleet`` (each
process's last heartbeat), ``meta`` (``since``: when the log began, null until the first
admission when what was spent before the file is unknown; ``live_until`` and
``bulk_due``: the priority rule's marks, see :mod:`app.budget`; ``away``, ``epoch`` and
``away_at``: the machine's state beside Redis, see :mod:`app.stores.sqlite_machine`)
and ``machine`` (one random id, made with the file: every process that opens the file
is on the same machine, see :mod:`app.machine`).

Operations that write several rows are stored in the file, as the Lua scripts are in
Redis: an ``INSERT`` into a view whose ``INSTEAD OF`` trigger does the writes. One
statement is one transaction, so each such operation takes the file's write lock once,
does all of its writes and lets go, without coming back to Python in between: a lock
held across a return to Python is held for as long as the thread then waits for the
GIL, milliseconds in a busy process.
"""

from __future__ import annotations

import sqlite3

from app.clock import SYSTEM_CLOCK, Clock
from app.stores.sqlite_calls import prepare_file, transaction

#: Bumped when the tables or stored operations change. A file of version 2 is brought up to
#: date at start (what it holds stays valid); one of any other version is refused.
SCHEMA_VERSION = 3
#: UPSERT with RETURNING.
MIN_SQLITE = (3, 35, 0)
#: How long start-up waits for the file (several workers may open it at once).
START_TIMEOUT_SECONDS = 10.0

_TABLES = (
    "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL)",
    "CREATE INDEX kv_expiry ON kv (expires_at)",
    "CREATE TABLE grants (stamp REAL NOT NULL)",
    "CREATE INDEX grants_stamp ON grants (stamp)",
    "CREATE TABLE fleet (member TEXT PRIMARY KEY, seen REAL NOT NULL)",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value REAL)",
)

#: What version 3 adds to version 2's tables (and a new file gets after them).
_VERSION_3 = (
    "ALTER TABLE grants ADD COLUMN id TEXT",
    "CREATE INDEX grants_id ON grants (id)",  # a grant written back is looked up by its id
    "CREATE TABLE machine (id TEXT NOT NULL)",
    "INSERT INTO machine (id) VALUES (lower(hex(randomblob(16))))",
    "DROP TRIGGER IF EXISTS admitted_op",
    "DROP VIEW IF EXISTS admitted",
)

_OPERATIONS = (
    # Write the answer, then release our own claim (never a successor's), then delete up to
    # eight expired rows (every row was written by a publish, so the purge keeps up): one statement.
    "CREATE VIEW publish (key, value, expires_at, lock, token, now) AS SELECT 0, 0, 0, 0, 0, 0 WHERE 0",
    """CREATE TRIGGER publish_op INSTEAD OF INSERT ON publish BEGIN
      INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (NEW.key, NEW.value, NEW.expires_at);
      DELETE FROM kv WHERE key = NEW.lock AND value = NEW.token;
      DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv WHERE expires_at <= NEW.now LIMIT 8);
    END""",
    # Release our own claim, leaving word of why (unless none) for the processes waiting on it.
    "CREATE VIEW abandon (lock, token, note, note_value, note_expires_at, now) AS SELECT 0, 0, 0, 0, 0, 0 WHERE 0",
    """CREATE TRIGGER abandon_op INSTEAD OF INSERT ON abandon BEGIN
      INSERT OR REPLACE INTO kv (key, value, expires_at)
        SELECT NEW.note, NEW.note_value, NEW.note_expires_at FROM kv
        WHERE key = NEW.lock AND value = NEW.token AND expires_at > NEW.now AND NEW.note_value IS NOT NULL;
      DELETE FROM kv WHERE key = NEW.lock AND value = NEW.token;
    END""",
)

_ADMITTED = (
    # What an admission writes once it has decided: the heartbeat, the grant (unless
    # refused) and the priority rule's marks (when the grant moved them).
    "CREATE VIEW admitted (member, now, slot, live_until, bulk_due, grant_id) AS SELECT 0, 0, 0, 0, 0, 0 WHERE 0",
    """CREATE TRIGGER admitted_op INSTEAD OF INSERT ON admitted BEGIN
      INSERT OR REPLACE INTO fleet (member, seen) VALUES (NEW.member, NEW.now);
      INSERT INTO grants (stamp, id) SELECT NEW.slot, NEW.grant_id WHERE NEW.slot IS NOT NULL;
      INSERT OR REPLACE INTO meta (name, value) SELECT 'live_until', NEW.live_until WHERE NEW.live_until IS NOT NULL;
      INSERT OR REPLACE INTO meta (name, value) SELECT 'bulk_due', NEW.bulk_due WHERE NEW.bulk_due IS NOT NULL;
    END""",
)


def connect(path: str, timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode: every transaction is one statement or written out."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = NORMAL")  # a cache and a minute's log: no fsync per commit
    db.execute("PRAGMA cache_size = -1024")  # 1 MB: another process's write empties it anyway
    return db


def initialise(path: str, clock: Clock = SYSTEM_CLOCK, history_known: bool = False) -> None:
    """Create the file (owner-only) in WAL mode with its tables and operations, unless done.

    A new file's admission log starts with a ramp from its first admission (see
    :mod:`app.stores.sqlite_admission`) unless *history_known*: nothing was spent against
    the limit before it.

    :raises sqlite3.Error: the file cannot be created, opened or written, or is of another version.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise sqlite3.NotSupportedError(f"SQLite {sqlite3.sqlite_version} is older than 3.35")
    db = prepare_file(path, connect, START_TIMEOUT_SECONDS)
    try:
        transaction(db, lambda db: _set_up(db, history_known))
    finally:
        db.close()


def _set_up(db: sqlite3.Connection, history_known: bool) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        for statement in (*_TABLES, *_OPERATIONS, *_VERSION_3, *_ADMITTED):
            db.execute(statement)
        if not history_known:
            db.execute("INSERT INTO meta (name, value) VALUES ('since', NULL)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    elif version == 2:  # a file kept from the version before: its rows stay valid
        for statement in (*_VERSION_3, *_ADMITTED):
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    elif version != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"the file has schema version {version}, not {SCHEMA_VERSION}")
