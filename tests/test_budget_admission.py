"""The budget as a user of the service sees it: ids never asked about, exposure, classes, Braze's health."""

from __future__ import annotations

import re

import pytest

from tests.conftest import BRAZE_KEY, CURL_KEY

NEVER_STORED = [
    "null", "NULL", "None", "nil", "undefined", "unknown", "anonymous", "n%2Fa", "NA", "0", "-1", "lmy47d",
    "%7B%7D", "00000000-0000-0000-0000-000000000000", "%20", "%20%20null%20", "%22%22",
]  # fmt: skip


@pytest.mark.parametrize("raw_id", NEVER_STORED)
def test_ids_amplitude_never_stores_cost_no_call(service, sim, raw_id):
    missing = service.get(f"/v1/users/{raw_id}/cohorts")
    assert missing.status_code == 404 and missing.json()["error"] == "user_not_found"
    fallback = service.get(f"/v1/devices/{raw_id}/recommendations/rec_home?default=sku-1")
    assert fallback.status_code == 200
    assert (fallback.json()["fallback"], fallback.json()["reason"]) == (True, "user_not_found")
    assert sim.calls == 0


def test_ids_that_merely_contain_such_words_are_asked_about(service, sim):
    for user in ("null-island", "user-0", "unknownish"):
        service.get(f"/v1/users/{user}/cohorts")
    assert sim.calls == 3


def asks_for_recommendations(sim) -> list[bool]:
    return [("get_recs", "true") in request.params for request in sim.requests]


def test_recommendations_come_with_the_profile_by_default(service, sim):
    service.get("/v1/users/user-e1/properties")
    service.get("/v1/users/user-e1/recommendations/rec_home")
    assert asks_for_recommendations(sim) == [True]  # one call answers both


def test_when_asked_only_recommendation_routes_log_an_exposure(make_service, sim):
    service = make_service(RECOMMENDATIONS_FETCH="when_asked")
    for route in ("properties", "cohorts/cohort_vip", "predictions/pred_churn"):
        assert service.get(f"/v1/users/user-e2/{route}").status_code == 200
    assert asks_for_recommendations(sim) == [False]  # one call for the three, no exposure
    assert service.get("/v1/users/user-e2/recommendations/rec_home").json()["items"]
    assert service.get("/v1/users/user-e2").json()["recommendations"]["rec_home"]["items"]
    assert asks_for_recommendations(sim) == [False, True]


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, name
    return float(found.group(1))


def test_calls_are_counted_by_caller_class(make_service, sim):
    service = make_service(PROXY_API_KEYS=f"braze:{BRAZE_KEY},curl:{CURL_KEY}", BULK_CALLERS="curl")
    service.get("/v1/users/user-c1/cohorts")
    service.get("/v1/users/user-c2/cohorts", key=CURL_KEY)
    service.get("/v1/users/user-c3/cohorts", key=CURL_KEY)
    text = service.get("/metrics").text
    assert metric(text, 'proxy_budget_granted_total{class="live"}') == 1
    assert metric(text, 'proxy_budget_granted_total{class="bulk"}') == 2
    assert metric(text, "proxy_budget_utilization") > 0
    assert "proxy_budget_wait_seconds_count" in text


def test_answers_braze_counts_as_failures_are_counted_and_warned_about(make_service, sim, caplog):
    service = make_service(BRAZE_FAILURE_WARN_MIN=3, BRAZE_FAILURE_WARN_SHARE=0.5, BREAKER_FAILURE_THRESHOLD=100)
    service.get("/v1/users/user-h1/cohorts")  # a 200
    sim.set_fault("status", status=500)
    for n in range(4):  # 503 upstream_unavailable: a failure in Braze's count
        assert service.get(f"/v1/users/user-h{n + 2}/cohorts").status_code == 503
    assert service.get("/v1/users/unknown-h/cohorts").status_code == 503
    text = service.get("/metrics").text
    assert metric(text, "proxy_braze_failures_last_minute") == 5
    assert metric(text, "proxy_braze_answers_last_minute") >= 6
    assert 0.5 < metric(text, "proxy_braze_failure_share") < 1
    # The warning comes when a second rolls over with enough failures in the minute.
    service.extensions.braze_watch._roll(int(service.extensions.clock.monotonic()) + 1)
    assert "failures Braze counts" in caplog.text
