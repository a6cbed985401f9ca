"""The lookup executor: carry out what :func:`app.core.policy.decide` says.

A lookup reads the stores, asks the pure policy what to do, and does it: answer, answer
stale and start a background refresh, or join the one *flight* (the claim, admission and
upstream call) for that profile. The request that starts a flight carries it out on its
own thread, bounded by its own deadline (a hand-off to another thread and back would
cost every miss two wake-ups); the requests that join it wait on it, each until its own
deadline. Background refreshes, which no request waits for, run on a pool thread.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.admission import Admission
from app.clock import Clock, Deadline
from app.core.freshness import Entry, Freshness
from app.core.policy import Action, decide
from app.core.query import ProfileQuery
from app.errors import (
    ApiError,
    ProfileApiUnavailable,
    RateLimited,
    RetryableError,
    UpstreamMisconfigured,
    UpstreamUnavailable,
    UserNotFound,
)
from app.stores.profiles import Pending, ProfileStore, View
from app.upstream import AmplitudeClient

if TYPE_CHECKING:
    from app.http.trace import RequestTrace

log = logging.getLogger(__name__)

HIT, MISS, STALE = "HIT", "MISS", "STALE"

#: How often a flight waiting on another process's call looks in the shared tier.
SHARED_POLL_SECONDS = 0.02

#: A miss with less than this left of its deadline starts no upstream work: it has waited
#: (queued for a thread, most likely) past the point where an answer could still come.
LATE_SECONDS = 0.5


@dataclass(slots=True)
class Lookup:
    """A profile and how it was obtained, for the response headers."""

    profile: dict[str, Any]
    cache: str
    age: float
    fresh_for: float
    degraded_by: ApiError | None = field(default=None)


def error_from_code(code: str) -> ApiError:
    """The error another process's failed call left behind, for the requests that waited on it."""
    if code == RateLimited.error:
        return RateLimited(retry_after=1)
    if code == UpstreamMisconfigured.error:
        return UpstreamMisconfigured()
    return UpstreamUnavailable("another process's call to Amplitude failed", retry_after=1)


