"""Profile storage: an in-process TLRU cache, backed by the shared tier when there is one.

Profiles are kept as compact JSON bytes: a cached profile then costs about its
serialised size, and the same bytes go to the shared tier unchanged.

Across processes, the right to call Amplitude for one profile is a *claim* (a key with a
random token, in Redis or in the machine's SQLite file: :mod:`app.stores.shared`).
Whoever holds it publishes the answer and releases the claim in one operation, so a
process waiting on it sees the answer, the not-found, or the failure, never a gap in
between.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

import orjson
from cachetools import TLRUCache

from app.clock import SYSTEM_CLOCK, Clock, Deadline
from app.core.freshness import Entry, Freshness, newest
from app.core.query import ProfileQuery
from app.stores.shared import SharedTier, SharedUnavailable

#: How long a failed call's word stays for the processes that waited on it.
FAILURE_NOTE_MS = 5000


@dataclass(frozen=True, slots=True)
class View:
    """What the stores hold for one query: its profile and its identity's not-found."""

    entry: Entry | None = None
    negative: Entry | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to call Amplitude for one profile; ``shared`` when the shared tier recorded it."""

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
    """Two tiers behind one interface: L1 per process, the shared tier for every process."""

    def __init__(
        self, freshness: Freshness, max_entries: int, claim_ttl: float, shared: SharedTier | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:  # fmt: skip
        self.freshness = freshness
        self.shared = shared
        self._clock = clock
        self._l1: TLRUCache[str, Entry] = TLRUCache(maxsize=max_entries, ttu=_time_to_use, timer=clock.time)
        self._lock = threading.Lock()
        self._claim_ttl_ms = int(claim_ttl * 1000)

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

    def read(self, query: ProfileQuery, deadline: Deadline | None = None) -> View:
        """The newest copies this process or the shared tier holds; the tier is asked only
        without a fresh local one, and never past *deadline*."""
        with self._lock:
            entry = self._l1.get(query.cache_key)
        if entry is not None and self.freshness.is_fresh(entry, self._clock.time()):
            return View(entry)  # the hit path: one lookup, no not-found needed
        view = self.local(query)
        if self.shared is None:
            return view
        try:
            raw_entry, raw_negative = self.shared.get(_names(query), deadline)
        except SharedUnavailable:
            return view
        return self._merge(query, view, raw_entry, raw_negative)

    def _merge(self, query: ProfileQuery, view: View, raw_entry: bytes | None, raw_negative: bytes | None) -> View:
        shared_entry, shared_negative = self._decode(raw_entry), self._decode(raw_negative)
        if shared_entry is not None:
            self._store_local(query.cache_key, shared_entry)
        if shared_negative is not None:
            self._store_local(query.negative_key, shared_negative)
        return View(newest(view.entry, shared_entry), newest(view.negative, shared_negative))

    # -- claiming, publishing --------------------------------------------------------

    def claim(self, query: ProfileQuery) -> tuple[Claim | None, View | Pending]:
        """Try to take the claim for *query*.

        Returns ``(claim, view)`` with what the shared tier held at that moment (another
        process may have published just before), or ``(None, pending)`` naming the holder.
        Without a shared tier, or while it is down, this process is the only one that can
        know, so it always gets a (local) claim.
        """
        token = secrets.token_hex(8)
        if self.shared is None:
            return Claim(query, token, shared=False), self.local(query)
        entry, negative = _names(query)
        try:
            reply = self.shared.claim(_lock(query), token, self._claim_ttl_ms, entry, negative)
        except SharedUnavailable:
            return Claim(query, token, shared=False), self.local(query)
        if reply.taken:
            return Claim(query, token, shared=True), self._merge(query, self.local(query), reply.entry, reply.negative)
        return None, Pending(reply.holder)

    def publish(self, claim: Claim, profile: dict[str, Any] | None) -> Entry:
        """Store a fetched profile (``None``: user not found) and release *claim*, in one operation."""
        query = claim.query
        # orjson hands back bytes inside an allocation sized for the worst case; a copy is
        # sized to the JSON, which is what a hundred thousand cached profiles then cost.
        body = bytes(memoryview(orjson.dumps(profile))) if profile is not None else None
        entry = self.freshness.entry(body, self._clock.time())
        key = query.cache_key if body is not None else query.negative_key
        self._store_local(key, entry)
        if claim.shared and self.shared is not None:
            value = f"{entry.fetched_at:.3f}\n".encode() + (body or b"")
            ttl_ms = max(1, int((entry.expires_at - entry.fetched_at) * 1000))
            try:
                self.shared.publish("p:" + key, value, ttl_ms, _lock(query), claim.token)
            except SharedUnavailable:
                pass
        return entry

    def abandon(self, claim: Claim, failure: str | None = None) -> None:
        """Release *claim* without an answer, leaving *failure* (an error code) for waiters."""
        if not claim.shared or self.shared is None:
            return
        note = "failed:" + claim.query.cache_key
        try:
            self.shared.abandon(_lock(claim.query), note, claim.token, failure or "", FAILURE_NOTE_MS)
        except SharedUnavailable:
            pass

    def watch(
        self, query: ProfileQuery, holder: str | None, deadline: Deadline | None = None
    ) -> tuple[View, Pending | None]:
        """One look at another process's call: what is stored now, and whether it is still pending.

        ``pending`` is ``None`` when the claim is free (the holder gave up or vanished
        without a word): the caller may claim it itself.
        """
        if self.shared is None:
            return self.local(query), None
        names = [*_names(query), _lock(query), "failed:" + query.cache_key]
        try:
            raw_entry, raw_negative, raw_lock, raw_failed = self.shared.get(names, deadline)
        except SharedUnavailable:
            return self.local(query), None
        view = self._merge(query, self.local(query), raw_entry, raw_negative)
        if raw_failed is not None and holder is not None:
            failed_token, _, failure = raw_failed.decode().partition("\n")
            if failed_token == holder:
                return view, Pending(holder, failure or "upstream_unavailable")
        if raw_lock is not None:
            return view, Pending(raw_lock.decode())
        return view, None

    # -- internals -------------------------------------------------------------------

    def _store_local(self, key: str, entry: Entry) -> None:
        with self._lock:
            current = self._l1.get(key)
            # A slower, older answer must not replace a newer one.
            if current is None or current.fetched_at <= entry.fetched_at:
                self._l1[key] = entry

    def _decode(self, raw: bytes | None) -> Entry | None:
        if not raw:
            return None
        stamp, _, body = raw.partition(b"\n")
        try:
            fetched_at = float(stamp)
        except ValueError:
            return None
        return self.freshness.entry(body or None, fetched_at)


def _names(query: ProfileQuery) -> tuple[str, str]:
    """The shared tier's names for *query*'s profile and its identity's not-found."""
    return "p:" + query.cache_key, "p:" + query.negative_key


def _lock(query: ProfileQuery) -> str:
    return "lock:" + query.cache_key
