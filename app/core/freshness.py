"""Cached entries and how long each may be served, fresh or stale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

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

    def lifetime(self, found: bool) -> float:
        """How long an entry is worth keeping at all."""
        return self.ttl + max(self.stale_while_revalidate, self.stale_if_error) if found else self.negative_ttl

    def entry(self, body: bytes | None, fetched_at: float) -> Entry:
        return Entry(body, fetched_at, fetched_at + self.lifetime(body is not None))

    def fresh_until(self, entry: Entry) -> float:
        return entry.fetched_at + (self.ttl if entry.body is not None else self.negative_ttl)

    def is_fresh(self, entry: Entry | None, now: float) -> bool:
        return entry is not None and now < self.fresh_until(entry)

    def serve_while_revalidating(self, entry: Entry, now: float) -> bool:
        return entry.body is not None and now - entry.fetched_at < self.ttl + self.stale_while_revalidate

    def serve_instead_of_error(self, entry: Entry, now: float) -> bool:
        return entry.body is not None and now - entry.fetched_at < self.ttl + self.stale_if_error


def newest(*entries: Entry | None) -> Entry | None:
    """The most recently fetched of *entries* (ignoring ``None``)."""
    found = [entry for entry in entries if entry is not None]
    return max(found, key=lambda entry: entry.fetched_at) if found else None
