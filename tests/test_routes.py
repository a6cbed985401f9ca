"""Every route, over real HTTP, checked against what the simulator itself answers."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.conftest import SIM_SECRET


def upstream(sim: Any, **params: str) -> dict[str, Any]:
    """Ask the simulator directly (not counted against the service's calls in assertions)."""
    response = requests.get(
        sim.url + "/v1/userprofile", params=params, headers={"Authorization": f"Api-Key {SIM_SECRET}"}, timeout=5
    )
    return response.json()["userData"]


def test_healthz_needs_no_credentials_and_no_upstream_call(service, sim):
    response = service.get("/healthz", key=None)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["Content-Type"] == "application/json"
    assert sim.calls == 0


def test_recommendation_route_shapes_amplitudes_answer(service, sim):
    truth = upstream(sim, user_id="user-42", get_recs="true", rec_id="rec_home")["recommendations"][0]
    sim.reset()
    response = service.get("/v1/users/user-42/recommendations/rec_home")
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "MISS"
    assert response.json() == {
        "user_id": "user-42",
        "rec_id": "rec_home",
        "items": truth["items"],
        "count": len(truth["items"]),
        "is_control": truth["is_control"],
        "source": truth["recommendation_source"],
        "last_updated": truth["last_updated"],
        "fallback": False,
    }
    assert sim.calls == 1


def test_limit_truncates_items(service):
    body = service.get("/v1/users/user-7/recommendations/rec_home?limit=3").json()
    assert body["count"] == 3 and len(body["items"]) == 3


def test_device_routes_use_device_id(service, sim):
    response = service.get("/v1/devices/device-abc/cohorts")
    assert response.status_code == 200
    body = response.json()
    assert body["device_id"] == "device-abc" and "user_id" not in body
    assert ("device_id", "device-abc") in sim.requests[-1].params


def test_several_recommendations(service, sim):
    truth = {
        r["rec_id"]: r
        for r in upstream(sim, user_id="user-9", get_recs="true", rec_id="rec_home,rec_email")["recommendations"]
    }
    response = service.get("/v1/users/user-9/recommendations?ids=rec_home,rec_email&limit=5")
    assert response.status_code == 200
    recs = response.json()["recommendations"]
    assert set(recs) == {"rec_home", "rec_email"}
    for rec_id, rec in recs.items():
        assert rec["items"] == truth[rec_id]["items"][:5]
        assert rec["count"] == 5 and rec["fallback"] is False and rec["rec_id"] == rec_id


def test_properties_merge_user_and_computed_properties(service, sim):
    truth = upstream(sim, user_id="user-42", get_amp_props="true", get_computations="true")["amp_props"]
    body = service.get("/v1/users/user-42/properties").json()
    assert body == {"user_id": "user-42", "properties": truth}
    assert any(name.startswith("computed_") for name in body["properties"])


def test_properties_with_keys_returns_exactly_those_keys(service):
    body = service.get("/v1/users/user-42/properties?keys=plan,no_such_key").json()
    assert set(body["properties"]) == {"plan", "no_such_key"}
    assert body["properties"]["no_such_key"] is None
    assert body["properties"]["plan"] is not None


def test_single_property_and_missing_property(service):
    body = service.get("/v1/users/user-42/properties/plan").json()
    assert body["name"] == "plan" and body["value"] is not None
    body = service.get("/v1/users/user-42/properties/nothing_here").json()
    assert body == {"user_id": "user-42", "name": "nothing_here", "value": None}


def test_cohorts_and_membership(service, sim):
    truth = upstream(sim, user_id="user-42", get_cohort_ids="true")["cohort_ids"]
    body = service.get("/v1/users/user-42/cohorts").json()
    assert body == {"user_id": "user-42", "cohort_ids": truth, "count": len(truth), "source": "profile_api"}
    assert "cohort_vip" in truth
    assert service.get("/v1/users/user-42/cohorts/cohort_vip").json() == {
        "user_id": "user-42",
        "cohort_id": "cohort_vip",
        "member": True,
        "source": "profile_api",
    }
    assert service.get("/v1/users/user-42/cohorts/not_a_cohort").json()["member"] is False


@pytest.mark.parametrize("propensity_type", ["score", "pct"])
def test_prediction(service, sim, propensity_type):
    truth = upstream(
        sim, user_id="user-42", get_propensity="true", prediction_id="pred_churn", propensity_type=propensity_type
    )
    response = service.get(f"/v1/users/user-42/predictions/pred_churn?type={propensity_type}")
    assert response.status_code == 200
    assert response.json() == {
        "user_id": "user-42",
        "prediction_id": "pred_churn",
        "type": propensity_type,
        "value": truth["propensities"][0]["prop"],
    }


def test_prediction_default_type_is_configured_type(service):
    assert service.get("/v1/users/user-42/predictions/pred_churn").json()["type"] == "score"


def test_whole_profile(service, sim):
    response = service.get("/v1/users/user-42")
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == "user-42"
    assert set(body) == {"user_id", "device_id", "properties", "cohort_ids", "recommendations", "predictions"}
    assert set(body["recommendations"]) <= {"rec_home", "rec_email"} and body["recommendations"]
    assert set(body["predictions"]) == {"pred_churn", "pred_purchase"}
    assert body["predictions"]["pred_churn"]["type"] == "score"
    assert isinstance(body["predictions"]["pred_churn"]["value"], float)
    assert sim.calls == 1


def test_one_upstream_call_per_user_across_every_route(service, sim):
    paths = [
        "/v1/users/user-5",
        "/v1/users/user-5/recommendations/rec_home",
        "/v1/users/user-5/recommendations/rec_email?limit=2",
        "/v1/users/user-5/recommendations?ids=rec_home,rec_email",
        "/v1/users/user-5/recommendations",
        "/v1/users/user-5/properties",
        "/v1/users/user-5/properties?keys=plan,city",
        "/v1/users/user-5/properties/plan",
        "/v1/users/user-5/cohorts",
        "/v1/users/user-5/cohorts/cohort_vip",
        "/v1/users/user-5/predictions/pred_churn",
        "/v1/users/user-5/predictions/pred_purchase?type=score",
    ]
    statuses = [service.get(path).status_code for path in paths]
    assert statuses == [200] * len(paths)
    assert sim.calls == 1
    params = dict(sim.requests[0].params)
    assert params["rec_id"] == "rec_email,rec_home"
    assert params["prediction_id"] == "pred_churn,pred_purchase"
    assert params["get_amp_props"] == params["get_computations"] == params["get_cohort_ids"] == "true"


def test_ids_outside_the_configured_sets_get_their_own_call(service, sim):
    assert service.get("/v1/users/user-5/properties").status_code == 200
    assert service.get("/v1/users/user-5/recommendations/rec_cart").status_code == 200
    assert service.get("/v1/users/user-5/predictions/pred_churn?type=pct").status_code == 200
    assert service.get("/v1/users/user-5/recommendations/rec_home?rec_type=random").status_code == 200
    assert sim.calls == 4
    rec_call = dict(sim.requests[1].params)
    assert rec_call["rec_id"] == "rec_cart" and "get_amp_props" not in rec_call
    assert dict(sim.requests[3].params)["rec_type"] == "random"
    # Each narrower answer is cached in turn.
    assert service.get("/v1/users/user-5/recommendations/rec_cart").headers["X-Cache"] == "HIT"
    assert sim.calls == 4


def test_control_group_payload_is_flagged(service):
    body = service.get("/v1/users/control-1/recommendations/rec_home").json()
    assert body["is_control"] is True and body["fallback"] is False and body["items"]


def test_every_response_is_a_json_object(service):
    for path in [
        "/v1/users/user-1/cohorts",
        "/v1/users/unknown-1/cohorts",
        "/nope",
        "/v1/users/user-1/properties?keys=",
    ]:
        response = service.get(path)
        assert response.headers["Content-Type"] == "application/json"
        assert isinstance(response.json(), dict)
