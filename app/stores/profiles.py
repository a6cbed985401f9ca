"""Profile storage: an in-process TLRU cache, backed by Redis when configured.

Profiles are kept as compact JSON bytes: a cached profile then costs about its
serialised size, and the same bytes go to Redis unchanged.

Across processes, the right to call Amplitude for one profile is a *claim* (a Redis key
with a random token). Whoever holds it publishes the answer and releases the claim in
one script, so a process waiting on it sees the answer, the not-found, or the failure,
never a gap in between.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

import orjson
from cachetools import TLRUCache

from app.clock import SYSTEM_CLOCK, Clock
from app.core.freshness import Entry, Freshness, newest
from app.core.query import ProfileQuery
from app.stores.redis import RedisTier, RedisUnavailable

# Take the claim if it is free and return what is stored now, in one round trip; if it
# is taken, return the holder's token.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2]) or false, redis.call('GET', KEYS[3]) or false}
end
return {0, redis.call('GET', KEYS[1]) or false}
"""

# Write the answer, then release our own claim (never a successor's): one operation.
_PUBLISH_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Release our own claim, leaving word of why for the processes waiting on it.
_ABANDON_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1] .. '\\n' .. ARGV[2], 'PX', ARGV[3]) end
  redis.call('DEL', KEYS[1])
