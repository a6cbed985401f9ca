"""The cohort tables in the machine's shared SQLite file (their own schema version), and the statements on them.

They live beside the shared tier's tables (:mod:`app.stores.sqlite_schema`) in the same
file and under the same write lock, but are created and versioned here, by a row of
``cohort_meta``, so the two schemas change independently. The file's epoch (``epoch``,
``created_at``, ``opened_at``) is written in the transaction that creates the tables: a new
file is a new epoch, and a new epoch is never open (see :mod:`app.cohorts.rules`).

Tables:

- ``cohort_meta``: the schema version and the epoch.
- ``cohort_queue``: one row per ``message_id`` received in the last day. ``body`` holds the
  queued batch until it is applied (``done``), the row itself stays to drop repeats.
  ``available_at`` is the receipt time, then the end of an applier's lease.
- ``cohort_records``: each cohort's :class:`app.cohorts.rules.CohortRecord`, as JSON.
- ``cohort_members``: the pairs; a row of an older ``generation`` than its cohort's
  (the cohort was armed since) counts as absent until deleted.
"""

from __future__ import annotations

import sqlite3
import uuid

from app.clock import SYSTEM_CLOCK, Clock
from app.stores.sqlite_calls import prepare_file, transaction

#: Bumped when these tables change; a file holding another version is refused.
COHORT_SCHEMA_VERSION = 1
#: How long start-up waits for the file (several workers may open it at once).
START_TIMEOUT_SECONDS = 10.0

_TABLES = (
    "CREATE TABLE IF NOT EXISTS cohort_meta (name TEXT PRIMARY KEY, value)",
    """CREATE TABLE IF NOT EXISTS cohort_queue (
      message_id TEXT PRIMARY KEY, cohort_id TEXT NOT NULL, body BLOB, counted INTEGER NOT NULL,
      generation INTEGER NOT NULL, received_at REAL NOT NULL, available_at REAL NOT NULL, token TEXT,
      done INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS cohort_queue_ready ON cohort_queue (done, available_at)",
    "CREATE INDEX IF NOT EXISTS cohort_queue_received ON cohort_queue (received_at)",
    "CREATE TABLE IF NOT EXISTS cohort_records (cohort_id TEXT PRIMARY KEY, record BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS cohort_members (
      cohort_id TEXT NOT NULL, user_id TEXT NOT NULL, generation INTEGER NOT NULL,
      member INTEGER NOT NULL, computed_time INTEGER NOT NULL, PRIMARY KEY (cohort_id, user_id)) WITHOUT ROWID""",
)


def connect(path: str, timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode whose commits reach the disk before they return.

    ``synchronous = FULL``: a batch answered ``200`` is on disk, not only in the OS's cache,
    since Amplitude will not send it again.
    """
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")
    return db


def initialise_cohort_tables(path: str, clock: Clock = SYSTEM_CLOCK) -> None:
    """Create the file (owner-only) in WAL mode with the cohort tables and a new epoch, unless done.

    :raises sqlite3.Error: the file cannot be created, opened or written, or holds another version.
    """
    db = prepare_file(path, connect, START_TIMEOUT_SECONDS)
    try:
        transaction(db, lambda db: _set_up(db, clock))
    finally:
        db.close()


def _set_up(db: sqlite3.Connection, clock: Clock) -> None:
    for statement in _TABLES:
        db.execute(statement)
    row = db.execute("SELECT value FROM cohort_meta WHERE name = 'schema'").fetchone()
    if row is None:
        db.executemany(
            "INSERT INTO cohort_meta (name, value) VALUES (?, ?)",
            [("schema", COHORT_SCHEMA_VERSION), ("epoch", uuid.uuid4().hex), ("created_at", clock.time()),
             ("opened_at", None)],
        )  # fmt: skip
    elif row[0] != COHORT_SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"cohort tables of version {row[0]}, not {COHORT_SCHEMA_VERSION}")


# -- the statements of app.cohorts.sqlite_store ---------------------------------------------

LOOKUP = """
SELECT e.value, r.record, m.member, m.computed_time, m.generation
FROM cohort_meta e
LEFT JOIN cohort_records r ON r.cohort_id = :cohort
LEFT JOIN cohort_members m ON m.cohort_id = :cohort AND m.user_id = :user
WHERE e.name = 'epoch'
"""
UPSERT_PAIR = """
INSERT INTO cohort_members (cohort_id, user_id, generation, member, computed_time) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (cohort_id, user_id) DO UPDATE SET
  generation = excluded.generation, member = excluded.member, computed_time = excluded.computed_time
"""
LEASE = """
UPDATE cohort_queue SET token = :token, available_at = :until
WHERE message_id = (SELECT message_id FROM cohort_queue WHERE done = 0 AND available_at <= :now
                    ORDER BY available_at LIMIT 1)
RETURNING message_id, body, counted, generation
"""
PURGE_DONE = """
DELETE FROM cohort_queue WHERE message_id IN
  (SELECT message_id FROM cohort_queue WHERE done = 1 AND received_at <= ? LIMIT 16)
"""
PURGE_GENERATION = """
DELETE FROM cohort_members WHERE cohort_id = :cohort AND user_id IN
  (SELECT user_id FROM cohort_members WHERE cohort_id = :cohort AND generation < :generation LIMIT :rows)
"""
