"""The OpenAPI 3 document, generated from the routes and the marshmallow schemas."""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from app.http import schemas
from app.http.params import IdList
from app.http.routes import ROUTES

SECURITY_SCHEMES = {
    "basicAuth": {"type": "http", "scheme": "basic", "description": "Any user name; the caller key as password."},
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`."},
    "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "webhookSecret": {
        "type": "http",
        "scheme": "bearer",
        "description": "One of COHORT_WEBHOOK_SECRETS, as Amplitude's Cohort Webhooks destination sends it.",
    },
}
CALLER_SECURITY: list[dict[str, list[str]]] = [{"basicAuth": []}, {"bearerAuth": []}, {"apiKeyAuth": []}]

_DATA_ERRORS = {
    400: "Invalid id or parameter (`invalid_request`, with `field`).",
    401: "Missing or wrong caller key (`unauthorized`).",
    403: "The caller's address is not allowed (`forbidden`).",
    404: "`user_not_found`, `no_recommendations` or `not_found`; with AMPLITUDE_REGION=eu, "
    "`profile_api_unavailable` or `cohort_not_kept`.",
    429: "Too many failed authentications from this address (`too_many_auth_failures`).",
    502: "Amplitude rejected the service's key (`upstream_misconfigured`).",
    503: "`upstream_unavailable` or `rate_limited`; retry after `Retry-After` seconds.",
}

_WEBHOOK_ERRORS = {
    400: "Not a valid Cohort Webhooks batch (`invalid_request`, with `field`); nothing was queued.",
    401: "Missing or wrong webhook secret (`unauthorized`).",
    404: "Cohort webhooks are not configured (`not_found`).",
    413: "The batch is larger than the receiver accepts (`request_too_large`).",
    503: "The batch could not be queued (`cohort_queue_unavailable`); Amplitude retries it.",
}

_ADMIN_ERRORS = {
    401: "Missing or wrong admin key (`unauthorized`).",
    403: "An action that needs ADMIN_API_KEYS set, or an address outside the allowlist (`forbidden`).",
    404: "Cohort webhooks are not configured (`not_found`).",
    429: "Too many failed authentications from this address (`too_many_auth_failures`).",
    503: "The cohort store cannot be reached (`cohort_store_unavailable`); retry after `Retry-After` seconds.",
}

_PATH_PARAMS = {
    "kind": {"schema": {"type": "string", "enum": ["users", "devices"]}, "description": "users or devices"},
    "id": {"schema": {"type": "string", "minLength": 1}, "description": "The URL-encoded user or device id."},
}  # fmt: skip


def _openapi_path(rule: str) -> tuple[str, list[str]]:
    names = re.findall(r"<(?:[^:<>]+:)?([^<>]+)>", rule)
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule), names


def build_spec() -> dict[str, Any]:
    """Describe every documented route (data routes and Flask's alike: :data:`app.http.routes.ROUTES`)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Amplitude profiles for Braze Connected Content",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Flat JSON objects from Amplitude's User Profile API, cached and rate-budgeted."},
    )
    plugin.map_to_openapi_type(IdList, "string", None)
    for name, scheme in SECURITY_SCHEMES.items():
        spec.components.security_scheme(name, scheme)
    spec.components.schema("Error", schema=schemas.ErrorResponse)
    for endpoint, route in ROUTES.items():
        if not route.documented:
            continue
        path, names = _openapi_path(route.rule)
        parameters: list[dict[str, Any]] = [
            {"in": "path", "name": n, "required": True, **_PATH_PARAMS.get(n, {"schema": {"type": "string"}})}
            for n in names
        ]
        if route.args is not None:
            parameters.append({"in": "query", "schema": type(route.args)})
        responses: dict[int | str, Any] = {
            200: {"description": "OK", "content": {"application/json": {"schema": route.response}}}
        }
        is_data = route.serves_data
        errors = {"caller": _DATA_ERRORS, "webhook": _WEBHOOK_ERRORS}.get(route.auth or "", {})
        if route.auth in ("admin", "operator") and route.rule.startswith("/v1/admin/"):
            errors = _ADMIN_ERRORS
        if errors:
            for status, text in errors.items():
                entry: dict[str, Any] = {"description": text, "content": {"application/json": {"schema": "Error"}}}
                if status in (429, 503):
                    entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
                responses[status] = entry
        operation: dict[str, Any] = {
            "summary": route.summary,
            "description": route.description,
            "operationId": endpoint.replace(".", "_"),
            "parameters": parameters,
            "responses": responses,
        }
        if is_data or route.auth in ("admin", "operator"):
            operation["security"] = CALLER_SECURITY
        elif route.auth == "webhook":
            operation["security"] = [{"webhookSecret": []}]
        spec.path(path=path, operations={route.method.lower(): operation})
    return spec.to_dict()
