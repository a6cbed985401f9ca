"""Time as a parameter: one clock per app, and one deadline per request.

Everything that reads the time or waits takes a :class:`Clock`, so tests tick a fake
clock instead of sleeping. "How long is left" has one answer, a :class:`Deadline`,
created when a request arrives and passed to everything that waits on its behalf.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Wall time (comparable across processes, for freshness), monotonic time, and sleep."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)

    @staticmethod
    def sleep(seconds: float) -> None:
        # Looked up at each call: gunicorn's master imports this module before the gevent
        # worker patches ``time.sleep``, and a reference taken then would block every
        # request of the worker while one of them sleeps.
        _time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True, slots=True)
class Deadline:
    """The monotonic moment by which an answer is due."""

    clock: Clock
    at: float

    @classmethod
    def after(cls, clock: Clock, seconds: float, start: float | None = None) -> Deadline:
        """A deadline *seconds* after *start* (a monotonic time; default: now)."""
        return cls(clock, (clock.monotonic() if start is None else start) + seconds)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - self.clock.monotonic())

    def expired(self) -> bool:
        return self.clock.monotonic() >= self.at

    def capped(self, seconds: float) -> float:
        """The shorter of *seconds* and what is left: how long one wait may take."""
        return max(0.0, min(seconds, self.at - self.clock.monotonic()))
