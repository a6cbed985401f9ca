"""The upstream request budget: never send Amplitude more than its per-minute limit."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, NoReturn

from app.clock import SYSTEM_CLOCK, Clock
from app.errors import RateLimited
from app.stores.redis import RedisTier, RedisUnavailable

log = logging.getLogger(__name__)

# Reserve a token (or say how long until one) and honour a shared 429 back-off, in one
# round trip. Redis's own clock is used so instances with skewed clocks agree.
_RESERVE_LUA = """
local backoff = redis.call('PTTL', KEYS[2])
if backoff > 0 then return {-1, tostring(backoff / 1000)} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then tokens = tonumber(ARGV[4]); ts = now end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate end
if wait > max_wait then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], 180000)
  return {0, tostring(wait)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 180000)
return {1, tostring(wait)}
"""


def bucket_shape(per_minute: float) -> tuple[float, float]:
    """Return (capacity, tokens per second) that never allow more than *per_minute* in any 60 s.

    In any window of T seconds a bucket grants at most ``capacity + rate * T``; with the
    rate computed over 61 s, a 60 s window stays strictly under the limit even when the
    requests reach Amplitude a little later than they left.
    """
    capacity = max(1.0, math.floor(per_minute / 20))
    rate = max(per_minute - capacity, 1.0) / 61.0
    return capacity, rate


class TokenBucket:
    """A thread-safe token bucket that hands out reservations.

    The upstream budget starts empty, so a restarted process cannot add a fresh burst
    to a window its predecessor already used.
    """

    def __init__(self, per_minute: float, clock: Clock = SYSTEM_CLOCK, start_full: bool = False) -> None:
        self.capacity, self.rate = bucket_shape(per_minute)
        self._clock = clock.monotonic
        self._lock = threading.Lock()
        self._tokens = self.capacity if start_full else 0.0
        self._stamp = self._clock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, max_wait: float) -> float | None:
        """Take a token now or at most *max_wait* seconds ahead; return the wait, or None."""
        with self._lock:
            self._refill(self._clock())
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
            if wait > max_wait:
                return None
            self._tokens -= 1
            return wait

    def seconds_until_token(self) -> float:
        with self._lock:
            self._refill(self._clock())
            return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    @property
    def tokens(self) -> float:
        with self._lock:
            self._refill(self._clock())
            return self._tokens


class UpstreamBudget:
    """Tokens for Amplitude calls: shared through Redis when it answers, else this process's share.

    A 429 from Amplitude (another system spent the organisation's quota) stops every
    call for the back-off period, across processes when Redis is there.
    """

    def __init__(
        self,
        per_minute: int,
        shares: int,
        redis_tier: RedisTier | None = None,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "budget",
        start_full: bool = False,
    ) -> None:
        self.name = name
        self.start_full = start_full
        self.per_minute = per_minute
        self.local = TokenBucket(per_minute / shares, clock, start_full=start_full)
        self.shared_shape = bucket_shape(per_minute)
        self.redis = redis_tier
        self._clock = clock.monotonic
        self._sleep = clock.sleep
        self._backoff_until = 0.0
        self._script = redis_tier.script(_RESERVE_LUA) if redis_tier else None
        self.turned_away = 0

    def acquire(self, max_wait: float) -> None:
        """Return once a token is spent for the caller, having slept at most *max_wait*.

        :raises RateLimited: in back-off, or no token within *max_wait*; ``retry_after``
            says when one is expected.
        """
        remaining_backoff = self._backoff_until - self._clock()
        if remaining_backoff > 0:
            self._turn_away(remaining_backoff)
        shared = self._reserve_shared(max_wait)
        if shared is None:
            local_wait = self.local.reserve(max_wait)
            if local_wait is None:
                self._turn_away(self.local.seconds_until_token())
            wait = local_wait or 0.0
        else:
            granted, wait = shared
            if granted < 0:  # a 429 back-off recorded by another process
                self._backoff_until = max(self._backoff_until, self._clock() + wait)
            if granted <= 0:
                self._turn_away(wait)
        if wait > 0:
            self._sleep(wait)

    def _reserve_shared(self, max_wait: float) -> tuple[int, float] | None:
        if self._script is None or self.redis is None:
            return None
        capacity, rate = self.shared_shape
        keys = [self.redis.key(self.name), self.redis.key("backoff")]
        script: Any = self._script
        try:
            granted, wait = self.redis.run(
                lambda client: script(
                    keys=keys, args=[rate, capacity, max_wait, capacity if self.start_full else 0], client=client
                )
            )
        except RedisUnavailable:
            return None
        return int(granted), float(wait)

    def back_off(self, seconds: float) -> None:
        """Stop calling Amplitude for *seconds*, in every process sharing Redis."""
        self._backoff_until = max(self._backoff_until, self._clock() + seconds)
        log.warning("Amplitude answered 429: pausing upstream calls for %.0f s", seconds)
        if self.redis is not None:
            key = self.redis.key("backoff")
            try:
                self.redis.run(lambda client: client.set(key, "1", px=max(1, int(seconds * 1000))))
            except RedisUnavailable:
                pass

    def _turn_away(self, retry_after: float) -> NoReturn:
        self.turned_away += 1
        raise RateLimited(retry_after=retry_after)

    def tokens_left(self) -> float:
        """Tokens available now (this process's bucket, or the shared one when Redis answers)."""
        if self.redis is not None:
            key = self.redis.key(self.name)
            try:
                tokens = self.redis.run(lambda client: client.hget(key, "tokens"))
                return float(tokens) if tokens is not None else 0.0
            except RedisUnavailable:
                pass
        return self.local.tokens


class CallerMissCaps:
    """A per-caller-key budget of upstream misses, so one key cannot spend everyone's budget.

    A stream of random ids from one key (a leaked key, a broken template) is refused
    once that key's share is spent, while other callers keep theirs.
    """

    def __init__(
        self,
        per_minute: int,
        shares: int,
        redis_tier: RedisTier | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.per_minute = per_minute
        self.shares = shares
        self.redis = redis_tier
        self._clock = clock
        self._caps: dict[str, UpstreamBudget] = {}
        self._lock = threading.Lock()

    def spend(self, caller: str) -> None:
        """Take one miss from *caller*'s allowance.

        :raises RateLimited: the caller's allowance for this minute is spent.
        """
        with self._lock:
            cap = self._caps.get(caller)
            if cap is None:
                cap = self._caps[caller] = UpstreamBudget(
                    self.per_minute,
                    self.shares,
                    self.redis,
                    clock=self._clock,
                    name=f"caller:{caller}",
                    start_full=True,
                )
        cap.acquire(0.0)
