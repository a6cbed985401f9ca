"""The machine's SQLite file beside Redis: a copy of the machine's grants, and its state.

With Redis, every process of a machine keeps, in the machine's file (the SQLite tier's
file, the same format and rules: :mod:`app.stores.sqlite`), a copy of every grant Redis
gave it (*mirrors* it), so that when Redis goes away and the heartbeats showed this
machine's processes alone in the fleet, the file already holds every grant of the last
window and its processes go on admitting through it, exactly (see :mod:`app.machine`).

The file's ``meta`` table holds the machine's state: ``away`` is 0 while the machine
admits through Redis, 1 while it admits through this file (an *episode*), 2 while one
process hands the episode's grants back to Redis; ``epoch`` goes up by one at every
change of state, and ``away_at`` says when the last one happened. The rule the state
keeps (every change is one transaction on the file, so they take turns):

- A grant from Redis is used only if the file took its copy while the state was
  unchanged since before Redis was asked (same epoch, ``away`` 0): so an episode never
  starts without a grant Redis gave and the machine used, and a Redis grant never
  counts on Redis knowing grants made in an episode it has not been handed yet.
- A grant from the file is given only under the episode it names (``away`` 1, its
  epoch): once a process has begun handing back, no more.
- Handing back: the state turns to 2 and the process takes every grant of the window
  (with its id: Redis counts a grant it already holds once); once Redis has them, the
  state turns to 0. If Redis fails meanwhile, back to 1. A hand-back left at 2 for
  ``HAND_BACK_STALE_SECONDS`` (its process died) may be taken over.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from app.stores.sqlite import SqliteShared

#: A hand-back not finished within this long is taken to have died with its process.
HAND_BACK_STALE_SECONDS = 5.0

QUIET, AWAY, HANDING_BACK = 0, 1, 2

_STATE = """
SELECT coalesce((SELECT value FROM meta WHERE name = 'away'), 0),
       coalesce((SELECT value FROM meta WHERE name = 'epoch'), 0),
       coalesce((SELECT value FROM meta WHERE name = 'away_at'), 0)
"""

# The copy of a Redis grant, taken only while the state is what the process saw before it
# asked Redis: one statement (nothing returned: the state changed meanwhile).
_MIRROR = """
INSERT INTO grants (stamp, id) SELECT :stamp, :id
WHERE coalesce((SELECT value FROM meta WHERE name = 'epoch'), 0) = :epoch
  AND coalesce((SELECT value FROM meta WHERE name = 'away'), 0) = 0
RETURNING 1
"""

_SET = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)"


@dataclass(frozen=True, slots=True)
class MachineState:
    """The machine's state as the file holds it (see the module's docstring)."""

    away: int
    epoch: int
    away_at: float = 0.0


def _read_state(db: sqlite3.Connection) -> MachineState:
    away, epoch, away_at = db.execute(_STATE).fetchone()
    return MachineState(int(away), int(epoch), float(away_at))


def _change(db: sqlite3.Connection, state: MachineState, away: int, now: float) -> MachineState:
    changed = MachineState(away, state.epoch + 1, now)
    db.executemany(_SET, (("away", changed.away), ("epoch", changed.epoch), ("away_at", now)))
    return changed


class MachineFile(SqliteShared):
    """The machine's file beside Redis: the SQLite tier's operations, and the machine's state.

    Every operation raises :class:`~app.stores.shared.SharedUnavailable` as the SQLite
    tier's do when the file cannot be used.
    """

    name = "machine_file"

    def identity(self) -> str:
        """The machine's id: made with the file, the same for every process that opens it."""
        return str(self._read(lambda db, now: db.execute("SELECT id FROM machine").fetchone()[0], None))

    def state(self) -> MachineState:
        """The machine's state now (a read: it never waits for a writer)."""
        return self._read(lambda db, now: _read_state(db), None)

    def mirror(self, stamp: float, grant_id: str, epoch: int) -> bool:
        """Copy a grant Redis gave (at wall time *stamp*) into the file, if the state is still
        quiet at *epoch*; False: it changed, and the grant must not be used."""
        names = {"stamp": stamp, "id": grant_id, "epoch": epoch}
        return bool(self._write(lambda db, now: db.execute(_MIRROR, names).fetchall(), transaction=False))

    def go_away(self, may_start: bool) -> MachineState:
        """Join the running episode, or start one if *may_start* (the fleet was this machine).

        The state returned says what happened: ``away`` 1, an episode to admit under;
        2, a hand-back under way (wait for it); 0, none and none started.
        """

        def enter(db: sqlite3.Connection, now: float) -> MachineState:
            state = _read_state(db)
            stale = state.away == HANDING_BACK and now - state.away_at > HAND_BACK_STALE_SECONDS
            if stale or (state.away == QUIET and may_start):
                return _change(db, state, AWAY, now)
            return state

        return self._write(enter)

    def hand_back(self, window: float) -> tuple[MachineState, list[tuple[str, float]] | None]:
        """Begin handing the episode back to Redis: the new state and every grant of the
        window with an id (id, wall stamp). Only while an episode runs (or a hand-back
        went stale); otherwise the state as it is and None."""

        def begin(db: sqlite3.Connection, now: float) -> tuple[MachineState, list[tuple[str, float]] | None]:
            state = _read_state(db)
            stale = state.away == HANDING_BACK and now - state.away_at > HAND_BACK_STALE_SECONDS
            if state.away != AWAY and not stale:
                return state, None
            rows = db.execute("SELECT id, stamp FROM grants WHERE stamp > ? AND id IS NOT NULL", (now - window,))
            grants = [(str(grant_id), float(stamp)) for grant_id, stamp in rows]
            return _change(db, state, HANDING_BACK, now), grants

        return self._write(begin)

    def handed_back(self, epoch: int, ok: bool) -> MachineState:
        """End the hand-back begun at *epoch*: quiet if Redis took the grants (*ok*), else away again."""

        def end(db: sqlite3.Connection, now: float) -> MachineState:
            state = _read_state(db)
            if (state.away, state.epoch) != (HANDING_BACK, epoch):
                return state  # taken over meanwhile
            return _change(db, state, QUIET if ok else AWAY, now)

        return self._write(end)
