"""The HTTP routes: parse arguments, look the profile up, shape flat JSON for Liquid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, g

from app.errors import FALLBACK_ERRORS, ApiError, InvalidRequest, NoRecommendations, json_response
from app.hooks import authenticate
from app.observability import ACCESS_LOG, CIRCUIT_STATES, RequestTrace
from app.params import MAX_QUERY_BYTES, decode_segment, parse_query, query_args
from app.profile import KINDS, Identity, ProfileQuery
from app.profiles import Lookup

health = Blueprint("health", __name__)
v1 = Blueprint("v1", __name__, url_prefix="/v1/<any(users, devices):kind>/<id>")

# Room left after the lookup for shaping and writing the response.
RESPONSE_MARGIN_SECONDS = 0.05


@health.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


@health.get("/readyz")
def readyz() -> Response:
    """Ready to serve: settings loaded, Redis reachable when configured; no Amplitude call."""
    extensions = current_app.extensions["profile_proxy"]
    checks: dict[str, Any] = {"settings": "ok", "circuit": extensions.breaker.state}
    status = "ok"
    if extensions.redis is None:
        checks["redis"] = "not_configured"
    elif extensions.redis.ping():
        checks["redis"] = "ok"
    else:
        # Still serving from the local cache and budget share: degraded, not down.
        checks["redis"] = "unavailable"
        status = "degraded"
    if checks["circuit"] != "closed":
        status = "degraded"
    return json_response({"status": status, "checks": checks}, headers={"Cache-Control": "no-store"})


@health.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of this service, built once from its routes and schemas."""
    extensions = current_app.extensions["profile_proxy"]
    if extensions.openapi is None:
        from app.openapi import build_spec

        extensions.openapi = build_spec(current_app)
    return json_response(extensions.openapi, headers={"Cache-Control": "public, max-age=3600"})


@health.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics; needs an admin key when ADMIN_API_KEYS is set, else a caller key."""
    extensions = current_app.extensions["profile_proxy"]
    keys = extensions.admin_keys or extensions.caller_keys
    if keys:
        g.trace.caller = authenticate(keys, kind="admin" if extensions.admin_keys else "caller")
    ACCESS_LOG.flush()  # counts queued by this process's requests so far
    metrics = extensions.metrics
    metrics.circuit.set(CIRCUIT_STATES[extensions.breaker.state])
    metrics.budget_tokens.set(extensions.budget.tokens_left())
    redis = extensions.redis
    metrics.redis_up.set(-1 if redis is None else int(redis.healthy))
    body, content_type = metrics.render()
    return Response(body, mimetype=None, content_type=content_type, headers={"Cache-Control": "no-store"})


@v1.url_value_preprocessor
def _prepare(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Authenticate, then decode and check every path value and the query, before any other work."""
    trace: RequestTrace = g.trace
    extensions = trace.extensions
    trace.deadline = trace.started + extensions.settings.request_deadline_seconds - RESPONSE_MARGIN_SECONDS
    trace.caller = authenticate(extensions.caller_keys) if extensions.caller_keys else "open"
    values = values if values is not None else {}
    id_field = KINDS[values.pop("kind")]
    trace.identity = Identity(id_field, decode_segment(id_field, values.pop("id")))
    for name, raw in values.items():
        values[name] = decode_segment(name, raw)
    if len(trace.raw_query) > MAX_QUERY_BYTES:
        raise InvalidRequest("query", f"must be at most {MAX_QUERY_BYTES} bytes")
    if endpoint not in _ROUTE_SCHEMAS:
        parse_query(trace.raw_query)  # routes without arguments still reject a malformed query


# The query schema each route validates against (see app.params.SCHEMAS).
_ROUTE_SCHEMAS = {
    "v1.recommendation": "recommendation",
    "v1.recommendations": "recommendations",
    "v1.properties": "properties",
    "v1.prediction": "prediction",
}


def _args(trace: RequestTrace, schema: str) -> Mapping[str, Any]:
    return query_args(schema, trace.raw_query)


def _lookup(trace: RequestTrace, query: ProfileQuery) -> Lookup:
    return trace.extensions.profiles.lookup(query, trace.deadline, trace)


def _respond(body: dict[str, Any], lookup: Lookup | None) -> Response:
    """A 200 whose caching headers tell how fresh the data is."""
    if lookup is None:
        headers = {"X-Cache": "MISS", "Cache-Control": "no-store"}
    else:
        headers = {
            "X-Cache": lookup.cache,
            "Age": str(int(lookup.age)),
            "Cache-Control": f"private, max-age={int(lookup.fresh_for)}",
        }
    return json_response(body, headers=headers)


def _shape_rec(rec_id: str, rec: dict[str, Any], limit: int | None) -> dict[str, Any]:
    items = rec["items"][:limit] if limit else rec["items"]
    return {
        "rec_id": rec_id,
        "items": items,
        "count": len(items),
        "is_control": rec["is_control"],
        "source": rec["source"],
        "last_updated": rec["last_updated"],
        "fallback": False,
    }


def _fallback_rec(rec_id: str, default: tuple[str, ...], limit: int | None, reason: ApiError) -> dict[str, Any]:
    items = list(default[:limit] if limit else default)
    return {
        "rec_id": rec_id,
        "items": items,
        "count": len(items),
        "is_control": False,
        "source": None,
        "last_updated": None,
        "fallback": True,
        "reason": reason.error,
    }


