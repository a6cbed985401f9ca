"""Exact admission: at most *limit* grants in any window of *window* seconds.

A sliding log of grant times (the time each call may leave, which is later than now
when a caller chose to wait for a slot), kept sorted. A grant may leave now while fewer
than the ceiling are logged; otherwise when the grant *ceiling* places from the newest
has left the window. Every window containing the new grant then holds at most the
ceiling, whatever was logged for later (a waiting caller's reservation), so a live
request never queues behind a bulk one's reservation. Unlike a token bucket, nothing is
held back by the shape of the rule: in steady state every slot of the window is used.
"""

from __future__ import annotations

import bisect
import threading

from app.clock import Clock


class SlidingWindow:
    """A thread-safe sliding log of grants on *clock*'s monotonic time."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit = limit
        self.window = window
        self._now = clock.monotonic
        self._grants: list[float] = []  # sorted
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

    def _next_slot(self, now: float, limit: int) -> float | None:
        """The earliest moment a grant can leave with at most *limit* in any window; None: never."""
        if limit <= 0:
            return None
        count = self._count()
        if count < limit:
            return now
        return max(now, self._stamp(count - limit) + self.window)

    def reserve(self, max_wait: float, limit: int | None = None) -> float | None:
        """Take the next slot if it comes within *max_wait* seconds; return the wait, or None.

        *limit* (at most :attr:`limit`) lowers the ceiling for this grant, e.g. for bulk
        work that must leave room for live traffic.
        """
        with self._lock:
            now = self._now()
            self._trim(now)
            slot = self._next_slot(now, self.limit if limit is None else min(limit, self.limit))
            if slot is None or slot - now > max_wait:
                return None
            bisect.insort(self._grants, slot)
            return slot - now

    def seconds_until_slot(self, limit: int | None = None) -> float:
        """How long until a grant could leave (the whole window when none ever can)."""
        with self._lock:
            now = self._now()
            self._trim(now)
            slot = self._next_slot(now, self.limit if limit is None else min(limit, self.limit))
            return self.window if slot is None else slot - now

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
