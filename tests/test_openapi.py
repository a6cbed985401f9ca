"""The OpenAPI document: valid, complete, and true to what the service answers."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import create_app
from tests.conftest import BRAZE_KEY


def _document() -> dict:
    app = create_app(
        environ={
            "AMPLITUDE_SECRET_KEY": "only-for-the-document",
            "PROXY_API_KEYS": "braze:only-for-the-document",
            "PROFILE_REC_IDS": "rec_home,rec_email",
        }
    )
    try:
        return app.test_client().get("/openapi.json").get_json()
    finally:
        app.extensions["profile_proxy"].close()


SCHEMA = schemathesis.openapi.from_dict(_document())


def test_document_is_valid_openapi_and_lists_every_route(service):
    response = service.get("/openapi.json", key=None)
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert set(document["paths"]) == {
        "/healthz",
        "/readyz",
        "/v1/{kind}/{id}",
        "/v1/{kind}/{id}/recommendations",
        "/v1/{kind}/{id}/recommendations/{rec_id}",
        "/v1/{kind}/{id}/properties",
        "/v1/{kind}/{id}/properties/{name}",
        "/v1/{kind}/{id}/cohorts",
        "/v1/{kind}/{id}/cohorts/{cohort_id}",
        "/v1/{kind}/{id}/predictions/{prediction_id}",
        "/v1/webhooks/amplitude/cohorts",
        "/v1/admin/cohorts",
        "/v1/admin/cohorts/open",
        "/v1/admin/cohorts/{cohort_id}/arm",
    }
    assert set(document["components"]["securitySchemes"]) == {"basicAuth", "bearerAuth", "apiKeyAuth", "webhookSecret"}
    receiver = document["paths"]["/v1/webhooks/amplitude/cohorts"]["post"]
    assert receiver["security"] == [{"webhookSecret": []}]
    assert {"200", "400", "401", "413", "503"} <= set(receiver["responses"])
    rec = document["paths"]["/v1/{kind}/{id}/recommendations/{rec_id}"]["get"]
    assert {p["name"] for p in rec["parameters"]} == {"kind", "id", "rec_id", "limit", "rec_type", "default"}
    assert {"200", "400", "401", "404", "502", "503"} <= set(rec["responses"])
    assert "Retry-After" in rec["responses"]["503"]["headers"]


@pytest.fixture(scope="module")
def live_service(simulator_server):
    """One service for the whole property-based run (module scope keeps it fast)."""
    import threading

    from werkzeug.serving import make_server

    from tests.conftest import base_env

    app = create_app(environ=base_env(simulator_server))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    app.extensions["profile_proxy"].close()


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_5xx_and_no_contradiction(case, live_service):
    with requests.Session() as session:
        case.call_and_validate(
            base_url=live_service,
            session=session,
            headers={"Authorization": f"Bearer {BRAZE_KEY}"},
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance],
        )  # fmt: skip