def _find_rec(profile: dict[str, Any], rec_id: str) -> dict[str, Any]:
    recs = profile.get("recommendations")
    if not recs or rec_id not in recs:
        raise NoRecommendations(f"Amplitude has no recommendations for this user under rec_id {rec_id}")
    return recs[rec_id]


def _recommendations(
    trace: RequestTrace, rec_ids: tuple[str, ...], args: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], Lookup | None]:
    """Each requested recommendation, or its fallback when ``default`` was given."""
    query = trace.extensions.planner.recommendations(trace.identity, rec_ids, args.get("rec_type"))
    default, limit = args.get("default"), args.get("limit")
    try:
        lookup = _lookup(trace, query)
    except FALLBACK_ERRORS as exc:
        if default is None:
            raise
        return {rec_id: _fallback_rec(rec_id, default, limit, exc) for rec_id in rec_ids}, None
    shaped = {}
    for rec_id in rec_ids:
        try:
            shaped[rec_id] = _shape_rec(rec_id, _find_rec(lookup.profile, rec_id), limit)
        except NoRecommendations as exc:
            if default is None:
                raise
            shaped[rec_id] = _fallback_rec(rec_id, default, limit, exc)
    return shaped, lookup


@v1.get("/recommendations/<rec_id>")
def recommendation(rec_id: str) -> Response:
    trace: RequestTrace = g.trace
    shaped, lookup = _recommendations(trace, (rec_id,), _args(trace, "recommendation"))
    return _respond({trace.identity.id_field: trace.identity.value, **shaped[rec_id]}, lookup)


@v1.get("/recommendations")
def recommendations() -> Response:
    trace: RequestTrace = g.trace
    args = _args(trace, "recommendations")
    rec_ids = args.get("ids") or trace.extensions.planner.rec_ids
    if not rec_ids:
        raise InvalidRequest("ids", "is required when PROFILE_REC_IDS is not configured")
    shaped, lookup = _recommendations(trace, tuple(rec_ids), args)
    if lookup is not None and all(rec["fallback"] for rec in shaped.values()):
        lookup = None
    return _respond({trace.identity.id_field: trace.identity.value, "recommendations": shaped}, lookup)


@v1.get("/properties")
def properties() -> Response:
    trace: RequestTrace = g.trace
    keys = _args(trace, "properties").get("keys")
    lookup = _lookup(trace, trace.extensions.planner.whole(trace.identity))
    props = lookup.profile["properties"]
    if keys is not None:
        props = {key: props.get(key) for key in keys}
    return _respond({trace.identity.id_field: trace.identity.value, "properties": props}, lookup)


@v1.get("/properties/<name>")
def property_value(name: str) -> Response:
    trace: RequestTrace = g.trace
    lookup = _lookup(trace, trace.extensions.planner.whole(trace.identity))
    value = lookup.profile["properties"].get(name)
    return _respond({trace.identity.id_field: trace.identity.value, "name": name, "value": value}, lookup)


@v1.get("/cohorts")
def cohorts() -> Response:
    trace: RequestTrace = g.trace
    lookup = _lookup(trace, trace.extensions.planner.whole(trace.identity))
    cohort_ids = lookup.profile["cohort_ids"]
    body = {trace.identity.id_field: trace.identity.value, "cohort_ids": cohort_ids, "count": len(cohort_ids)}
    return _respond(body, lookup)


@v1.get("/cohorts/<cohort_id>")
def cohort_membership(cohort_id: str) -> Response:
    trace: RequestTrace = g.trace
    lookup = _lookup(trace, trace.extensions.planner.whole(trace.identity))
    member = cohort_id in lookup.profile["cohort_ids"]
    return _respond({trace.identity.id_field: trace.identity.value, "cohort_id": cohort_id, "member": member}, lookup)


@v1.get("/predictions/<prediction_id>")
def prediction(prediction_id: str) -> Response:
    trace: RequestTrace = g.trace
    planner = trace.extensions.planner
    propensity_type = _args(trace, "prediction").get("type") or planner.propensity_type
    lookup = _lookup(trace, planner.prediction(trace.identity, prediction_id, propensity_type))
    value = lookup.profile["predictions"].get(prediction_id)
    body = {
        trace.identity.id_field: trace.identity.value,
        "prediction_id": prediction_id,
        "type": propensity_type,
        "value": value,
    }
    return _respond(body, lookup)


@v1.get("")
def profile() -> Response:
    trace: RequestTrace = g.trace
    planner = trace.extensions.planner
    lookup = _lookup(trace, planner.whole(trace.identity))
    data = lookup.profile
    recs = data["recommendations"] or {}
    ids = {"user_id": data["user_id"], "device_id": data["device_id"], trace.identity.id_field: trace.identity.value}
    body = {
        **ids,
        "properties": data["properties"],
        "cohort_ids": data["cohort_ids"],
        "recommendations": {
            rec_id: _shape_rec(rec_id, recs[rec_id], None) for rec_id in planner.rec_ids if rec_id in recs
        },
        "predictions": {
            pred_id: {"type": planner.propensity_type, "value": data["predictions"].get(pred_id)}
            for pred_id in planner.prediction_ids
        },
    }
    return _respond(body, lookup)
