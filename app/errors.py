"""One error contract: typed exceptions that know their status, and the JSON handlers."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

#: Headers of every error answer (besides `nosniff` and the request id, which every answer carries).
ERROR_HEADERS = {"Cache-Control": "no-store"}


class ApiError(HTTPException):
    """Root of every error the service answers with; subclasses set status and code.

    Deriving from ``HTTPException`` lets routing-time failures (a bad path segment)
    travel through Flask's own error handling like any other.
    """

    code = 500
    error = "internal_error"
    message = "internal error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.extra = extra
        self.extra_headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, **self.extra}


class InvalidRequest(ApiError):
    code = 400
    error = "invalid_request"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)


class Unauthorized(ApiError):
    code = 401
    error = "unauthorized"
    message = "missing or invalid credentials: send Authorization: Bearer KEY, X-API-Key: KEY or Basic auth"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message, headers={"WWW-Authenticate": 'Basic realm="amplitude-profile-proxy", charset="UTF-8"'}
        )


class Forbidden(ApiError):
    code = 403
    error = "forbidden"
    message = "this address may not call the service"


class UserNotFound(ApiError):
    code = 404
    error = "user_not_found"
    message = "Amplitude has not seen this user or device"


class NoRecommendations(ApiError):
    code = 404
    error = "no_recommendations"
    message = "Amplitude has no recommendations for this user"


class ProfileApiUnavailable(ApiError):
    """``AMPLITUDE_REGION=eu``: the data would need the User Profile API, which does not exist there.

    404, which Braze renders as empty content and neither retries nor counts towards an
    unhealthy host: asking again can never succeed.
    """

    code = 404
    error = "profile_api_unavailable"
    message = (
        "Amplitude's User Profile API does not exist in the EU region (AMPLITUDE_REGION=eu): only the membership "
        "of cohorts kept by Cohort Webhooks can be answered"
    )


class RetryableError(ApiError):
    """An error Braze should retry later: always carries ``Retry-After``."""

    code = 503

    def __init__(self, message: str | None = None, *, retry_after: float = 5.0) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(message, headers={"Retry-After": str(self.retry_after)}, retry_after=self.retry_after)


class UpstreamUnavailable(RetryableError):
    error = "upstream_unavailable"
    message = "Amplitude did not answer usefully in time"


class RateLimited(RetryableError):
    error = "rate_limited"
    message = "the upstream request budget is spent; retry later"


class UpstreamMisconfigured(ApiError):
    code = 502
    error = "upstream_misconfigured"
    message = "Amplitude rejected the service's configuration (secret key or URL); the operator must fix it"


#: The failures a ``default`` fallback may stand in for.
FALLBACK_ERRORS = (UserNotFound, NoRecommendations, RetryableError, UpstreamMisconfigured, ProfileApiUnavailable)

_GENERIC_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise *body* (always an object) with orjson; every answer says ``nosniff``."""
    all_headers = {"X-Content-Type-Options": "nosniff", **headers} if headers else _NOSNIFF
    return Response(orjson.dumps(body), status=status, headers=all_headers, mimetype="application/json")


_NOSNIFF = {"X-Content-Type-Options": "nosniff"}


#: An answer's parts: status, headers, JSON body.
ErrorParts = tuple[int, dict[str, str], dict[str, Any]]


def error_parts(exc: HTTPException) -> ErrorParts:
    """The one error contract: status, headers and JSON body for a typed error or werkzeug's own."""
    if isinstance(exc, ApiError):
        return exc.code or 500, {**ERROR_HEADERS, **exc.extra_headers}, exc.body()
    code = exc.code or 500
    error = _GENERIC_CODES.get(code) or (exc.name or "error").lower().replace(" ", "_")
    headers = dict(ERROR_HEADERS)
    if code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    message = (exc.description or exc.name or "error").split("\n")[0]
    return code, headers, {"error": error, "message": message}


def unexpected_parts(exc: Exception) -> ErrorParts:
    """A 500 for anything unhandled: the trace goes to the log, the caller only learns that something broke."""
    log.exception("unhandled error while serving a request", exc_info=exc)
    return 500, dict(ERROR_HEADERS), {"error": "internal_error", "message": "internal error"}


def render_error(exc: HTTPException) -> Response:
    """The answer for a typed error (or werkzeug's own), as a Flask response."""
    status, headers, body = error_parts(exc)
    return json_response(body, status, headers)


def render_unexpected(exc: Exception) -> Response:
    status, headers, body = unexpected_parts(exc)
    return json_response(body, status, headers)


def register_error_handlers(app: Flask) -> None:
    """Answer every error, Flask's own included, with the JSON contract."""
    app.register_error_handler(HTTPException, render_error)
    app.register_error_handler(Exception, render_unexpected)
