"""The gate every request passes first, and the bookkeeping when it leaves.

One step, in this order, before any other work: start the request's trace and its
deadline, apply the network allowlist, check the credentials the route declares
(braking repeated failures per address), and decode every path value. The data routes
(:class:`app.http.data.DataRoutes`) and the routes Flask serves (:func:`register_gate`)
call the same functions; each reads the WSGI environ directly.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, g, request

from app.clock import Deadline
from app.core.query import KINDS, Identity
from app.errors import Forbidden, InvalidRequest, RetryableError, Unauthorized
from app.http.arrival import ARRIVAL_KEY
from app.http.auth import CallerKeys, presented_key
from app.http.params import MAX_QUERY_BYTES, decode_segment
from app.http.routes import ROUTES, RouteSpec
from app.http.trace import RequestTrace
from app.observability import log_request, request_id_from

if TYPE_CHECKING:
    from app.extensions import ProxyExtensions

log = logging.getLogger(__name__)

#: Probes come from load balancers and orchestrators, inside the network.
UNGATED_PATHS = frozenset({"/healthz", "/readyz"})

#: Room left after the lookup for shaping and writing the response.
RESPONSE_MARGIN_SECONDS = 0.05


class TooManyAuthFailures(RetryableError):
    code = 429
    error = "too_many_auth_failures"
    message = "too many failed authentications from this address; retry later"


def authenticate(extensions: ProxyExtensions, environ: dict[str, Any], keys: CallerKeys, kind: str = "caller") -> str:
    """Return the name of the key the request presents, braking repeated failures per address.

    :raises Unauthorized: no key, or no key that matches.
    :raises TooManyAuthFailures: this address keeps failing.
    """
    presented = presented_key(environ.get("HTTP_X_API_KEY"), environ.get("HTTP_AUTHORIZATION"))
    name = keys.identify(presented) if presented else None
    if name is not None:
        return name
    address = environ.get("REMOTE_ADDR") or "unknown"
    if extensions.failure_brake.blocked(address):
        extensions.metrics.auth_failures.labels("braked").inc()
        raise TooManyAuthFailures(retry_after=extensions.failure_brake.window)
    reason = "invalid" if presented else "missing"
    failures = extensions.failure_brake.record_failure(address)
    extensions.metrics.auth_failures.labels(reason).inc()
    # The presented value is never logged: it may be a real key sent to the wrong place.
    log.warning("%s authentication failed (%s key) from %s, %d in the last minute", kind, reason, address, failures)
    raise Unauthorized()


@functools.lru_cache(maxsize=64)
def route_template(rule: str) -> str:
    """``/v1/<any(users, devices):kind>/<id>`` as ``/v1/{kind}/{id}``: no user id in logs or labels."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def start_trace(extensions: ProxyExtensions, environ: dict[str, Any]) -> RequestTrace:
    """The request's trace: its id, arrival (the front's stamp, else now) and deadline."""
    settings = extensions.settings
    clock = extensions.clock
    arrival = environ.get(ARRIVAL_KEY)
    if arrival is None:
        arrival = clock.monotonic()
    return RequestTrace(
        request_id_from(environ.get("HTTP_X_REQUEST_ID")),
        arrival,
        extensions,
        Deadline.after(clock, settings.request_deadline_seconds - RESPONSE_MARGIN_SECONDS, arrival),
        raw_query=environ.get("QUERY_STRING", ""),
        queue_ms=max(0.0, clock.monotonic() - arrival) * 1000,
    )


def check_address(trace: RequestTrace, environ: dict[str, Any], spec: RouteSpec | None) -> None:
    """The allowlist, before anything else (unknown routes included): probes and webhooks pass.

    :raises Forbidden: the caller's address is outside ``ALLOWED_CIDRS``.
    """
    allowlist = trace.extensions.allowlist
    if not allowlist:
        return
    if environ.get("PATH_INFO") in UNGATED_PATHS or (spec is not None and spec.auth == "webhook"):
        return
    if not allowlist.allows(environ.get("REMOTE_ADDR")):
        raise Forbidden()


def check(trace: RequestTrace, environ: dict[str, Any], spec: RouteSpec, values: dict[str, Any] | None) -> None:
    """The credentials the route declares, then every path value decoded and checked.

    :raises ApiError: 401, 403 or 429 for the credentials, 400 for a path value or the query's size.
    """
    if spec.auth is None or spec.auth == "webhook":
        return
    extensions = trace.extensions
    if spec.auth == "operator" and not extensions.admin_keys:
        raise Forbidden("this action needs an admin key: set ADMIN_API_KEYS")
    if spec.auth in ("admin", "operator") and extensions.admin_keys:
        trace.caller = authenticate(extensions, environ, extensions.admin_keys, kind="admin")
    elif extensions.caller_keys:
        trace.caller = authenticate(extensions, environ, extensions.caller_keys)
    else:
        trace.caller = "open"
    if values:
        decode_path_values(trace, values)
    if len(trace.raw_query) > MAX_QUERY_BYTES:
        raise InvalidRequest("query", f"must be at most {MAX_QUERY_BYTES} bytes")


def decode_path_values(trace: RequestTrace, values: dict[str, Any]) -> None:
    """Decode and check every path value once; ``kind`` and ``id`` become the trace's identity."""
    if "kind" in values:
        id_field = KINDS[values.pop("kind")]
        trace.identity = Identity(id_field, decode_segment(id_field, values.pop("id")))
    for name, raw in values.items():
        values[name] = decode_segment(name, raw)


def common_headers(trace: RequestTrace) -> tuple[tuple[str, str], ...]:
    """Headers every answer carries, data or not, success or error."""
    return (("X-Content-Type-Options", "nosniff"), ("X-Request-ID", trace.request_id))


def account(trace: RequestTrace, status: int, method: str, rule: str) -> None:
    """What every answer counts for on its way out: Braze's view, log line, metrics."""
    extensions = trace.extensions
    extensions.braze_watch.record(status)
    settings = extensions.settings
    identity = trace.identity
    user = identity.value if identity is not None and settings.log_user_ids else None
    clock = extensions.clock
    log_request(
        trace, method, route_template(rule), status, user, extensions.metrics, settings.access_log,
        at=clock.time(), now=clock.monotonic(),
    )  # fmt: skip


def register_gate(app: Flask) -> None:
    """The same gate and bookkeeping for the routes Flask serves (the operators' and webhooks')."""

    def admit(endpoint: str | None, values: dict[str, Any] | None) -> None:
        environ = request.environ
        trace = g.trace = start_trace(current_app.extensions["profile_proxy"], environ)
        spec = ROUTES.get(endpoint or "")
        check_address(trace, environ, spec)
        if spec is not None:
            check(trace, environ, spec, values)

    def finish(response: Response) -> Response:
        trace: RequestTrace | None = g.get("trace")
        headers = response.headers
        if trace is None:  # refused before the gate (an unreadable request): still nosniff
            headers["X-Content-Type-Options"] = "nosniff"
            return response
        for name, value in common_headers(trace):
            headers[name] = value
        rule = request.url_rule
        account(trace, response.status_code, request.method, rule.rule if rule is not None else "unmatched")
        return response

    app.url_value_preprocessor(admit)
    app.after_request(finish)
