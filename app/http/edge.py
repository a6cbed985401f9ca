"""Data answers at the WSGI edge, before Flask's dispatch.

Most of a cached answer's cost is Flask's request machinery, not the work: find the
route, check the caller key, look up the cached profile, shape a small object. This
middleware does exactly that with the same pieces Flask's path uses (the URL map, the
caller keys, the query schemas, the route's own view function, the same headers, access
line and metrics). Once a request has passed every check Flask's gate would make, its
lookup runs here too, whatever it finds: a fresh hit, or a miss, a stale or not-found
entry with its upstream call, and the typed error or fallback the view answers (a miss
spends most of its CPU holding the GIL, and Flask's machinery was a fifth of it).
Everything else goes to Flask unchanged: a bad credential, a bad parameter, any method
but GET, any path the map does not match, an unexpected exception before the lookup. An
answer is byte for byte what Flask would have sent (``tests/test_edge.py`` compares the two).

The shaped answer is kept per (path, query) with the cache entry it came from: while
that entry is the one in the cache and still fresh, the next hit reuses the body and
only its ``Age``, ``Cache-Control`` and ``X-Request-ID`` are new. Under gunicorn, the
service's worker (:mod:`app.http.worker`) asks :meth:`CachedHitEdge.answer` before it
even builds the WSGI environ, and sends what it answers itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache
from flask import Flask
from werkzeug.exceptions import HTTPException

from app.clock import Deadline
from app.errors import ApiError, render_error, render_unexpected
from app.http.arrival import ARRIVAL_KEY, ArrivalStamp
from app.http.auth import presented_key
from app.http.gate import RESPONSE_MARGIN_SECONDS, account, decode_path_values
from app.http.params import MAX_QUERY_BYTES
from app.http.routes import ROUTES, query_args
from app.lookup import NotCached, last_cached
from app.observability import RequestTrace, request_id_from

WSGIApp = Any

#: Bytes of shaped answers kept (their bodies and about 200 bytes of bookkeeping each): the
#: hot set of (path, query) pairs, a few thousand users' worth, bounded per process.
SHAPED_BYTES = 8 * 1024 * 1024
#: Larger answers (the whole profile) are shaped again each time: keeping them would cost
#: as much memory as the cached profiles themselves, and shaping is a small part of them.
SHAPED_MAX_BODY = 1024


@dataclass(frozen=True, slots=True)
class _Shaped:
    """One hit's answer, and the cache entry version it was shaped from."""

    cache_key: str
    fetched_at: float
    rule: str
    identity: Any
    body: bytes
    length: str


