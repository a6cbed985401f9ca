"""The lookup decision as a table: (entry age, not-found age) -> what to do."""

from __future__ import annotations

import pytest

from app.core.freshness import Entry, Freshness
from app.core.policy import Action, decide

NOW = 1_800_000_000.0
FRESHNESS = Freshness(ttl=300, stale_while_revalidate=3600, stale_if_error=86_400, negative_ttl=60)


def profile(age: float) -> Entry:
    return FRESHNESS.entry(b'{"cohort_ids":[]}', NOW - age)


def not_found(age: float) -> Entry:
    return FRESHNESS.entry(None, NOW - age)


@pytest.mark.parametrize(
    ("entry_age", "negative_age", "action", "serves_entry", "falls_back"),
    [
        (None, None, Action.FETCH, False, False),  # never seen: fetch, nothing to fall back on
        (0, None, Action.SERVE, True, False),
        (299.9, None, Action.SERVE, True, False),  # fresh until the TTL
        (300, None, Action.SERVE_STALE_AND_REFRESH, True, False),  # the TTL itself is stale
        (300 + 3599, None, Action.SERVE_STALE_AND_REFRESH, True, False),
        (300 + 3600, None, Action.FETCH, False, True),  # past revalidation: wait, but stale-if-error still
        (300 + 86_399, None, Action.FETCH, False, True),
        (300 + 86_400, None, Action.FETCH, False, False),  # too old to stand in for an error
        (None, 0, Action.NOT_FOUND, False, False),
        (None, 59.9, Action.NOT_FOUND, False, False),
        (None, 60, Action.FETCH, False, False),  # a not-found is forgotten after its own TTL
        (10, 5, Action.SERVE, True, False),  # a fresh profile wins over a not-found
        (4000, 5, Action.NOT_FOUND, False, False),  # a fresh not-found wins over a stale profile
        (400, 120, Action.SERVE_STALE_AND_REFRESH, True, False),
    ],
)
def test_decision_table(entry_age, negative_age, action, serves_entry, falls_back):
    entry = profile(entry_age) if entry_age is not None else None
    negative = not_found(negative_age) if negative_age is not None else None
    decision = decide(entry, negative, NOW, FRESHNESS)
    assert decision.action is action
    assert (decision.entry is entry and entry is not None) == serves_entry
    assert (decision.fallback is entry and entry is not None) == falls_back


def test_without_stale_windows_an_expired_entry_is_fetched_with_no_fallback():
    strict = Freshness(ttl=60, stale_while_revalidate=0, stale_if_error=0, negative_ttl=60)
    entry = strict.entry(b"{}", NOW - 61)
    assert decide(entry, None, NOW, strict).action is Action.FETCH
    assert decide(entry, None, NOW, strict).fallback is None


def test_entries_are_kept_only_as_long_as_some_window_can_use_them():
    assert profile(0).expires_at == NOW + 300 + 86_400
    assert not_found(0).expires_at == NOW + 60
