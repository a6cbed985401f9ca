"""Routes for operators and tools: liveness, readiness, metrics and the API description."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app

from app.errors import json_response
from app.http import schemas
from app.http.routes import route
from app.observability import ACCESS_LOG, CIRCUIT_STATES, RequestTrace

ops = Blueprint("health", __name__)

_NO_STORE = {"Cache-Control": "no-store"}


@route(ops, "/healthz", summary="Liveness", response=schemas.HealthResponse, auth=None)
def healthz(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """The process is alive; no credentials."""
    return json_response({"status": "ok"}, headers=_NO_STORE)


@route(ops, "/readyz", summary="Readiness", response=schemas.ReadyResponse, auth=None)
def readyz(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """Settings, Redis, circuit; no Amplitude call."""
    extensions = trace.extensions
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
    return json_response({"status": status, "checks": checks}, headers=_NO_STORE)


@route(ops, "/openapi.json", summary="API description", response=None, auth=None, documented=False)
def openapi(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """The OpenAPI 3 description of this service, built once from its routes and schemas."""
    extensions = trace.extensions
    if extensions.openapi is None:
        from app.http.openapi import build_spec

        extensions.openapi = build_spec(current_app)
    return json_response(extensions.openapi, headers={"Cache-Control": "public, max-age=3600"})


@route(ops, "/metrics", summary="Prometheus metrics", response=None, auth="admin", documented=False)
def metrics(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """Prometheus metrics; needs an admin key when ADMIN_API_KEYS is set, else a caller key."""
    extensions = trace.extensions
    ACCESS_LOG.flush()  # counts queued by this process's requests so far
    metrics = extensions.metrics
    metrics.circuit.set(CIRCUIT_STATES[extensions.breaker.state])
    budget = extensions.budget
    metrics.budget_tokens.set(budget.tokens_left())
    metrics.budget_utilization.set(budget.used() / budget.per_minute)
    answers, failures = extensions.braze_watch.last_minute()
    metrics.braze_answers.set(answers)
    metrics.braze_failures.set(failures)
    metrics.braze_failure_share.set(failures / answers if answers else 0.0)
    redis = extensions.redis
    metrics.redis_up.set(-1 if redis is None else int(redis.healthy))
    body, content_type = metrics.render()
    return Response(body, mimetype=None, content_type=content_type, headers=_NO_STORE)
