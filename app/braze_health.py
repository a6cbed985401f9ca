"""How close this service is to Braze's unhealthy-host detection.

Braze stops calling a host for a minute, for every campaign of the workspace, when it
sees more than 3,000 failures and more than 90% errors in one minute, counting 408, 429,
502, 503, 504 and 529. This counts the answers Braze would count, per minute, so an
operator sees the margin before Braze acts on it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from app.clock import Clock
from app.metrics import Metrics

log = logging.getLogger(__name__)

#: The statuses Braze counts as failures of a Connected Content host.
BRAZE_FAILURE_STATUSES = frozenset({408, 429, 502, 503, 504, 529})
#: Braze's thresholds, for the warning's text.
BRAZE_FAILURE_LIMIT, BRAZE_ERROR_SHARE = 3000, 0.9


class BrazeFailureWatch:
    """Answers and Braze-counted failures over the trailing minute, in one-second buckets."""

    def __init__(self, metrics: Metrics, clock: Clock, warn_share: float, warn_min: int) -> None:
        self.metrics = metrics
        self.warn_share = warn_share
        self.warn_min = warn_min
        self._now = clock.monotonic
        self._lock = threading.Lock()
        self._buckets: deque[list[int]] = deque()  # [second, answers, failures]
        self._answers = self._failures = 0
        self._last_warning = float("-inf")

    def record(self, status: int) -> None:
        """Count one answer (on the request thread: a lock and two additions)."""
        failed = status in BRAZE_FAILURE_STATUSES
        second = int(self._now())
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != second:
                self._roll(second)
            bucket = self._buckets[-1]
            bucket[1] += 1
            self._answers += 1
            if failed:
                bucket[2] += 1
                self._failures += 1

    def last_minute(self) -> tuple[int, int]:
        """(answers, Braze-counted failures) over the trailing 60 seconds."""
        with self._lock:
            self._expire(int(self._now()))
            return self._answers, self._failures

    def _expire(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - 60:
            _, answers, failures = self._buckets.popleft()
            self._answers -= answers
            self._failures -= failures

    def _roll(self, second: int) -> None:
        """A new second: drop old buckets, publish the minute's counts, warn if close to Braze's line."""
        self._expire(second)
        self._buckets.append([second, 0, 0])
        answers, failures = self._answers, self._failures
        share = failures / answers if answers else 0.0
        # Once a second, so every worker's gauges stay current without a scrape.
        self.metrics.braze_answers.set(answers)
        self.metrics.braze_failures.set(failures)
        self.metrics.braze_failure_share.set(share)
        if failures >= self.warn_min and share >= self.warn_share and second - self._last_warning >= 60:
            self._last_warning = second
            log.warning(
                "%d of %d answers in the last minute were failures Braze counts (%.0f%%); Braze stops calling "
                "this host for a minute past %d failures and %.0f%% errors: use default= in templates, lower the "
                "campaign's delivery rate limit or warm the cache",
                failures, answers, share * 100, BRAZE_FAILURE_LIMIT, BRAZE_ERROR_SHARE * 100,
            )  # fmt: skip
