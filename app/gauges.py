"""Gauges that stay true with several gunicorn workers.

A scrape is answered by one worker but reads every live worker's last values
(prometheus_client's multi-process files; each gauge's mode in
:class:`app.metrics.Metrics` says how they add up). So no worker may wait for a
scrape to bring its gauges up to date: each refreshes its own once a second (the circuit,
whose cool-down turns "open" into "half-open" with no event; the budget's window; the
trailing minute). What is shared is read from the shared place when the scrape comes:
the worker answering it pings Redis, and the newest answer is the one reported.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from app.budget import MODES
from app.metrics import CIRCUIT_STATES, Metrics

if TYPE_CHECKING:
    from app.braze_health import BrazeFailureWatch
    from app.budget import UpstreamBudget
    from app.core.breaker import CircuitBreaker
    from app.stores.redis import RedisTier
    from app.stores.sqlite import SqliteShared

log = logging.getLogger(__name__)

#: How often each worker refreshes its gauges between scrapes.
REFRESH_SECONDS = 1.0


class GaugePublisher:
    """Set this process's gauges from its state: in the background, and for each scrape."""

    def __init__(
        self,
        metrics: Metrics,
        breaker: CircuitBreaker,
        budget: UpstreamBudget,
        braze_watch: BrazeFailureWatch,
        redis: RedisTier | None,
        shared_file: SqliteShared | None = None,
        every: float = REFRESH_SECONDS,
    ) -> None:
        self.metrics = metrics
        self.breaker = breaker
        self.budget = budget
        self.braze_watch = braze_watch
        self.redis = redis
        self.shared_file = shared_file
        self.every = every
        # One writer at a time, so an older reading never overwrites a newer one.
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None

    def publish(self) -> None:
        """Set the gauges that describe this process: circuit, budget (and how it admits), Braze's
        trailing minute, and whether its last write to the shared state file (at least its
        heartbeat's, every 1.7 s) went through."""
        metrics = self.metrics
        budget = self.budget
        shared_file = self.shared_file
        with self._lock:
            metrics.shared_file_up.set(-1 if shared_file is None else int(shared_file.writes_ok))
            mode = budget.mode()
            for name in MODES:  # every mode, so a scrape shows 0 for those no worker is in
                metrics.admission_mode.labels(name).set(int(name == mode))
            answers, failures = self.braze_watch.last_minute()
            metrics.circuit.set(CIRCUIT_STATES[self.breaker.state])
            metrics.budget_tokens.set(budget.tokens_left())
            metrics.budget_utilization.set(budget.used() / budget.per_minute)
            metrics.braze_answers.set(answers)
            metrics.braze_failures.set(failures)
            metrics.braze_failure_share.set(failures / answers if answers else 0.0)

    def publish_for_scrape(self) -> None:
        """Everything, with Redis checked now: the answer is the newest, so it is the one reported."""
        self.publish()
        redis = self.redis
        if redis is None:
            reachable = -1
        elif redis.available():
            reachable = int(redis.ping())
        else:
            reachable = 0  # failed under a second ago: no timeout on every scrape of an outage
        self.metrics.redis_up.set(reachable)

    def start(self) -> None:
        """Refresh once a second in the background, for the scrapes other workers answer."""
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh, name="gauges", daemon=True)
            self._refresher.start()

    def close(self) -> None:
        self._closed.set()

    def _refresh(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # never let the refresher die
                log.exception("could not refresh the gauges")
            if self._closed.wait(self.every):
                return
