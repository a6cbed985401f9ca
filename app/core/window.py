"""Exact admission with live work first: at most *limit* grants in any window of *window* seconds.

A sliding log of grant times (the time each call may leave, which is later than now
when a live caller chose to wait for a slot). A grant may leave now while fewer than the
ceiling are logged; otherwise when the grant *ceiling* places from the newest has left
the window. Every window containing the new grant then holds at most the ceiling,
whatever was logged for later (a waiting caller's reservation). Unlike a token bucket,
nothing is held back by the shape of the rule: in steady state every slot of the window
is used.

:func:`decide` is the priority rule of :mod:`app.budget` for one attempt, given what
the log holds at that moment; :class:`SlidingWindow` keeps a log in this process and
applies it. The machine's SQLite file (:mod:`app.stores.sqlite_admission`) applies the
same function to its own log, and the Redis script (:mod:`app.stores.redis_shared`)
repeats it line for line.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass

from app.clock import Clock

NEVER = float("-inf")
#: How much before its pace a bulk grant may come: the shortest wait a refusal names (see
#: :class:`app.budget.NoSlot`). Where a step is shorter than this, a stricter pace would hold
#: bulk work below the limit; where it is longer, callers need not wake to the microsecond.
PACE_SLACK_SECONDS = 0.001


@dataclass(frozen=True, slots=True)
class Marks:
    """What the priority rule keeps beside the log's stamps.

    ``live_until``: the latest slot granted to a live request; while it is later than
    now, a live request is waiting for it. ``bulk_due``: the earliest moment bulk work
    may be granted its next slot (its pace).
    """

    live_until: float = NEVER
    bulk_due: float = NEVER


@dataclass(frozen=True, slots=True)
class Decision:
    """One attempt's outcome: the slot granted (``None``: refused) and the seconds from now
    until it, or until asking again is worth it; and the marks to keep."""

    slot: float | None
    wait: float
    marks: Marks


def decide(
    now: float,
    count: int,
    oldest: Callable[[int], float],
    ceiling: int,
    window: float,
    max_wait: float,
    bulk: bool,
    marks: Marks,
) -> Decision:
    """Apply the priority rule (see :mod:`app.budget`) to one attempt made at *now*.

    *count* grants lie in the window from now on, reservations included; ``oldest(i)`` is
    the *i*-th of them from the oldest. Only a granted decision changes the marks.
    """
    if ceiling <= 0:
        return Decision(None, window, marks)
    # The earliest slot the limit allows, given the grants already made.
    slot = now if count < ceiling else max(now, oldest(count - ceiling) + window)
    if not bulk:
        if slot - now > max_wait:
            return Decision(None, slot - now, marks)
        return Decision(slot, slot - now, Marks(max(marks.live_until, slot), marks.bulk_due))
    # Bulk work never reserves: a slot now, or the moment it may ask again.
    due = max(slot, marks.live_until, marks.bulk_due - PACE_SLACK_SECONDS)
    if due > now:
        return Decision(None, due - now, marks)
    step = window / ceiling
    # The next bulk grant is due a step after this one was due: one that asks a moment late
    # keeps its turn, so the pace does not drift below the steady rate. After a longer pause
    # the pace starts again from now.
    due = marks.bulk_due + step if now - marks.bulk_due <= step / 2 else now + step
    return Decision(now, 0.0, Marks(marks.live_until, due))


class SlidingWindow:
    """A thread-safe sliding log of grants on *clock*'s monotonic time."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit = limit
        self.window = window
        self._now = clock.monotonic
        self._grants: list[float] = []  # sorted
        self._marks = Marks()
        self._lock = threading.Lock()
        # Grants nobody made here (see occupy), before every real one: entry i of
        # ``_phantoms`` grants stands at ``_phantom_base + _phantom_step * (i + 1)``.
        # Kept as arithmetic, not entries: a limit can be a million a minute.
        self._phantoms = 0
        self._phantom_base = 0.0
        self._phantom_step = 0.0

    def _trim(self, now: float) -> None:
        horizon = now - self.window
        if self._phantoms:
            if self._phantom_step > 0:
                gone = min(self._phantoms, max(0, int((horizon - self._phantom_base) / self._phantom_step)))
            else:
                gone = self._phantoms if self._phantom_base <= horizon else 0
            self._phantoms -= gone
            self._phantom_base += gone * self._phantom_step
        gone = bisect.bisect_right(self._grants, horizon)
        if gone:
            del self._grants[:gone]

    def _count(self) -> int:
        return self._phantoms + len(self._grants)

    def _stamp(self, index: int) -> float:
        """The grant at *index* from the oldest, phantoms first."""
        if index < self._phantoms:
            return self._phantom_base + self._phantom_step * (index + 1)
        return self._grants[index - self._phantoms]

    def admit(self, max_wait: float, bulk: bool = False) -> Decision:
        """One attempt under the priority rule: a live caller reserves a slot within *max_wait*
        seconds; a bulk caller is granted one now or told when to ask again."""
        with self._lock:
            now = self._now()
            self._trim(now)
            decision = decide(now, self._count(), self._stamp, self.limit, self.window, max_wait, bulk, self._marks)
            if decision.slot is not None:
                bisect.insort(self._grants, decision.slot)
                self._marks = decision.marks
            return decision

    def reserve(self, max_wait: float) -> float | None:
        """Take the next slot if it comes within *max_wait* seconds; return the wait, or None."""
        decision = self.admit(max_wait)
        return None if decision.slot is None else decision.wait

    def seconds_until_slot(self) -> float:
        """How long until a live grant could leave (the whole window when none ever can)."""
        with self._lock:
            now = self._now()
            self._trim(now)
            return decide(now, self._count(), self._stamp, self.limit, self.window, 0.0, False, self._marks).wait

    def used(self) -> int:
        """Grants in the trailing window (reservations included)."""
        with self._lock:
            self._trim(self._now())
            return self._count()

    def occupy(self, count: int, spread: float = 0.0) -> None:
        """Count *count* grants nobody made here, spread evenly over the last *spread* seconds.

        For a window that has granted nothing yet, when what was spent before is unknown:
        ``spread=window`` ramps up as if it had been spent evenly, ``spread=0`` grants
        nothing for a whole window.
        """
        with self._lock:
            if self._count():
                raise ValueError("occupy() is for a window that has granted nothing yet")
            if count > 0:
                self._phantoms = count
                self._phantom_step = spread / count
                self._phantom_base = self._now() - spread
