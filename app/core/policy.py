"""The lookup decision: what to do with what the stores hold, as a pure function.

``decide`` looks at the cached entry, the cached "not found" and the time, and says what
the executor (:mod:`app.lookup`) must do. It does no I/O, takes no locks and reads no
clock, so every case is a row in a table test.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.core.freshness import Entry, Freshness


class Action(enum.Enum):
    SERVE = "serve"  # a fresh entry: answer with it
    NOT_FOUND = "not_found"  # Amplitude recently said it has not seen this user
    SERVE_STALE_AND_REFRESH = "serve_stale_and_refresh"  # answer now, refresh in the background
    FETCH = "fetch"  # wait for an upstream answer (one call for every waiter)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do, the entry to answer with, and what to serve if the fetch fails."""

    action: Action
    entry: Entry | None = None
    fallback: Entry | None = None


def decide(entry: Entry | None, negative: Entry | None, now: float, freshness: Freshness) -> Decision:
    """Decide how to answer from *entry* (a profile) and *negative* (a not-found) at *now*.

    A fetch carries a fallback: the old profile while it is within stale-if-error, so an
    upstream failure or a spent budget degrades to stale data instead of an error.
    """
    if entry is not None and freshness.is_fresh(entry, now):
        return Decision(Action.SERVE, entry)
    if negative is not None and freshness.is_fresh(negative, now):
        return Decision(Action.NOT_FOUND)
    if entry is not None and freshness.serve_while_revalidating(entry, now):
        return Decision(Action.SERVE_STALE_AND_REFRESH, entry)
    fallback = entry if entry is not None and freshness.serve_instead_of_error(entry, now) else None
    return Decision(Action.FETCH, fallback=fallback)
