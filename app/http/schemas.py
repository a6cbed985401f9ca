"""Marshmallow schemas of the response bodies, the source of the OpenAPI description.

The views build bodies as plain dicts (no per-request dump, which would cost more than
the rest of a cache hit); these schemas describe the same shapes, and the OpenAPI test
and the schemathesis run check the two agree.
"""

from __future__ import annotations

from marshmallow import Schema, fields


class _Identity(Schema):
    user_id = fields.String(metadata={"description": "The user id asked for (`users` routes)."})
    device_id = fields.String(metadata={"description": "The device id asked for (`devices` routes)."})


class RecommendationOut(Schema):
    rec_id = fields.String(required=True)
    items = fields.List(fields.Raw(), required=True, metadata={"description": "Item ids, after `limit`."})
    count = fields.Integer(required=True)
    is_control = fields.Boolean(
        required=True, metadata={"description": "In the control group: show the default experience."}
    )
    source = fields.String(required=True, allow_none=True, metadata={"description": "recommendation_source"})
    last_updated = fields.Integer(required=True, allow_none=True, metadata={"description": "Epoch seconds."})
    fallback = fields.Boolean(required=True, metadata={"description": "True when `items` are the `default` ids."})
    reason = fields.String(metadata={"description": "Why the fallback was served (only with fallback)."})


class RecommendationResponse(_Identity, RecommendationOut):
    pass


class RecommendationListResponse(_Identity):
    recommendations = fields.Dict(keys=fields.String(), values=fields.Nested(RecommendationOut), required=True)


class PropertiesResponse(_Identity):
    properties = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True), required=True)


class PropertyResponse(_Identity):
    name = fields.String(required=True)
    value = fields.Raw(required=True, allow_none=True)


class CohortsResponse(_Identity):
    cohort_ids = fields.List(fields.Raw(), required=True)
    count = fields.Integer(required=True)
    source = fields.String(required=True, metadata={"description": "`profile_api`: Amplitude's User Profile API."})


class CohortMembershipResponse(_Identity):
    cohort_id = fields.String(required=True)
    member = fields.Boolean(required=True)
    source = fields.String(
        required=True,
        metadata={
            "enum": ["webhook", "profile_api", "default"],
            "description": "`webhook`: the cohort's Cohort Webhooks (no Amplitude call); `profile_api`: the user's "
            "profile; `default`: the URL's `default`, because neither could answer.",
        },
    )
    as_of = fields.Integer(
        metadata={"description": "With `webhook`: the `computed_time` (epoch seconds) of the last batch applied."}
    )
    fallback = fields.Boolean(metadata={"description": "True when `member` is the URL's `default`."})
    reason = fields.String(metadata={"description": "Why the default was served (only with fallback)."})


class PredictionResponse(_Identity):
    prediction_id = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": ["score", "pct"]})
    value = fields.Float(required=True, allow_none=True)


class PredictionValue(Schema):
    type = fields.String(required=True)
    value = fields.Float(required=True, allow_none=True)


class ProfileResponse(Schema):
    user_id = fields.String(required=True, allow_none=True)
    device_id = fields.String(required=True, allow_none=True)
    properties = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True), required=True)
    cohort_ids = fields.List(fields.Raw(), required=True)
    recommendations = fields.Dict(keys=fields.String(), values=fields.Nested(RecommendationOut), required=True)
    predictions = fields.Dict(keys=fields.String(), values=fields.Nested(PredictionValue), required=True)


class HealthResponse(Schema):
    status = fields.String(required=True)


class ReadyResponse(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "degraded"]})
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class ErrorResponse(Schema):
    error = fields.String(required=True, metadata={"description": "A stable error code."})
    message = fields.String(required=True)
    field = fields.String(metadata={"description": "The invalid parameter (invalid_request only)."})
    retry_after = fields.Integer(metadata={"description": "Seconds, as in the Retry-After header."})


class CohortReceipt(Schema):
    queued = fields.Boolean(
        required=True, metadata={"description": "False when the batch repeats one already queued (a retry)."}
    )
    message_id = fields.String(required=True)


class CohortStatusOut(Schema):
    cohort_id = fields.String(required=True)
    name = fields.String(required=True, allow_none=True)
    authoritative = fields.Boolean(required=True, metadata={"description": "Answered from the webhooks alone."})
    status = fields.String(required=True)
    reason = fields.String(required=True)
    members = fields.Integer(required=True)
    last_computed_time = fields.Integer(required=True, allow_none=True)
    last_batch_age = fields.Float(required=True, allow_none=True, metadata={"description": "Seconds."})
    queued = fields.Integer(required=True)
    realtime = fields.Boolean(required=True)
    silent = fields.Boolean(required=True)


class CohortStoreResponse(Schema):
    store = fields.String(required=True, metadata={"description": "redis, sqlite or process."})
    opened = fields.Boolean(required=True)
    cohorts = fields.List(fields.Nested(CohortStatusOut), required=True)
