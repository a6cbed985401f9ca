"""The applier: takes queued batches off the shared queue and applies them to the store.

Any process may run one (every worker does, by default): a batch is leased to one applier
for ``LEASE_SECONDS``, applied and taken off the queue in one operation (which checks the
lease is still its own), so each batch is applied once; a batch whose applier died is
leased again when its lease runs out. Applying the same batch twice would change nothing
anyway: a pair changes only for a computation not older than the one it holds.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from app.cohorts.payload import CohortBatch
from app.cohorts.store import LEASE_SECONDS, CohortStore
from app.stores.shared import SharedUnavailable

log = logging.getLogger(__name__)

#: How often an idle applier looks at the queue (a receiver in this process wakes it at once).
IDLE_SECONDS = 0.5
#: After the store failed, how long the applier leaves it alone.
BACKOFF_SECONDS = 2.0
#: Batches applied in one round before the applier lets the others have the store.
ROUND_LIMIT = 50


class CohortApplier:
    """Drain the cohort queue: in rounds (:meth:`apply_pending`), or in a background thread (:meth:`start`)."""

    def __init__(
        self,
        store: CohortStore,
        lease_seconds: float = LEASE_SECONDS,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        """*on_outcome* runs with each outcome counted in :attr:`counts` (to count it in the metrics too)."""
        self.store = store
        self.lease_seconds = lease_seconds
        self._on_outcome = on_outcome
        #: This process's batches by outcome: applied, superseded, lease_lost, discarded.
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def apply_pending(self, limit: int = ROUND_LIMIT) -> int:
        """Apply up to *limit* queued batches now; returns how many were taken off the queue.

        :raises SharedUnavailable: the store failed (what was applied before stays applied).
        """
        done = 0
        for _ in range(limit):
            leased = self.store.lease(self.lease_seconds)
            if leased is None:
                break
            try:
                batch = CohortBatch.from_queued(leased.body)
            except (ValueError, KeyError, TypeError):
                # Written by this service after validation: only a damaged store gets here.
                log.error("cohort batch %s in the queue cannot be read; discarding it", leased.message_id)
                self.store.discard(leased)
                self._count("discarded")
                done += 1
                continue
            self._count(self.store.apply(leased, batch))
            done += 1
        return done

    def wake(self) -> None:
        """Look at the queue now (a batch was just queued)."""
        self._wake.set()

    def start(self) -> None:
        """Apply in a background thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cohort-applier", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self.counts[outcome] += 1
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()  # a wake from now on (a batch queued meanwhile) cuts the pause short
            pause = IDLE_SECONDS
            try:
                if self.apply_pending() >= ROUND_LIMIT:
                    pause = 0.0  # more is waiting: another round at once
            except SharedUnavailable as exc:
                log.warning("cohort applier: store unavailable (%s); retrying in %.0f s", exc, BACKOFF_SECONDS)
                pause = BACKOFF_SECONDS
            except Exception:  # noqa: BLE001 - the thread must outlive a bug in one batch
                log.exception("cohort applier failed; retrying")
                pause = BACKOFF_SECONDS
            if pause:
                self._wake.wait(pause)