class ProfileLookup:
    """Answer "what is this user's profile" with as few Amplitude calls as possible."""

    def __init__(
        self,
        store: ProfileStore,
        admission: Admission,
        client: AmplitudeClient,
        clock: Clock,
        call_seconds: float,
        concurrency: int,
        profile_api: bool = True,
    ) -> None:
        self.store = store
        self.freshness: Freshness = store.freshness
        self.admission = admission
        self.client = client
        self.clock = clock
        self.call_seconds = call_seconds
        #: False in Amplitude's EU region, where the User Profile API does not exist.
        self.profile_api = profile_api
        self._flights: dict[str, Future[Entry]] = {}
        self._flights_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upstream")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def lookup(self, query: ProfileQuery, deadline: Deadline, trace: RequestTrace | None = None) -> Lookup:
        """Return the profile *query* asks for, answering by *deadline*.

        *trace* collects the cache outcome and upstream wait for the access log, and names
        the caller whose miss allowance an upstream call spends.

        :raises UserNotFound: Amplitude has not seen the identity (possibly cached).
        :raises RetryableError: no usable data and no upstream answer in time.
        :raises UpstreamMisconfigured: Amplitude rejects the service's key.
        :raises ProfileApiUnavailable: ``AMPLITUDE_REGION=eu``: there is no User Profile API to ask.
        """
        if not self.profile_api:
            raise ProfileApiUnavailable()
        if query.identity.never_stored:
            _note(trace, "never_stored")
            raise UserNotFound()
        view = self.store.read(query, deadline)
        decision = decide(view.entry, view.negative, self.clock.time(), self.freshness)
        if decision.action is Action.SERVE:
            return self._answer(decision.entry, HIT, trace)
        if decision.action is Action.NOT_FOUND:
            _note(trace, "negative")
            raise UserNotFound()
        if decision.action is Action.SERVE_STALE_AND_REFRESH:
            self._refresh(query)
            return self._answer(decision.entry, STALE, trace)
        _note(trace, "miss")
        started = self.clock.monotonic()
        try:
            late = deadline.remaining() < LATE_SECONDS
            caller = trace.caller if trace else None
            flight, mine = self._find_flight(query, start=not late)
            if flight is None:
                raise UpstreamUnavailable("the request waited too long to start a call to Amplitude", retry_after=1)
            if mine:
                self._fly(flight, query, deadline, caller, deadline)
            entry = flight.result(timeout=deadline.remaining())
        except FutureTimeout:
            error: ApiError = UpstreamUnavailable("no answer from Amplitude within the deadline", retry_after=1)
            if decision.fallback is None:
                raise error from None
            return self._answer(decision.fallback, STALE, trace, degraded_by=error)
        except (RetryableError, UpstreamMisconfigured) as exc:
            if decision.fallback is None:
                raise
            return self._answer(decision.fallback, STALE, trace, degraded_by=exc)
        finally:
            if trace is not None:
                trace.upstream_ms += (self.clock.monotonic() - started) * 1000
        if entry.body is None:
            raise UserNotFound()
        return self._answer(entry, MISS, trace)

    def _answer(self, entry: Entry | None, cache: str, trace: RequestTrace | None, **kwargs: Any) -> Lookup:
        if entry is None:  # decide() always names the entry it serves
            raise RuntimeError("a decision to serve came without an entry")
        if cache != MISS:  # a miss was noted when it happened
            _note(trace, cache.lower())
        now = self.clock.time()
        fresh_for = max(0.0, self.freshness.fresh_until(entry) - now)
        return Lookup(entry.profile(), cache, max(0.0, now - entry.fetched_at), fresh_for, **kwargs)

    # -- flights: one upstream call per profile, however many requests want it ----------

    def _find_flight(self, query: ProfileQuery, start: bool) -> tuple[Future[Entry] | None, bool]:
        """The flight for *query* in this process, and whether the caller just started it
        (and must carry it out): a new one when there is none and *start*."""
        key = query.cache_key
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is not None or not start:
                return flight, False
            flight = self._flights[key] = Future()
            return flight, True

    def _refresh(self, query: ProfileQuery) -> None:
        """Refresh *query*'s profile on a pool thread, unless a flight for it is under way."""
        flight, mine = self._find_flight(query, start=True)
        if mine and flight is not None:
            self._pool.submit(self._fly, flight, query, None, None, Deadline.after(self.clock, self.call_seconds))

    def _fly(
        self,
        flight: Future[Entry],
        query: ProfileQuery,
        requester: Deadline | None,
        caller: str | None,
        call_deadline: Deadline,
    ) -> None:
        """Carry the flight out and settle it: its entry, or the error every waiter gets.

        *requester* bounds how long the budget may make the caller wait for a slot; ``None``
        (a background refresh) never waits for one. *call_deadline* bounds the whole flight.
        """
        try:
            flight.set_result(self._obtain(query, requester, caller, call_deadline))
        except ApiError as exc:
            if requester is None:
                log.info("background refresh skipped: %s", exc.error)
            flight.set_exception(exc)
        except BaseException as exc:
            log.exception("upstream flight failed")
            flight.set_exception(exc)
        finally:
            with self._flights_lock:
                if self._flights.get(query.cache_key) is flight:
                    del self._flights[query.cache_key]

    def _obtain(
        self, query: ProfileQuery, requester: Deadline | None, caller: str | None, call_deadline: Deadline
    ) -> Entry:
        """Claim the profile across processes, then call Amplitude, unless someone else already did."""
        while True:
            claim, seen = self.store.claim(query)
            if claim is not None and isinstance(seen, View):
                break
            settled = self._await_holder(query, seen.holder if isinstance(seen, Pending) else None, call_deadline)
            if settled is not None:
                return settled
        now = self.clock.time()
        for stored in (seen.entry, seen.negative):
            if stored is not None and self.freshness.is_fresh(stored, now):  # published just before we claimed
                self.store.abandon(claim)
                return stored
        try:
            with self.admission.slot(caller, requester) as send_by:
                profile = self.client.fetch(query, call_deadline, send_by)
        except UserNotFound:
            return self.store.publish(claim, None)
        except ApiError as exc:
            self.store.abandon(claim, exc.error)
            raise
        except BaseException:
            self.store.abandon(claim, UpstreamUnavailable.error)
            raise
        return self.store.publish(claim, profile)

    def _await_holder(self, query: ProfileQuery, holder: str | None, deadline: Deadline) -> Entry | None:
        """Wait for another process's call: its answer, its not-found, or its failure.

        Returns ``None`` when the claim became free without a word (its holder vanished),
        so the caller may take it.
        """
        while not deadline.expired():
            self.clock.sleep(deadline.capped(SHARED_POLL_SECONDS))
            view, pending = self.store.watch(query, holder, deadline)
            now = self.clock.time()
            for stored in (view.entry, view.negative):
                if stored is not None and self.freshness.is_fresh(stored, now):
                    return stored
            if pending is None:
                return None
            if pending.failure is not None:
                raise error_from_code(pending.failure)
            holder = pending.holder
        raise UpstreamUnavailable("no answer from Amplitude within the deadline", retry_after=1)


def _note(trace: RequestTrace | None, outcome: str) -> None:
    # Counted with the request's other metrics, off the request thread (app.observability).
    if trace is not None:
        trace.cache = outcome