class CachedHitEdge:
    """Answer a fresh, authenticated, well-formed cache hit without Flask; pass the rest on."""

    def __init__(self, app: WSGIApp, flask_app: Flask, arrival: ArrivalStamp) -> None:
        self.app = app
        self.extensions = flask_app.extensions["profile_proxy"]
        self.arrival = arrival
        settings = self.extensions.settings
        # The allowlist reads REMOTE_ADDR, which TrustedForwardedFor may replace first.
        self._forwarded_client = bool(settings.trusted_proxy_count and settings.allowed_cidrs)
        # Routing only (no host matching is configured): the same rules Flask matches.
        self.adapter = flask_app.url_map.bind("localhost")
        self._shaped: LRUCache[tuple[str, str], _Shaped] = LRUCache(
            maxsize=SHAPED_BYTES, getsizeof=lambda shaped: len(shaped.body) + 200
        )
        self._lock = threading.Lock()
        self.answered = 0  # hits answered here (approximate under threads: for tests and curiosity)
        self.extensions.edge = self

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "GET" and environ.get("PATH_INFO", "").startswith("/v1/"):
            try:
                answer = self._answer(environ, start_response)
            except (NotCached, HTTPException):
                answer = None  # not a plain hit: Flask answers it, errors and all
            except Exception:  # anything unexpected is Flask's to answer (and log)
                answer = None
            if answer is not None:
                self.answered += 1
                return answer
        return self.app(environ, start_response)

    def answer(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], Iterable[bytes], bool] | None:
        """What the edge answers for a GET whose *environ* holds only what the edge reads (the
        raw ``PATH_INFO``, ``QUERY_STRING``, ``REMOTE_ADDR``, the credential, ``X-Request-ID``,
        ``X-Request-Start`` and the arrival time): status, headers, body, and whether it is a
        kept answer (its headers the fixed ones of :meth:`_reuse`), counted and logged as sent;
        else None, with nothing changed, and the request is Flask's.
        :class:`app.http.worker.JsonErrorThreadWorker` calls it before gunicorn builds the WSGI
        environ, and sends the answer as gunicorn would have.
        """
        if self._forwarded_client:
            return None  # REMOTE_ADDR would first have to come from X-Forwarded-For
        try:
            admitted = self._admitted(environ)
            if admitted is None:
                return None
            kept = self._kept(environ, *admitted)
            if kept is not None:
                self.answered += 1
                return "200 OK", kept[0], [kept[1]], True
            started: list[tuple[str, list[tuple[str, str]]]] = []
            caller, raw_query = admitted
            body = self._shape(
                (environ["PATH_INFO"], raw_query),
                environ,
                lambda status, headers, exc_info=None: started.append((status, headers)),
                caller,
                raw_query,
            )
        except Exception:  # not a plain answer (NotCached, HTTPException, anything): Flask's
            return None
        if body is None or not started:
            return None
        self.answered += 1
        status, headers = started[0]
        return status, headers, body, False

    def _admitted(self, environ: dict[str, Any]) -> tuple[str, str] | None:
        """The caller key's name and the raw query, or None when Flask must answer (and count)."""
        raw_query = environ.get("QUERY_STRING", "")
        if len(raw_query) > MAX_QUERY_BYTES:
            return None
        caller = self._caller(environ)
        return None if caller is None else (caller, raw_query)

    def _kept(self, environ: dict[str, Any], caller: str, raw_query: str) -> tuple[list[tuple[str, str]], bytes] | None:
        """The kept answer for the request's path and query, if there is one and it still holds."""
        with self._lock:
            shaped = self._shaped.get((environ["PATH_INFO"], raw_query))
        return None if shaped is None else self._reuse(shaped, environ, caller, raw_query)

    def _caller(self, environ: dict[str, Any]) -> str | None:
        """The caller key's name, or None when Flask must refuse (and count) the request."""
        extensions = self.extensions
        if extensions.allowlist and not extensions.allowlist.allows(environ.get("REMOTE_ADDR")):
            return None
        if not extensions.caller_keys:
            return "open"
        presented = presented_key(environ.get("HTTP_X_API_KEY"), environ.get("HTTP_AUTHORIZATION"))
        return extensions.caller_keys.identify(presented) if presented else None

    def _trace(self, environ: dict[str, Any], caller: str, raw_query: str) -> RequestTrace:
        extensions = self.extensions
        arrival = environ.get(ARRIVAL_KEY)
        if arrival is None:
            arrival = extensions.clock.monotonic()
        trace = RequestTrace(request_id_from(environ.get("HTTP_X_REQUEST_ID")), arrival, extensions)
        trace.raw_query = raw_query
        trace.caller = caller
        trace.queue_ms = max(0.0, extensions.clock.monotonic() - arrival) * 1000
        trace.deadline = None  # the views read this as "this process's cache, or nothing"
        return trace

    def _answer(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes] | None:
        admitted = self._admitted(environ)
        if admitted is None:
            return None
        kept = self._kept(environ, *admitted)
        if kept is not None:
            start_response("200 OK", kept[0])
            return [kept[1]]
        caller, raw_query = admitted
        return self._shape((environ["PATH_INFO"], raw_query), environ, start_response, caller, raw_query)

    def _reuse(
        self, shaped: _Shaped, environ: dict[str, Any], caller: str, raw_query: str
    ) -> tuple[list[tuple[str, str]], bytes] | None:
        """The kept answer's headers and body, if its cache entry is still the one cached and
        still fresh (counted and logged as sent); else None, with nothing changed."""
        extensions = self.extensions
        entry = extensions.cache.local_entry(shaped.cache_key)
        if entry is None or entry.fetched_at != shaped.fetched_at:
            return None
        freshness = extensions.cache.freshness
        now = extensions.clock.time()
        fresh_for = freshness.fresh_until(entry) - now
        if fresh_for <= 0:
            return None
        trace = self._trace(environ, caller, raw_query)
        trace.identity = shaped.identity
        trace.cache = "hit"
        headers = [
            ("X-Content-Type-Options", "nosniff"),
            ("X-Cache", "HIT"),
            ("Age", str(int(max(0.0, now - entry.fetched_at)))),
            ("Cache-Control", f"private, max-age={int(fresh_for)}"),
            ("Content-Type", "application/json"),
            ("Content-Length", shaped.length),
            ("X-Request-ID", trace.request_id),
        ]
        account(trace, 200, "GET", shaped.rule)
        return headers, shaped.body

    def _shape(
        self, key: tuple[str, str], environ: dict[str, Any], start_response: Any, caller: str, raw_query: str
    ) -> Iterable[bytes] | None:
        """Run the route's own view: on the cached profile, else with the full lookup."""
        rule, values = self.adapter.match(environ["PATH_INFO"], method="GET", return_rule=True)
        spec = ROUTES.get(rule.endpoint)
        if spec is None or spec.view is None or not spec.serves_data:
            return None
        trace = self._trace(environ, caller, raw_query)
        values = dict(values)
        decode_path_values(trace, values)
        args = query_args(spec.args, raw_query)
        last_cached.entry = None
        try:
            response = spec.view(trace, args, **values)
        except NotCached:
            # Past every check of Flask's gate: the lookup, with the deadline the gate would set.
            extensions = self.extensions
            seconds = extensions.settings.request_deadline_seconds - RESPONSE_MARGIN_SECONDS
            trace.deadline = Deadline.after(extensions.clock, seconds, trace.started)
            try:
                response = spec.view(trace, args, **values)
            except ApiError as exc:
                response = render_error(exc)
            except Exception as exc:  # as Flask's handler would: asking Flask again could call Amplitude twice
                response = render_unexpected(exc)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Request-ID"] = trace.request_id
        account(trace, response.status_code, "GET", rule.rule)
        source = last_cached.entry
        if source is not None and response.status_code == 200 and response.headers.get("X-Cache") == "HIT":
            body = response.get_data()
            if len(body) > SHAPED_MAX_BODY:
                return response(environ, start_response)  # type: ignore[no-any-return]
            with self._lock:
                self._shaped[key] = _Shaped(source[0], source[1], rule.rule, trace.identity, body, str(len(body)))
        return response(environ, start_response)  # type: ignore[no-any-return]
