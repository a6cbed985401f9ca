"""Admission to Amplitude: the circuit breaker, the caller's miss cap and the budget, as one step.

``with admission.slot(caller, deadline):`` either admits one upstream call or raises a
typed error, and on leaving gives back what it took and records what happened: a
success or failure for the breaker, a 429 back-off for the budget, the outcome and
duration for the metrics. No exit path can leave a breaker probe slot taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from app.budget import BULK, LIVE, CallerMissCaps, UpstreamBudget
from app.clock import Clock, Deadline
from app.core.breaker import CircuitBreaker
from app.errors import RateLimited, UpstreamMisconfigured, UpstreamUnavailable, UserNotFound
from app.metrics import Metrics
from app.settings import SEND_ALLOWANCE_SECONDS
from app.upstream import UpstreamLate, UpstreamThrottled

log = logging.getLogger(__name__)

#: Time a caller keeps for the upstream call after waiting for its slot.
CALL_ALLOWANCE_SECONDS = 0.5


class Admission:
    """Decide whether one more call may go to Amplitude now, and account for it."""

    def __init__(
        self,
        breaker: CircuitBreaker,
        budget: UpstreamBudget,
        caller_caps: CallerMissCaps | None,
        metrics: Metrics,
        clock: Clock,
        max_wait: float,
        bulk_callers: tuple[str, ...] = (),
    ) -> None:
        self.breaker = breaker
        self.budget = budget
        self.caller_caps = caller_caps
        self.metrics = metrics
        self.clock = clock
        self.max_wait = max_wait
        self.bulk_callers = frozenset(bulk_callers)

    def _max_wait(self, deadline: Deadline | None, bulk: bool) -> float:
        """How long a call may wait for its slot: as long as its deadline leaves time for the
        call itself, live callers at most ``BUDGET_MAX_WAIT_SECONDS``; background refreshes
        not at all. A live caller waits on its reservation; a bulk caller asks again whenever
        the budget says it may (see :mod:`app.budget`)."""
        if deadline is None:
            return 0.0
        room = max(0.0, deadline.remaining() - CALL_ALLOWANCE_SECONDS)
        return room if bulk else min(room, self.max_wait)

    @contextmanager
    def slot(self, caller: str | None, deadline: Deadline | None) -> Iterator[float]:
        """Admit one upstream call for *caller*, waiting for a slot until *deadline* at most.

        ``deadline=None`` (a background refresh) never waits for a slot. Background
        refreshes and callers named in ``BULK_CALLERS`` are bulk work: no bulk call is
        admitted while a live one waits for its slot (see :mod:`app.budget`).

        :raises UpstreamUnavailable: the circuit is open.
        :raises RateLimited: the caller's cap or the budget is spent, or a 429 back-off runs.
        """
        if not self.breaker.allow():
            raise UpstreamUnavailable(
                "Amplitude is failing; calls paused", retry_after=self.breaker.seconds_until_retry()
            )
        bulk = caller is None or caller in self.bulk_callers
        caller_class = BULK if bulk else LIVE
        try:
            if caller is not None and self.caller_caps:
                self.caller_caps.spend(caller)
            grant = self.budget.acquire(self._max_wait(deadline, bulk), bulk)
        except BaseException as exc:
            if isinstance(exc, RateLimited):
                self.metrics.turned_away.labels(caller_class).inc()
            self.breaker.release()
            raise
        self.metrics.budget_granted.labels(caller_class).inc()
        self.metrics.budget_wait.observe(grant.waited)
        started = self.clock.monotonic()
        outcome = "failed"
        try:
            yield started + SEND_ALLOWANCE_SECONDS
            outcome = "ok"
            self.breaker.record_success()
        except UserNotFound:
            outcome = "not_found"
            self.breaker.record_success()
            raise
        except UpstreamThrottled as exc:
            outcome = "throttled"
            self.breaker.release()
            self.budget.back_off(exc.retry_after)
            raise
        except RateLimited:  # the slot passed before the call could leave: never sent
            outcome = "not_sent"
            self.breaker.release()
            raise
        except UpstreamMisconfigured:
            outcome = "misconfigured"
            self.breaker.release()
            raise
        except UpstreamLate:
            outcome = "late"  # the request's lateness, not Amplitude's failure (app.upstream)
            self.breaker.release()
            raise
        except UpstreamUnavailable as exc:
            self.breaker.record_failure()
            log.warning("Amplitude call failed: %s", exc.message)
            raise
        except BaseException:
            self.breaker.release()
            raise
        finally:
            self.metrics.upstream.labels(outcome).inc()
            self.metrics.upstream_latency.observe(self.clock.monotonic() - started)
