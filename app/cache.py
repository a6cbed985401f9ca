"""Profile storage: an in-process TLRU cache, backed by Redis when configured.

Profiles are kept as compact JSON bytes: a cached profile then costs about its
serialised size, and the same bytes go to Redis unchanged.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from cachetools import TLRUCache

from app.redis_tier import RedisTier, RedisUnavailable
from app.settings import Settings


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached answer: profile JSON, or ``None`` for "Amplitude has not seen this user"."""

    body: bytes | None
    fetched_at: float
    expires_at: float

    def profile(self) -> dict[str, Any]:
        return orjson.loads(self.body) if self.body is not None else {}


@dataclass(frozen=True)
class Freshness:
    """How long an entry is fresh, served stale at once, or served stale instead of an error."""

    ttl: float
    stale_while_revalidate: float
    stale_if_error: float
    negative_ttl: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Freshness:
        return cls(
            settings.cache_ttl_seconds,
            settings.stale_while_revalidate_seconds,
            settings.stale_if_error_seconds,
            settings.negative_cache_ttl_seconds,
        )

    @property
    def lifetime(self) -> float:
        return self.ttl + max(self.stale_while_revalidate, self.stale_if_error)

    def fresh_until(self, entry: Entry) -> float:
        return entry.fetched_at + (self.ttl if entry.body is not None else self.negative_ttl)

    def is_fresh(self, entry: Entry, now: float) -> bool:
        return now < self.fresh_until(entry)

    def serve_while_revalidating(self, entry: Entry, now: float) -> bool:
        return entry.body is not None and now - entry.fetched_at < self.ttl + self.stale_while_revalidate

    def serve_instead_of_error(self, entry: Entry, now: float) -> bool:
        return entry.body is not None and now - entry.fetched_at < self.ttl + self.stale_if_error


def _time_to_use(_key: str, entry: Entry, _now: float) -> float:
    return entry.expires_at


class ProfileCache:
    """Two tiers behind one interface: L1 per process, Redis shared by every process."""

    def __init__(
        self,
        settings: Settings,
        redis_tier: RedisTier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.freshness = Freshness.from_settings(settings)
        self.redis = redis_tier
        self._clock = clock
        self._l1: TLRUCache[str, Entry] = TLRUCache(maxsize=settings.cache_max_entries, ttu=_time_to_use, timer=clock)
        self._lock = threading.Lock()
        self.lock_ttl_ms = int((settings.request_deadline_seconds + settings.upstream_read_timeout) * 1000)

    def __len__(self) -> int:
        return len(self._l1)

    def get(self, key: str) -> Entry | None:
        """Look in this process only (the hit path)."""
        with self._lock:
            return self._l1.get(key)

    def get_shared(self, *keys: str) -> list[Entry | None]:
        """Look in Redis for *keys* in one round trip, keeping what it has in L1."""
        if self.redis is None:
            return [None] * len(keys)
        redis_keys = [self.redis.key("p", key) for key in keys]
        try:
            raw_values = self.redis.run(lambda client: client.mget(redis_keys))
        except RedisUnavailable:
            return [None] * len(keys)
        entries = []
        for key, raw in zip(keys, raw_values, strict=True):
            entry = self._decode(raw)
            if entry is not None:
                self._store_local(key, entry)
            entries.append(entry)
        return entries

    def put(self, key: str, profile: dict[str, Any] | None) -> Entry:
        """Store a fetched profile (``None``: user not found) in both tiers."""
        now = self._clock()
        # orjson hands back bytes inside an allocation sized for the worst case; a copy is
        # sized to the JSON, which is what a hundred thousand cached profiles then cost.
        body = bytes(memoryview(orjson.dumps(profile))) if profile is not None else None
        lifetime = self.freshness.lifetime if body is not None else self.freshness.negative_ttl
        entry = Entry(body, now, now + lifetime)
        self._store_local(key, entry)
        if self.redis is not None:
            value = f"{now:.3f}\n".encode() + (body if body is not None else b"")
            redis_key = self.redis.key("p", key)
            ttl_ms = max(1, int(lifetime * 1000))
            try:
                self.redis.run(lambda client: client.set(redis_key, value, px=ttl_ms))
            except RedisUnavailable:
                pass
        return entry

    def try_lock(self, key: str) -> str | None:
        """Claim the right to fetch *key* across processes; None if another process holds it.

        Without Redis (or while it is down) this process is the only one that can know,
        so it always gets the claim.
        """
        token = secrets.token_hex(8)
        if self.redis is None:
            return token
        lock_key = self.redis.key("lock", key)
        try:
            acquired = self.redis.run(lambda client: client.set(lock_key, token, nx=True, px=self.lock_ttl_ms))
        except RedisUnavailable:
            return token
        return token if acquired else None

    def is_locked(self, key: str) -> bool:
        if self.redis is None:
            return False
        lock_key = self.redis.key("lock", key)
        try:
            return bool(self.redis.run(lambda client: client.exists(lock_key)))
        except RedisUnavailable:
            return False

    def unlock(self, key: str, token: str) -> None:
        if self.redis is None:
            return
        lock_key = self.redis.key("lock", key)
        try:
            # Delete only our own claim: a slow fetch must not release a successor's.
            self.redis.run(lambda client: client.eval(_UNLOCK_LUA, 1, lock_key, token))
        except RedisUnavailable:
            pass

    def _store_local(self, key: str, entry: Entry) -> None:
        with self._lock:
            current = self._l1.get(key)
            # A slower, older answer must not replace a newer one.
            if current is None or current.fetched_at <= entry.fetched_at:
                self._l1[key] = entry

    def _decode(self, raw: Any) -> Entry | None:
        if not isinstance(raw, bytes) or not raw:
            return None
        stamp, _, body = raw.partition(b"\n")
        try:
            fetched_at = float(stamp)
        except ValueError:
            return None
        is_profile = bool(body)
        lifetime = self.freshness.lifetime if is_profile else self.freshness.negative_ttl
        return Entry(body if is_profile else None, fetched_at, fetched_at + lifetime)


_UNLOCK_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
