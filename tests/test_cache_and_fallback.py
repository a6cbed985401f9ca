"""The cache (hit, miss, expiry, bound, single-flight) and the ``default`` fallback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from testkit import wait_until


def test_second_request_is_a_hit(service, sim):
    first = service.get("/v1/users/user-3/cohorts")
    second = service.get("/v1/users/user-3/cohorts")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.json() == second.json()
    assert sim.calls == 1
    assert second.headers["Cache-Control"].startswith("private, max-age=")


def test_expired_entry_is_served_stale_once_and_refreshed_once(make_service, sim, clock):
    service = make_service(clock=clock, CACHE_TTL_SECONDS=60)
    assert service.get("/v1/users/user-3/cohorts").headers["X-Cache"] == "MISS"
    clock.advance(30)
    assert service.get("/v1/users/user-3/cohorts").headers["X-Cache"] == "HIT"
    clock.advance(31)
    stale = service.get("/v1/users/user-3/cohorts")
    assert stale.status_code == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert int(stale.headers["Age"]) >= 61
    # Requests during the refresh keep getting the stale copy without starting another call.
    _wait_for(lambda: service.get("/v1/users/user-3/cohorts").headers["X-Cache"] == "HIT")
    assert sim.calls == 2


def test_entry_past_the_stale_window_is_fetched_again(make_service, sim, clock):
    service = make_service(clock=clock, CACHE_TTL_SECONDS=60, STALE_WHILE_REVALIDATE_SECONDS=60)
    service.get("/v1/users/user-3/cohorts")
    clock.advance(200)
    response = service.get("/v1/users/user-3/cohorts")
    assert response.headers["X-Cache"] == "MISS"
    assert sim.calls == 2


def test_negative_entries_expire_after_their_own_ttl(make_service, sim, clock):
    service = make_service(clock=clock, NEGATIVE_CACHE_TTL_SECONDS=10)
    assert service.get("/v1/users/unknown-5/cohorts").status_code == 404
    clock.advance(5)
    assert service.get("/v1/users/unknown-5/cohorts").status_code == 404
    assert sim.calls == 1
    clock.advance(6)
    assert service.get("/v1/users/unknown-5/cohorts").status_code == 404
    assert sim.calls == 2


def test_cache_is_bounded(make_service, sim):
    service = make_service(CACHE_MAX_ENTRIES=3)
    for n in range(6):
        assert service.get(f"/v1/users/user-{n}/cohorts").status_code == 200
    assert len(service.extensions.profile_store) == 3
    assert service.get("/v1/users/user-0/cohorts").headers["X-Cache"] == "MISS"
    assert sim.calls == 7


@pytest.mark.serial
def test_fifty_concurrent_requests_for_one_cold_user_make_one_call(service, sim):
    sim.latency_ms = 300
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: service.get("/v1/users/user-cold/properties"), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.text for r in responses}) == 1
    assert sim.calls == 1


REASONS = [
    ("unknown-9", None, "user_not_found"),
    ("new-9", None, "no_recommendations"),
    ("user-9", ("status", {"status": 500}), "upstream_unavailable"),
    ("user-9", ("rate_limited", {"retry_after": 5}), "rate_limited"),
]


@pytest.mark.parametrize(("user", "fault", "reason"), REASONS, ids=[r[2] for r in REASONS])
def test_default_fallback_for_each_reason(service, sim, user, fault, reason):
    if fault:
        sim.set_fault(fault[0], **fault[1])
    response = service.get(f"/v1/users/{user}/recommendations/rec_home?default=sku-1,sku-2,sku-3&limit=2")
    assert response.status_code == 200
    assert response.json() == {
        "user_id": user,
        "rec_id": "rec_home",
        "items": ["sku-1", "sku-2"],
        "count": 2,
        "is_control": False,
        "source": None,
        "last_updated": None,
        "fallback": True,
        "reason": reason,
    }


@pytest.mark.parametrize(("user", "fault", "reason"), REASONS, ids=[r[2] for r in REASONS])
def test_without_default_the_same_cases_are_errors(service, sim, user, fault, reason):
    if fault:
        sim.set_fault(fault[0], **fault[1])
    response = service.get(f"/v1/users/{user}/recommendations/rec_home")
    expected_status = 404 if reason in ("user_not_found", "no_recommendations") else 503
    assert response.status_code == expected_status
    assert response.json()["error"] == reason
    if expected_status == 503:
        assert int(response.headers["Retry-After"]) >= 1


def test_default_on_the_list_route_fills_only_missing_recs(service):
    response = service.get("/v1/users/user-9/recommendations?ids=rec_home,rec_unknown&default=a,b")
    assert response.status_code == 200
    recs = response.json()["recommendations"]
    assert recs["rec_home"]["fallback"] is False
    assert recs["rec_unknown"] == {
        "rec_id": "rec_unknown",
        "items": ["a", "b"],
        "count": 2,
        "is_control": False,
        "source": None,
        "last_updated": None,
        "fallback": True,
        "reason": "no_recommendations",
    }


def _wait_for(condition, timeout: float = 10.0) -> None:
    wait_until(condition, timeout)
