"""The data routes as one small WSGI app: the gate, the route's view, and the answer, without Flask.

Every request for ``/v1/users/...`` or ``/v1/devices/...`` is answered here, and only
here; anything else goes on to Flask (the operators' routes, the webhooks, the preview
page). A data answer is mostly bookkeeping around a cached profile, and Flask's per-request
machinery (request context, hooks, its ``Response`` object) cost as much as all of it:
here a request is matched against the rules the routes declare in :mod:`app.http.views`
(:meth:`app.http.routes.RouteTable.match`), passes the same gate as Flask's routes (:mod:`app.http.gate`),
runs the route's view, and is answered with the same JSON error contract
(:func:`app.errors.error_parts`), headers, access line and metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from werkzeug.exceptions import HTTPException

from app.errors import error_parts, unexpected_parts
from app.http.gate import account, check, check_address, common_headers, start_trace
from app.http.routes import Answer, RouteTable, query_args

if TYPE_CHECKING:
    from app.extensions import ProxyExtensions

WSGIApp = Any

#: Where the data routes live: every path under these is answered here, matched or not.
DATA_PREFIXES = ("/v1/users/", "/v1/devices/")

_REASONS = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


class DataRoutes:
    """Answer the routes of *table* (a request under ``DATA_PREFIXES``); pass the rest to *app*."""

    def __init__(self, table: RouteTable, extensions: ProxyExtensions, app: WSGIApp) -> None:
        self.table = table
        self.extensions = extensions
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(DATA_PREFIXES):
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        method = environ.get("REQUEST_METHOD", "GET")
        trace = start_trace(self.extensions, environ)
        rule = "unmatched"
        try:
            check_address(trace, environ, None)
            spec, values = self.table.match(path, method)
            rule = spec.rule
            check(trace, environ, spec, values)
            answer: Answer = spec.view(trace, query_args(spec.args, trace.raw_query), **values)  # type: ignore[misc]
            status, headers, body = 200, answer.headers, answer.body
        except HTTPException as exc:  # the typed errors, and routing's 404 and 405
            status, headers, body = error_parts(exc)
        except Exception as exc:  # logged; the caller learns only that something broke
            status, headers, body = unexpected_parts(exc)
        payload = orjson.dumps(body)
        start_response(
            _REASONS.get(status) or str(status),
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                *headers.items(),
                *common_headers(trace),
            ],
        )
        account(trace, status, method, rule)
        return [] if method == "HEAD" else [payload]
