"""The admission step of the SQLite tier: the Redis script's rules, in SQL and Python.

:func:`admit` runs inside the caller's ``BEGIN IMMEDIATE`` transaction, so it sees and
changes the log alone, as the Lua script in :mod:`app.stores.redis_shared` does in Redis:
the fleet's heartbeats, the grants in the window, the 429 back-off and the priority
rule's marks (the latest live slot, the bulk pace), then the decision of
:func:`app.core.window.decide`, the rule every back-end applies. It reads in one
statement and writes in one (:mod:`app.stores.sqlite_schema`'s ``admitted``), so the
file's lock is held across as few returns to Python as the decision allows.

A file's log may begin with a *ramp*: created without knowing what was spent before (a
new gunicorn master replacing an old one), it counts the limit as spent evenly over the
window before ``since``, its first admission (as :meth:`app.core.window.SlidingWindow.occupy`
does in one process from its start), kept as arithmetic rather than rows. From the first
admission, not from the file's creation: slots freed before anyone could use them (while
the workers boot) would otherwise be missing from the first window's work. A machine's
file beside Redis learns what was spent from the fleet's log instead: the first heartbeat
that carries the log's count (:attr:`~app.stores.shared.AdmitRequest.carried`) counts that
many grants as made at that moment, and no ramp.

An attempt that names a machine episode (:attr:`~app.stores.shared.AdmitRequest.episode`)
is decided only while that episode runs (see :mod:`app.stores.sqlite_machine`); once it
is over the answer is :data:`~app.stores.shared.ENDED` and nothing is written.
"""

from __future__ import annotations

import math
import sqlite3

from app.core.window import NEVER, Marks, decide
from app.stores.shared import BACKING_OFF, ENDED, GRANTED, HEARTBEAT, REFUSED, AdmitReply, AdmitRequest

#: Carried grants are counted as made this long after the heartbeat that carries them: a
#: live request's reservation lies at most ``BUDGET_MAX_WAIT_SECONDS`` (1.4 s at most) ahead.
CARRIED_AHEAD_SECONDS = 1.5

# Everything admission reads, in one statement. This process is counted as if its
# heartbeat were already written (it is, with the decision).
_STATE = """
SELECT (SELECT count(*) FROM fleet WHERE seen > :fleet_horizon AND member != :me),
       (SELECT count(*) FROM fleet WHERE seen >= :alive_since AND member != :me),
       (SELECT count(*) FROM grants WHERE stamp > :horizon),
       (SELECT value FROM meta WHERE name = 'since'),
       (SELECT count(*) FROM meta WHERE name = 'since' AND value IS NULL),
       (SELECT expires_at FROM kv WHERE key = 'backoff' AND expires_at > :now),
       (SELECT value FROM meta WHERE name = 'live_until'),
       (SELECT value FROM meta WHERE name = 'bulk_due'),
       coalesce((SELECT value FROM meta WHERE name = 'away'), 0),
       coalesce((SELECT value FROM meta WHERE name = 'epoch'), 0)
"""

_KTH = "SELECT stamp FROM grants WHERE stamp > ? ORDER BY stamp LIMIT 1 OFFSET ?"

_MERGE = "INSERT INTO grants (stamp, id) SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM grants WHERE id = ?)"

_WRITE = "INSERT INTO admitted (member, now, slot, live_until, bulk_due, grant_id) VALUES (?, ?, ?, ?, ?, ?)"


