"""The data routes: parse arguments, look the profile up, shape flat JSON for Liquid.

Each view reads top to bottom: the gate has already checked the caller and decoded the
path, :func:`app.http.routes.route` has validated the query, so a view plans the
Amplitude query, looks it up (cache, budget and upstream behind one call) and shapes
the answer. Its one success status is 200; everything else is a raised typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.cohorts.errors import CohortNotKept
from app.core.query import ProfileQuery
from app.errors import (
    FALLBACK_ERRORS,
    ApiError,
    InvalidRequest,
    NoRecommendations,
    ProfileApiUnavailable,
)
from app.http import schemas
from app.http.params import (
    MembershipArgs,
    PredictionArgs,
    PropertiesArgs,
    RecommendationArgs,
    RecommendationListArgs,
)
from app.http.routes import Answer, RouteTable, route
from app.http.trace import RequestTrace
from app.lookup import Lookup

v1 = RouteTable("v1", "/v1/<any(users, devices):kind>/<id>")


def _lookup(trace: RequestTrace, query: ProfileQuery) -> Lookup:
    return trace.extensions.profile_lookup.lookup(query, trace.deadline, trace)


def _respond(body: dict[str, Any], lookup: Lookup | None) -> Answer:
    """A 200 whose caching headers tell how fresh the data is."""
    if lookup is None:
        headers = {"X-Cache": "MISS", "Cache-Control": "no-store"}
    else:
        headers = {
            "X-Cache": lookup.cache,
            "Age": str(int(lookup.age)),
            "Cache-Control": f"private, max-age={int(lookup.fresh_for)}",
        }
    return Answer(body, headers)


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
    query = trace.extensions.planner.recommendations(trace.subject, rec_ids, args.get("rec_type"))
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


@route(
    v1, "/recommendations/<rec_id>", summary="One recommendation", args=RecommendationArgs,
    response=schemas.RecommendationResponse,
    description="Items of one Amplitude recommendation. With `default`, failures become a 200 with `fallback: true`.",
)  # fmt: skip
def recommendation(trace: RequestTrace, args: Mapping[str, Any], rec_id: str) -> Answer:
    shaped, lookup = _recommendations(trace, (rec_id,), args)
    return _respond({trace.subject.id_field: trace.subject.value, **shaped[rec_id]}, lookup)


@route(
    v1, "/recommendations", summary="Several recommendations", args=RecommendationListArgs,
    response=schemas.RecommendationListResponse,
    description="Several recommendations at once (`ids`, else the configured PROFILE_REC_IDS).",
)  # fmt: skip
def recommendations(trace: RequestTrace, args: Mapping[str, Any]) -> Answer:
    rec_ids = args.get("ids") or trace.extensions.planner.rec_ids
    if not rec_ids:
        raise InvalidRequest("ids", "is required when PROFILE_REC_IDS is not configured")
    shaped, lookup = _recommendations(trace, tuple(rec_ids), args)
    if lookup is not None and all(rec["fallback"] for rec in shaped.values()):
        lookup = None
    return _respond({trace.subject.id_field: trace.subject.value, "recommendations": shaped}, lookup)


@route(
    v1, "/properties", summary="User properties", args=PropertiesArgs, response=schemas.PropertiesResponse,
    description="User and computed properties; with `keys`, exactly those keys (missing ones as null).",
)  # fmt: skip
def properties(trace: RequestTrace, args: Mapping[str, Any]) -> Answer:
    keys = args.get("keys")
    lookup = _lookup(trace, trace.extensions.planner.profile(trace.subject))
    props = lookup.profile["properties"]
    if keys is not None:
        props = {key: props.get(key) for key in keys}
    return _respond({trace.subject.id_field: trace.subject.value, "properties": props}, lookup)


@route(v1, "/properties/<name>", summary="One property", response=schemas.PropertyResponse)
def property_value(trace: RequestTrace, args: Mapping[str, Any], name: str) -> Answer:
    """`value` is null when the user lacks it."""
    lookup = _lookup(trace, trace.extensions.planner.profile(trace.subject))
    value = lookup.profile["properties"].get(name)
    return _respond({trace.subject.id_field: trace.subject.value, "name": name, "value": value}, lookup)


@route(v1, "/cohorts", summary="Cohorts", response=schemas.CohortsResponse)
def cohorts(trace: RequestTrace, args: Mapping[str, Any]) -> Answer:
    """Ids of the tracked cohorts the user is in, from the user's profile."""
    who = trace.subject
    lookup = _lookup(trace, trace.extensions.planner.profile(who))
    cohort_ids = lookup.profile["cohort_ids"]
    body = {who.id_field: who.value, "cohort_ids": cohort_ids, "count": len(cohort_ids), "source": "profile_api"}
    return _respond(body, lookup)


@route(
    v1, "/cohorts/<cohort_id>", summary="Cohort membership", args=MembershipArgs,
    response=schemas.CohortMembershipResponse,
    description="Whether the user is in the cohort: from the cohort's Cohort Webhooks, with no Amplitude call, "
    "once they are authoritative; else from the user's profile. With `default`, failures become a 200 with "
    "`fallback: true`.",
)  # fmt: skip
def cohort_membership(trace: RequestTrace, args: Mapping[str, Any], cohort_id: str) -> Answer:
    extensions = trace.extensions
    who = trace.subject
    body: dict[str, Any] = {who.id_field: who.value, "cohort_id": cohort_id}
    kept = extensions.cohorts.member(who, cohort_id, trace.deadline) if extensions.cohorts is not None else None
    if kept is not None:
        trace.cache = "webhook"
        age = max(0, int(extensions.clock.time()) - kept.as_of)
        headers = {"X-Cache": "HIT", "Age": str(age), "Cache-Control": "private, max-age=0"}
        return Answer({**body, "member": kept.member, "source": "webhook", "as_of": kept.as_of}, headers)
    try:
        lookup = _lookup(trace, extensions.planner.profile(who))
    except FALLBACK_ERRORS as exc:
        problem = CohortNotKept(cohort_id) if isinstance(exc, ProfileApiUnavailable) else exc
        if args.get("default") is None:
            raise problem from None
        fallback = {"member": args["default"], "source": "default", "fallback": True, "reason": problem.error}
        return _respond({**body, **fallback}, None)
    member = cohort_id in lookup.profile["cohort_ids"]
    return _respond({**body, "member": member, "source": "profile_api"}, lookup)


@route(
    v1, "/predictions/<prediction_id>", summary="Prediction", args=PredictionArgs, response=schemas.PredictionResponse
)
def prediction(trace: RequestTrace, args: Mapping[str, Any], prediction_id: str) -> Answer:
    """A prediction's score or percentile."""
    planner = trace.extensions.planner
    propensity_type = args.get("type") or planner.propensity_type
    lookup = _lookup(trace, planner.prediction(trace.subject, prediction_id, propensity_type))
    value = lookup.profile["predictions"].get(prediction_id)
    body = {
        trace.subject.id_field: trace.subject.value,
        "prediction_id": prediction_id,
        "type": propensity_type,
        "value": value,
    }
    return _respond(body, lookup)


@route(v1, "", summary="Whole profile", response=schemas.ProfileResponse)
def profile(trace: RequestTrace, args: Mapping[str, Any]) -> Answer:
    """Everything kept for the user, in one object."""
    planner = trace.extensions.planner
    lookup = _lookup(trace, planner.whole(trace.subject))
    data = lookup.profile
    recs = data["recommendations"] or {}
    ids = {"user_id": data["user_id"], "device_id": data["device_id"], trace.subject.id_field: trace.subject.value}
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
