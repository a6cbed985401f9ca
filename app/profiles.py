"""The lookup policy: cache, single-flight, budget, breaker and upstream behind one call.

Whether to answer from the cache, serve stale data, wait for another request's call,
spend a token, or give up, is decided here and nowhere else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from app.breaker import CircuitBreaker
from app.budget import CallerMissCaps, UpstreamBudget
from app.cache import Entry, ProfileCache
from app.errors import (
    ApiError,
    RateLimited,
    RetryableError,
    UpstreamMisconfigured,
    UpstreamUnavailable,
    UserNotFound,
)
from app.observability import Metrics, RequestTrace
from app.profile import ProfileQuery
from app.settings import Settings
from app.upstream import AmplitudeClient, UpstreamThrottled

log = logging.getLogger(__name__)

HIT, MISS, STALE = "HIT", "MISS", "STALE"

#: How often a request waiting on another process's upstream call looks in Redis.
SHARED_POLL_SECONDS = 0.02


@dataclass(slots=True)
class Lookup:
    """A profile and how it was obtained, for the response headers."""

    profile: dict[str, Any]
    cache: str
    age: float
    fresh_for: float
    degraded_by: ApiError | None = field(default=None)


class ProfileService:
    """Answer "what is this user's profile" with as few Amplitude calls as possible."""

    def __init__(
        self,
        settings: Settings,
        client: AmplitudeClient,
        cache: ProfileCache,
        budget: UpstreamBudget,
        breaker: CircuitBreaker,
        metrics: Metrics,
        caller_caps: CallerMissCaps | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.freshness = cache.freshness
        self.budget = budget
        self.breaker = breaker
        self.metrics = metrics
        self.caller_caps = caller_caps
        self._clock = clock
        self._monotonic = monotonic
        self._inflight: dict[str, Future[Entry]] = {}
        self._inflight_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=settings.upstream_concurrency, thread_name_prefix="upstream")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def lookup(self, query: ProfileQuery, deadline: float, trace: RequestTrace | None = None) -> Lookup:
        """Return the profile *query* asks for, answering by *deadline* (a monotonic time).

        *trace* collects the cache outcome and upstream wait for the access log, and names
        the caller whose miss allowance an upstream call spends.

        :raises UserNotFound: Amplitude has not seen the identity (possibly cached).
        :raises RetryableError: no usable data and no upstream answer in time.
        :raises UpstreamMisconfigured: Amplitude rejects the service's key.
        """
        key = query.cache_key
        entry = self.cache.get(key)
        now = self._clock()
        if entry is not None and self.freshness.is_fresh(entry, now):
            return self._answer(entry, HIT, now, trace)
        negative_key = _negative_key(query)
        negative = self.cache.get(negative_key)
        if self.cache.redis is not None:
            shared, shared_negative = self.cache.get_shared(key, negative_key)
            if shared is not None and (entry is None or shared.fetched_at > entry.fetched_at):
                entry = shared
                if self.freshness.is_fresh(entry, now):
                    return self._answer(entry, HIT, now, trace)
            negative = shared_negative or negative
        if negative is not None and self.freshness.is_fresh(negative, now):
            self._note(trace, "negative")
            raise UserNotFound()
        if entry is not None and self.freshness.serve_while_revalidating(entry, now):
            self._refresh_in_background(query)
            return self._answer(entry, STALE, now, trace)
        self._note(trace, "miss")
        started = self._monotonic()
        try:
            fetched = self._fetch(query, deadline, trace.caller if trace else None)
        except (RetryableError, UpstreamMisconfigured) as exc:
            now = self._clock()
            if entry is not None and self.freshness.serve_instead_of_error(entry, now):
                return self._answer(entry, STALE, now, trace, degraded_by=exc)
            raise
        finally:
            if trace is not None:
                trace.upstream_ms += (self._monotonic() - started) * 1000
        return self._answer(fetched, MISS, self._clock(), trace)

    def _note(self, trace: RequestTrace | None, outcome: str) -> None:
        # Counted with the request's other metrics, off the request thread (app.observability).
        if trace is not None:
            trace.cache = outcome

    def _answer(
        self, entry: Entry, cache: str, now: float, trace: RequestTrace | None, degraded_by: ApiError | None = None
    ) -> Lookup:
        if cache != MISS:  # a miss was counted when it happened
            self._note(trace, cache.lower())
        fresh_for = max(0.0, self.freshness.fresh_until(entry) - now)
        return Lookup(entry.profile(), cache, max(0.0, now - entry.fetched_at), fresh_for, degraded_by)

    # -- single-flight ---------------------------------------------------------------

    def _fetch(self, query: ProfileQuery, deadline: float, caller: str | None) -> Entry:
        """Wait for the one in-flight call for *query*, starting it if there is none."""
        key = query.cache_key
        with self._inflight_lock:
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                future = self._inflight[key] = Future()
        if leader:
            try:
                future.set_result(self._obtain(query, deadline, caller=caller))
            except BaseException as exc:  # handed to every waiter, re-raised below
                future.set_exception(exc)
            finally:
                self._forget(key, future)
        try:
            return future.result(timeout=max(0.0, deadline - self._monotonic()))
        except FutureTimeout:
            raise UpstreamUnavailable("no answer from Amplitude within the deadline", retry_after=1) from None

    def _refresh_in_background(self, query: ProfileQuery) -> None:
        """Start one refresh for *query* unless one is already running."""
        key = query.cache_key
        with self._inflight_lock:
            if key in self._inflight:
                return
            future: Future[Entry] = Future()
            self._inflight[key] = future
        self._executor.submit(self._background_refresh, query, future)

    def _background_refresh(self, query: ProfileQuery, future: Future[Entry]) -> None:
        try:
            deadline = self._monotonic() + self.settings.request_deadline_seconds
            future.set_result(self._obtain(query, deadline, caller=None, background=True))
        except ApiError as exc:
            log.info("background refresh skipped: %s", exc.error)
            future.set_exception(exc)
        except Exception as exc:
            log.exception("background refresh failed")
            future.set_exception(exc)
        finally:
            self._forget(query.cache_key, future)

    def _forget(self, key: str, future: Future[Entry]) -> None:
        with self._inflight_lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    # -- one upstream call ---------------------------------------------------------------

    def _obtain(self, query: ProfileQuery, deadline: float, caller: str | None, background: bool = False) -> Entry:
        """Get a fresh entry: from another process's call, or by spending a token on our own."""
        key = query.cache_key
        # A call that finished between the caller's cache miss and its becoming leader.
        cached, negative = self.cache.get(key), self.cache.get(_negative_key(query))
        now = self._clock()
        if cached is not None and self.freshness.is_fresh(cached, now):
            return cached
        if negative is not None and self.freshness.is_fresh(negative, now):
            raise UserNotFound()
        if not self.breaker.allow():
            raise UpstreamUnavailable(
                "Amplitude is failing; calls paused", retry_after=self.breaker.seconds_until_retry()
            )
        lock_token = self.cache.try_lock(key)
        if lock_token is None:
            self.breaker.release()
            if background:
                raise UpstreamUnavailable("another process is refreshing this profile")
            return self._await_other_process(query, deadline)
        try:
            if caller is not None and self.caller_caps is not None:
                self.caller_caps.spend(caller)
            max_wait = (
                0.0 if background else min(self.settings.budget_max_wait_seconds, deadline - self._monotonic() - 0.1)
            )
            self.budget.acquire(max(0.0, max_wait))
        except RateLimited:
            self.metrics.turned_away.inc()
            self.breaker.release()
            self.cache.unlock(key, lock_token)
            raise
        except BaseException:
            self.breaker.release()
            self.cache.unlock(key, lock_token)
            raise
        if background:
            return self._call_upstream(query, lock_token)
        call = self._executor.submit(self._call_upstream, query, lock_token)
        try:
            return call.result(timeout=max(0.0, deadline - self._monotonic()))
        except FutureTimeout:
            # The call goes on and fills the cache for the next request.
            raise UpstreamUnavailable("Amplitude did not answer within the deadline", retry_after=1) from None

    def _call_upstream(self, query: ProfileQuery, lock_token: str) -> Entry:
        key = query.cache_key
        started = self._monotonic()
        outcome = "failed"
        try:
            profile = self.client.fetch(query)
            outcome = "ok"
        except UserNotFound:
            outcome = "not_found"
            self.breaker.record_success()
            self.cache.put(_negative_key(query), None)
            raise
        except UpstreamThrottled as exc:
            outcome = "throttled"
            self.breaker.release()
            self.budget.back_off(exc.retry_after)
            raise
        except UpstreamMisconfigured:
            outcome = "misconfigured"
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
            self.cache.unlock(key, lock_token)
            self.metrics.upstream.labels(outcome).inc()
            self.metrics.upstream_latency.observe(self._monotonic() - started)
        self.breaker.record_success()
        return self.cache.put(key, profile)

    def _await_other_process(self, query: ProfileQuery, deadline: float) -> Entry:
        """Poll the shared tier while another process makes the call for *query*."""
        key, negative_key = query.cache_key, _negative_key(query)
        while self._monotonic() + SHARED_POLL_SECONDS < deadline:
            time.sleep(SHARED_POLL_SECONDS)
            entry, negative = self.cache.get_shared(key, negative_key)
            now = self._clock()
            if entry is not None and self.freshness.is_fresh(entry, now):
                return entry
            if negative is not None and self.freshness.is_fresh(negative, now):
                raise UserNotFound()
            if not self.cache.is_locked(key):
                raise UpstreamUnavailable("another process's call to Amplitude failed", retry_after=1)
        raise UpstreamUnavailable("no answer from Amplitude within the deadline", retry_after=1)


def _negative_key(query: ProfileQuery) -> str:
    return f"{query.identity.cache_token}:unknown"