end
return 1
"""

#: How long a failed call's word stays for the processes that waited on it.
FAILURE_NOTE_MS = 5000


@dataclass(frozen=True, slots=True)
class View:
    """What the stores hold for one query: its profile and its identity's not-found."""

    entry: Entry | None = None
    negative: Entry | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to call Amplitude for one profile; ``shared`` when Redis recorded it."""

    query: ProfileQuery
    token: str
    shared: bool


@dataclass(frozen=True, slots=True)
class Pending:
    """Another process holds the claim (``holder`` is its token), or had it and gave up."""

    holder: str | None = None
    failure: str | None = None  # the error code it left, when it failed


def _time_to_use(_key: str, entry: Entry, _now: float) -> float:
    return entry.expires_at


class ProfileStore:
    """Two tiers behind one interface: L1 per process, Redis shared by every process."""

    def __init__(
        self, freshness: Freshness, max_entries: int, claim_ttl: float, redis_tier: RedisTier | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:  # fmt: skip
        self.freshness = freshness
        self.redis = redis_tier
        self._clock = clock
        self._l1: TLRUCache[str, Entry] = TLRUCache(maxsize=max_entries, ttu=_time_to_use, timer=clock.time)
        self._lock = threading.Lock()
        self._claim_ttl_ms = str(int(claim_ttl * 1000))
        self._prefix = redis_tier.prefix if redis_tier is not None else ""
        if redis_tier is not None:
            self._claim = redis_tier.script(_CLAIM_LUA)
            self._publish = redis_tier.script(_PUBLISH_LUA)
            self._abandon = redis_tier.script(_ABANDON_LUA)

    def __len__(self) -> int:
        return len(self._l1)

    # -- reading -------------------------------------------------------------------

    def local_entry(self, key: str) -> Entry | None:
        """The profile this process holds under *key* (fresh or not)."""
        with self._lock:
            return self._l1.get(key)

    def local(self, query: ProfileQuery) -> View:
        """Look in this process only (the hit path)."""
        with self._lock:
            return View(self._l1.get(query.cache_key), self._l1.get(query.negative_key))

    def read(self, query: ProfileQuery) -> View:
        """The newest copies this process or Redis holds; Redis is asked only without a fresh local one."""
        with self._lock:
            entry = self._l1.get(query.cache_key)
        if entry is not None and self.freshness.is_fresh(entry, self._clock.time()):
            return View(entry)  # the hit path: one lookup, no not-found needed
        view = self.local(query)
        if self.redis is None:
            return view
        keys = [self._key(query.cache_key), self._key(query.negative_key)]
        try:
            raw_entry, raw_negative = self.redis.run(lambda client: client.mget(keys))
        except RedisUnavailable:
            return view
        return self._merge(query, view, raw_entry, raw_negative)

    def _merge(self, query: ProfileQuery, view: View, raw_entry: Any, raw_negative: Any) -> View:
        shared_entry, shared_negative = self._decode(raw_entry), self._decode(raw_negative)
        if shared_entry is not None:
            self._store_local(query.cache_key, shared_entry)
        if shared_negative is not None:
            self._store_local(query.negative_key, shared_negative)
        return View(newest(view.entry, shared_entry), newest(view.negative, shared_negative))

    # -- claiming, publishing --------------------------------------------------------

    def claim(self, query: ProfileQuery) -> tuple[Claim | None, View | Pending]:
        """Try to take the claim for *query*.

        Returns ``(claim, view)`` with what Redis held at that moment (another process may
        have published just before), or ``(None, pending)`` naming the holder. Without
        Redis, or while it is down, this process is the only one that can know, so it
        always gets a (local) claim.
        """
        token = secrets.token_hex(8)
        if self.redis is None:
            return Claim(query, token, shared=False), self.local(query)
        keys = [self._key("lock", query.cache_key), self._key(query.cache_key), self._key(query.negative_key)]
        script = self._claim
        try:
            result = self.redis.run(lambda client: script(keys=keys, args=[token, self._claim_ttl_ms], client=client))
        except RedisUnavailable:
            return Claim(query, token, shared=False), self.local(query)
        if int(result[0]) == 1:
            return Claim(query, token, shared=True), self._merge(query, self.local(query), result[1], result[2])
        holder = result[1].decode() if isinstance(result[1], bytes) else None
        return None, Pending(holder)

    def publish(self, claim: Claim, profile: dict[str, Any] | None) -> Entry:
        """Store a fetched profile (``None``: user not found) and release *claim*, in one operation."""
        query = claim.query
        # orjson hands back bytes inside an allocation sized for the worst case; a copy is
        # sized to the JSON, which is what a hundred thousand cached profiles then cost.
        body = bytes(memoryview(orjson.dumps(profile))) if profile is not None else None
        entry = self.freshness.entry(body, self._clock.time())
        key = query.cache_key if body is not None else query.negative_key
        self._store_local(key, entry)
        if claim.shared and self.redis is not None:
            value = f"{entry.fetched_at:.3f}\n".encode() + (body or b"")
            ttl_ms = max(1, int((entry.expires_at - entry.fetched_at) * 1000))
            keys = [self._key(key), self._key("lock", query.cache_key)]
            script = self._publish
            try:
                self.redis.run(lambda client: script(keys=keys, args=[value, ttl_ms, claim.token], client=client))
            except RedisUnavailable:
                pass
        return entry

    def abandon(self, claim: Claim, failure: str | None = None) -> None:
        """Release *claim* without an answer, leaving *failure* (an error code) for waiters."""
        if not claim.shared or self.redis is None:
            return
        keys = [self._key("lock", claim.query.cache_key), self._key("failed", claim.query.cache_key)]
        script = self._abandon
        try:
            self.redis.run(
                lambda client: script(keys=keys, args=[claim.token, failure or "", FAILURE_NOTE_MS], client=client)
            )
        except RedisUnavailable:
            pass

    def watch(self, query: ProfileQuery, holder: str | None) -> tuple[View, Pending | None]:
        """One look at another process's call: what is stored now, and whether it is still pending.

        ``pending`` is ``None`` when the claim is free (the holder gave up or vanished
        without a word): the caller may claim it itself.
        """
        if self.redis is None:
            return self.local(query), None
        keys = [
            self._key(query.cache_key),
            self._key(query.negative_key),
            self._key("lock", query.cache_key),
            self._key("failed", query.cache_key),
        ]
        try:
            raw_entry, raw_negative, raw_lock, raw_failed = self.redis.run(lambda client: client.mget(keys))
        except RedisUnavailable:
            return self.local(query), None
        view = self._merge(query, self.local(query), raw_entry, raw_negative)
        if isinstance(raw_failed, bytes) and holder is not None:
            failed_token, _, failure = raw_failed.decode().partition("\n")
            if failed_token == holder:
                return view, Pending(holder, failure or "upstream_unavailable")
        if isinstance(raw_lock, bytes):
            return view, Pending(raw_lock.decode())
        return view, None

    # -- internals -------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        """``PREFIX:p:KEY`` for a stored answer, ``PREFIX:lock:KEY`` and the like for the rest."""
        return ":".join((self._prefix, "p", *parts) if len(parts) == 1 else (self._prefix, *parts))

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
        return self.freshness.entry(body or None, fetched_at)
