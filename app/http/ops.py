"""Routes for operators and tools: liveness, readiness, metrics and the API description."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response

from app.budget import OWN_SHARE, STOPPED
from app.errors import json_response
from app.http import schemas
from app.http.routes import route
from app.http.trace import RequestTrace
from app.observability import ACCESS_LOG

ops = Blueprint("health", __name__)

_NO_STORE = {"Cache-Control": "no-store"}


@route(ops, "/healthz", summary="Liveness", response=schemas.HealthResponse, auth=None)
def healthz(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """The process is alive; no credentials."""
    return json_response({"status": "ok"}, headers=_NO_STORE)


@route(ops, "/readyz", summary="Readiness", response=schemas.ReadyResponse, auth=None)
def readyz(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """Settings, Redis, the shared state file, circuit and how the budget admits; no Amplitude call."""
    extensions = trace.extensions
    checks: dict[str, Any] = {"settings": "ok", "circuit": extensions.breaker.state}
    if not extensions.settings.profile_api:
        checks["profile_api"] = "not_in_region"  # AMPLITUDE_REGION=eu: never called, by design
    status = "ok"
    if extensions.redis is None:
        checks["redis"] = "not_configured"
    elif extensions.redis.ping():
        checks["redis"] = "ok"
    else:
        # Still serving from the local cache and budget share: degraded, not down.
        checks["redis"] = "unavailable"
        status = "degraded"
    state_file = extensions.state_file  # the shared tier, or the machine's file beside Redis
    if state_file is not None:
        # This process's last write to it (at least the heartbeat's, every 1.7 s) tells.
        checks["shared_state"] = "ok" if state_file.writes_ok else "unavailable"
        if not state_file.writes_ok:
            status = "degraded"
    # How this process's budget admits now (app.budget.MODES): cut off, it calls on its share or not at all.
    checks["admission"] = extensions.budget.mode()
    if checks["circuit"] != "closed" or checks["admission"] in (OWN_SHARE, STOPPED):
        status = "degraded"
    return json_response({"status": status, "checks": checks}, headers=_NO_STORE)


@route(ops, "/openapi.json", summary="API description", response=None, auth=None, documented=False)
def openapi(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """The OpenAPI 3 description of this service, built once from its routes and schemas."""
    extensions = trace.extensions
    if extensions.openapi is None:
        from app.http.openapi import build_spec

        extensions.openapi = build_spec()
    return json_response(extensions.openapi, headers={"Cache-Control": "public, max-age=3600"})


@route(ops, "/metrics", summary="Prometheus metrics", response=None, auth="admin", documented=False)
def metrics(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """Prometheus metrics; needs an admin key when ADMIN_API_KEYS is set, else a caller key."""
    extensions = trace.extensions
    # This process's requests so far are counted; the access log (stdout) is never waited on.
    ACCESS_LOG.flush_counts()
    extensions.gauges.publish_for_scrape()
    if extensions.cohorts is not None:
        extensions.cohorts.publish_gauges()
    body, content_type = extensions.metrics.render()
    return Response(body, mimetype=None, content_type=content_type, headers=_NO_STORE)
