"""The error table, the credential styles, and ids that must reach Amplitude intact."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import requests

from tests.conftest import BRAZE_KEY, CURL_KEY


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/users/user-1/recommendations/rec_home?limit=0", "limit"),
        ("/v1/users/user-1/recommendations/rec_home?limit=101", "limit"),
        ("/v1/users/user-1/recommendations/rec_home?limit=ten", "limit"),
        ("/v1/users/user-1/recommendations/rec_home?rec_type=best", "rec_type"),
        ("/v1/users/user-1/recommendations/rec_home?default=", "default"),
        ("/v1/users/user-1/recommendations/rec_home?default=a,,b", "default"),
        ("/v1/users/user-1/recommendations?ids=", "ids"),
        ("/v1/users/user-1/predictions/pred_churn?type=percent", "type"),
        ("/v1/users/user-1/properties?keys=a,%0Ab", "keys"),
        ("/v1/users/user-1/cohorts?limit=1&limit=2", "limit"),
        ("/v1/users/" + "x" * 1025 + "/cohorts", "user_id"),
        ("/v1/users/" + quote("é" * 513) + "/cohorts", "user_id"),
        ("/v1/users/a%0D%0Ab/cohorts", "user_id"),
        ("/v1/users/a%00b/cohorts", "user_id"),
        ("/v1/users/%FF%FE/cohorts", "user_id"),
        ("/v1/devices/%E2%80%AEevil/cohorts", "device_id"),
        ("/v1/users/user-1/cohorts/%00", "cohort_id"),
        ("/v1/users/user-1/properties/a%0Ab", "name"),
        ("/v1/users/user-1/recommendations/%1B", "rec_id"),
    ],
)
def test_invalid_input_is_a_400_naming_the_field_and_calls_nothing(service, sim, path, field):
    response = service.get(path)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_request"
    assert body["field"] == field and field in body["message"]
    assert response.headers["Cache-Control"] == "no-store"
    assert sim.calls == 0


@pytest.mark.parametrize(
    "auth",
    [
        {"headers": {"Authorization": f"Bearer {BRAZE_KEY}"}},
        {"headers": {"X-API-Key": CURL_KEY}},
        {"auth": ("braze", BRAZE_KEY)},
        {"auth": ("anything-at-all", CURL_KEY)},
    ],
    ids=["bearer", "x-api-key", "basic", "basic-any-user"],
)
def test_each_credential_style_is_accepted(service, auth):
    response = requests.get(service.url + "/v1/users/user-1/cohorts", timeout=5, **auth)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"headers": {"Authorization": "Bearer wrong-key-000"}},
        {"headers": {"X-API-Key": "wrong-key-000"}},
        {"auth": ("braze", "wrong-key-000")},
        {"auth": (BRAZE_KEY, "")},
        {"headers": {"Authorization": "Basic !!!not-base64"}},
        {"headers": {"Authorization": f"Token {BRAZE_KEY}"}},
    ],
    ids=["none", "bearer", "x-api-key", "basic", "key-as-user", "garbled-basic", "unknown-scheme"],
)
def test_missing_or_wrong_credentials_are_401_with_basic_challenge(service, sim, auth):
    response = requests.get(service.url + "/v1/users/user-1/cohorts", timeout=5, **auth)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert sim.calls == 0


def test_key_in_query_string_is_not_accepted(service):
    response = requests.get(service.url + f"/v1/users/user-1/cohorts?api_key={BRAZE_KEY}", timeout=5)
    assert response.status_code == 401


@pytest.mark.parametrize("status", [200, 400, 404])
def test_unknown_user_is_404_whatever_status_amplitude_uses(service, sim, status):
    sim.unknown_user_status = status
    response = service.get("/v1/users/unknown-77/properties")
    assert response.status_code == 404
    assert response.json()["error"] == "user_not_found"


def test_unknown_user_is_remembered(service, sim):
    assert service.get("/v1/users/unknown-1/cohorts").status_code == 404
    assert service.get("/v1/users/unknown-1/properties").status_code == 404
    assert service.get("/v1/users/unknown-1/recommendations/rec_home").status_code == 404
    assert sim.calls == 1


@pytest.mark.parametrize("user", ["new-user-1", "inactive-user-1"])
def test_no_recommendations_is_404(service, user):
    response = service.get(f"/v1/users/{user}/recommendations/rec_home")
    assert response.status_code == 404
    assert response.json()["error"] == "no_recommendations"


def test_absent_rec_id_is_no_recommendations(service):
    response = service.get("/v1/users/user-1/recommendations/rec_nobody_has")
    assert response.status_code == 404 and response.json()["error"] == "no_recommendations"


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/v1/robots/user-1/cohorts", 404, "not_found"),
        ("GET", "/v1/users/user-1/cohorts/a/b", 404, "not_found"),
        ("POST", "/v1/users/user-1/cohorts", 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods(service, method, path, status, error):
    response = requests.request(method, service.url + path, headers={"Authorization": f"Bearer {BRAZE_KEY}"}, timeout=5)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert response.headers["Content-Type"] == "application/json"


def test_amplitude_rejecting_the_key_is_502_and_never_retried(service, sim):
    sim.set_fault("unauthorized")
    response = service.get("/v1/users/user-1/cohorts")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_misconfigured"
    assert sim.calls == 1


def test_wrong_secret_key_end_to_end(make_service, sim):
    service = make_service(AMPLITUDE_SECRET_KEY="not-the-right-key")
    response = service.get("/v1/users/user-1/cohorts")
    assert response.status_code == 502
    assert "not-the-right-key" not in response.text
    assert sim.calls == 1


@pytest.mark.parametrize(
    "identity",
    [
        "a&b=c",
        "x=1&user_id=evil",
        "hash#tag",
        "slash/inside",
        "100%",
        "two words",
        "ünïcødé-用户",
        "plus+sign",
        "semi;colon",
    ],
)
def test_identity_reaches_amplitude_as_exactly_one_value(service, sim, identity):
    response = service.get(f"/v1/users/{quote(identity, safe='')}/cohorts")
    assert response.status_code == 200
    assert response.json()["user_id"] == identity
    params = sim.requests[-1].params
    assert [value for name, value in params if name == "user_id"] == [identity]
    assert not any(name == "device_id" for name, _ in params)
    assert {name for name, _ in params} == {
        "user_id",
        "get_amp_props",
        "get_computations",
        "get_cohort_ids",
        "get_recs",
        "rec_id",
        "get_propensity",
        "prediction_id",
        "propensity_type",
    }


def test_encoded_slash_and_literal_slash_are_different_users(service, sim):
    assert service.get("/v1/users/a%2Fb/cohorts").status_code == 200
    assert dict(sim.requests[-1].params)["user_id"] == "a/b"
    assert service.get("/v1/users/a/b/cohorts").status_code == 404


def test_secret_key_never_in_responses_or_logs(make_service, sim, caplog):
    service = make_service()
    sim.set_fault("status", status=500)
    bodies = [service.get(p).text for p in ["/v1/users/u1/cohorts", "/v1/users/u2", "/nope"]]
    sim.set_fault("unauthorized")
    bodies.append(service.get("/v1/users/u3/cohorts").text)
    from tests.conftest import SIM_SECRET

    assert all(SIM_SECRET not in body for body in bodies)
    assert SIM_SECRET not in caplog.text
    assert BRAZE_KEY not in caplog.text