def admit(db: sqlite3.Connection, request: AdmitRequest, now: float) -> AdmitReply:
    """One admission attempt (or heartbeat) at *now* (wall time, read inside the transaction).

    Heartbeats delete what has left the window and the fleet; admissions only count past it.
    """
    r = request
    if r.now is not None:  # a test's clock (see AdmitRequest)
        now = r.now
    horizon = now - r.window
    merged = [(now - age, grant_id, grant_id) for grant_id, age in r.merges if now - age > horizon]
    if merged:  # a grant the log already holds (by its id) is not counted twice
        db.executemany(_MERGE, merged)
    if r.heartbeat_only:
        db.execute("DELETE FROM fleet WHERE seen <= ?", (now - r.fleet_horizon,))
        db.execute("DELETE FROM grants WHERE stamp <= ?", (horizon,))
    state = db.execute(
        _STATE,
        {"fleet_horizon": now - r.fleet_horizon, "alive_since": now - r.heartbeat_timeout, "horizon": horizon,
         "now": now, "me": r.process_id},
    ).fetchone()  # fmt: skip
    others, others_alive, logged, since, ramp_from_now, backoff_until, live_until, bulk_due, away, epoch = state
    # A process back from an outage remembers the fleet it knew (see app.budget).
    fleet = max(int(others) + 1, r.remembered_fleet)
    quiet = fleet - (int(others_alive) + 1)
    if r.episode is not None and not r.heartbeat_only and (int(away), int(epoch)) != (1, r.episode):
        return AdmitReply(ENDED, 0.0, fleet, int(logged))
    if ramp_from_now and r.carried is not None:
        # The fleet's log knows what was spent before this file: count that, not a ramp.
        db.execute("DELETE FROM meta WHERE name = 'since'")
        db.executemany("INSERT INTO grants (stamp) VALUES (?)", [(now + CARRIED_AHEAD_SECONDS,)] * r.carried)
        since, logged = None, int(logged) + r.carried
    elif ramp_from_now:
        db.execute("UPDATE meta SET value = ? WHERE name = 'since'", (now,))
        since = now
    ramp = _Ramp(None if since is None else float(since), r.limit, r.window, now)
    used = ramp.left + int(logged)

    def decided(reply: AdmitReply, slot: float | None = None, marks: Marks | None = None) -> AdmitReply:
        # The marks are written with a grant (the only thing that moves them), never as -inf.
        live, due = (None, None) if marks is None else (_finite(marks.live_until), _finite(marks.bulk_due))
        db.execute(_WRITE, (r.process_id, now, slot, live, due, r.grant_id))
        return reply

    if r.heartbeat_only:
        return decided(AdmitReply(HEARTBEAT, 0.0, fleet, used))
    if backoff_until is not None:
        return decided(AdmitReply(BACKING_OFF, max(0.001, float(backoff_until) - now), fleet, used))
    ceiling = r.limit - (r.limit // fleet) * quiet
    marks = Marks(NEVER if live_until is None else float(live_until), NEVER if bulk_due is None else float(bulk_due))
    decision = decide(now, used, lambda index: ramp.kth(db, index, horizon), ceiling, r.window, r.max_wait, r.bulk,
                      marks)  # fmt: skip
    if decision.slot is None:
        return decided(AdmitReply(REFUSED, decision.wait, fleet, used))
    return decided(AdmitReply(GRANTED, decision.wait, fleet, used + 1), decision.slot, decision.marks)


def _finite(mark: float) -> float | None:
    return None if mark == NEVER else mark


class _Ramp:
    """The grants a log created at ``since`` counts as spent before it, still in the window."""

    def __init__(self, since: float | None, limit: int, window: float, now: float) -> None:
        self.since = since
        self.step = window / limit
        self.window = window
        self.limit = limit
        if since is None or now - since >= window:
            self.left = 0
        elif now <= since:
            self.left = limit
        else:
            self.left = max(0, limit - math.floor((now - since) / self.step))

    def kth(self, db: sqlite3.Connection, index: int, horizon: float) -> float:
        """The grant at *index* from the oldest in the window: the ramp's first, then the log's.

        The ramp's grants all come before ``since``, and the log's after it.
        """
        if index < self.left and self.since is not None:
            return self.since - self.window + self.step * (self.limit - self.left + index + 1)
        row = db.execute(_KTH, (horizon, index - self.left)).fetchone()
        if row is None:  # cannot happen inside the transaction that counted the log
            raise sqlite3.DatabaseError("the admission log changed while it was read")
        return float(row[0])
