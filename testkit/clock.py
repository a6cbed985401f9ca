"""A clock that tests move forward instead of sleeping."""

from __future__ import annotations

import threading


class FakeClock:
    """Wall and monotonic time that tests move forward instead of sleeping.

    ``sleep`` moves the clock instead of waiting, so code that waits on this clock
    (a budget token, a poll) returns at once with the time having passed.
    """

    #: Monotonic time is wall time minus this, so the two never look alike in a failure.
    MONOTONIC_OFFSET = 1_700_000_000.0

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()
        self.slept = 0.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - self.MONOTONIC_OFFSET

    def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        with self._lock:
            self.slept += seconds
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
