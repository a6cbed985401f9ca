"""A circuit breaker: stop waiting on an upstream that keeps failing."""

from __future__ import annotations

import logging
import threading

from app.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Open after *threshold* consecutive failures; after *cooldown*, let one probe through.

    While open, callers are answered at once (stale data, a fallback or a 503) instead of
    each spending a token and a timeout on an upstream that is down.
    """

    def __init__(self, threshold: int, cooldown: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._now = clock.monotonic
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at = 0.0
        self._state = CLOSED
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._now() - self._opened_at >= self.cooldown:
                return HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """Whether a call may go upstream now; in half-open, only the single probe may."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN:
                if self._now() - self._opened_at < self.cooldown:
                    return False
                self._state = HALF_OPEN
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def seconds_until_retry(self) -> float:
        with self._lock:
            if self._state == OPEN:
                return max(0.0, self.cooldown - (self._now() - self._opened_at))
            return 1.0 if self._state == HALF_OPEN else 0.0

    def record_success(self) -> None:
        with self._lock:
            if self._state != CLOSED:
                log.warning("circuit closed: Amplitude is answering again")
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probe_in_flight = False
            if self._state == HALF_OPEN or self._failures >= self.threshold:
                if self._state != OPEN:
                    log.warning(
                        "circuit open after %d failures: not calling Amplitude for %.0f s",
                        self._failures,
                        self.cooldown,
                    )
                self._state = OPEN
                self._opened_at = self._now()

    def release(self) -> None:
        """Give back a probe slot taken by :meth:`allow` when no call was made."""
        with self._lock:
            self._probe_in_flight = False
