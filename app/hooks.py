"""What happens around every request: the network gate, caller keys, logs, metrics, headers."""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any

from flask import Flask, Response, current_app, g, request

from app.auth import CallerKeys, presented_key
from app.errors import Forbidden, RetryableError, Unauthorized
from app.observability import RequestTrace, log_request, request_id_from

log = logging.getLogger(__name__)

#: Probes come from load balancers and orchestrators, inside the network.
UNGATED_PATHS = frozenset({"/healthz", "/readyz"})


class TooManyAuthFailures(RetryableError):
    code = 429
    error = "too_many_auth_failures"
    message = "too many failed authentications from this address; retry later"


def authenticate(keys: CallerKeys, kind: str = "caller") -> str:
    """Return the name of the key the request presents, braking repeated failures per address.

    :raises Unauthorized: no key, or no key that matches.
    :raises TooManyAuthFailures: this address keeps failing.
    """
    extensions = current_app.extensions["profile_proxy"]
    presented = presented_key(request.headers)
    name = keys.identify(presented) if presented else None
    if name is not None:
        return name
    address = request.remote_addr or "unknown"
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


def _begin(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Start the trace and apply the network allowlist, before any other work."""
    extensions = current_app.extensions["profile_proxy"]
    environ = request.environ
    arrival = environ.get("profile_proxy.arrival") or time.monotonic()
    trace = RequestTrace(request_id_from(environ.get("HTTP_X_REQUEST_ID")), arrival, extensions)
    trace.raw_query = environ.get("QUERY_STRING", "")
    g.trace = trace
    if extensions.allowlist and request.path not in UNGATED_PATHS:
        if not extensions.allowlist.allows(request.remote_addr):
            raise Forbidden()


def _finish(response: Response) -> Response:
    trace: RequestTrace | None = g.get("trace")
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    if trace is None:
        return response
    headers["X-Request-ID"] = trace.request_id
    extensions = trace.extensions
    rule = request.url_rule
    route = route_template(rule.rule if rule is not None else "unmatched")
    status = response.status_code
    settings = extensions.settings
    identity = trace.identity
    user = identity.value if identity is not None and settings.log_user_ids else None
    log_request(trace, request.method, route, status, user, extensions.metrics, settings.access_log)
    return response


def register_request_hooks(app: Flask) -> None:
    app.url_value_preprocessor(_begin)
    app.after_request(_finish)
