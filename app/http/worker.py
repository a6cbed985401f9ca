"""gunicorn's gthread worker: the edge's answers sent without WSGI, gunicorn's own refusals in JSON.

**Data answers without WSGI.** :class:`app.http.edge.CachedHitEdge` answers an
authenticated, well-formed data request without Flask; even so, a good part of such an
answer's cost was gunicorn's WSGI machinery around the app (the environ, the middleware,
the ``Response`` object, its header checks, the date, two writes). So this worker asks the
edge first, from the request gunicorn has parsed, with only what the edge reads:

- a *kept* answer (the shaped body kept from an earlier answer for the same path and
  query, while its profile is still the one cached and fresh) is written whole, in one
  write, with its new ``Age``, ``Cache-Control`` and ``X-Request-ID``;
- any other answer of the edge (a first answer from a cached profile, a miss with its
  upstream call, a stale entry, a fallback, a typed error) is written in one write too
  when it is a plain answer of known length, else through gunicorn's own ``Response``.

Either way the bytes are those gunicorn writes through WSGI: status line, ``Server``,
``Date``, ``Connection: keep-alive``, the app's headers in order, the body. Everything the
edge leaves to Flask (a bad credential or parameter, another route or method), and any
request with a body, an ``Expect``, a repeated credential or request id, or a connection
about to close, goes through gunicorn's WSGI path unchanged. ``tests/test_worker_answers.py``
compares the two byte for byte.

**Refusals.** gunicorn rejects some requests before the app sees them (a raw CR in the
request line, a request line or header over 8,190 bytes, too many headers, a bad HTTP
version) and answers them with an HTML page. This worker keeps gunicorn's judgement
(which status, what it logs) and replaces only the body: the same ``{"error": ...,
"message": ...}`` object every other error of the service has.

``gunicorn.conf.py`` names this worker class.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import orjson
from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http.message import TOKEN_RE
from gunicorn.workers.gthread import ThreadWorker

from app.http.arrival import ARRIVAL_KEY, mark_queued

#: Status gunicorn chose → the error code and message the caller gets. The messages are
#: fixed: gunicorn's own text can quote the refused request, credentials included.
REFUSALS: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "the request is not valid HTTP/1.1 (request line, method, version or a header)"),
    403: ("forbidden", "request forbidden"),
    414: ("request_line_too_long", "the request line is longer than the server accepts (8,190 bytes)"),
    417: ("expectation_failed", "the Expect header asks for something the server does not do"),
    431: ("headers_too_large", "a request header is longer than 8,190 bytes, or there are too many headers"),
    500: ("internal_error", "internal error"),
    501: ("not_implemented", "the request uses a transfer coding the server does not implement"),
}
_FALLBACK = ("invalid_request", "the request was refused before it reached the service")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)")


def refusal_response(status: int, reason: str) -> bytes:
    """The whole HTTP response for a request gunicorn refused with *status*."""
    error, message = REFUSALS.get(status, _FALLBACK)
    body = orjson.dumps({"error": error, "message": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


#: The request headers a kept answer depends on, as gunicorn's parser names them, and the
#: WSGI environ keys gunicorn would give them.
_READS = {
    "AUTHORIZATION": "HTTP_AUTHORIZATION",
    "X-API-KEY": "HTTP_X_API_KEY",
    "X-REQUEST-ID": "HTTP_X_REQUEST_ID",
    "X-REQUEST-START": "HTTP_X_REQUEST_START",
}
#: Headers that make a request gunicorn's and the app's to answer: a body, an expectation,
#: a path prefix (gunicorn reads ``SCRIPT_NAME`` from a header).
_DECLINES = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING", "EXPECT", "SCRIPT_NAME"})
#: An answer of the edge: status, headers, body, whether it is a kept answer.
Answer = tuple[str, list[tuple[str, str]], list[bytes], bool]
#: gunicorn's check of a WSGI status line.
_STATUS = wsgi.STATUS_RE
#: A raw path the service routes as it is (RawPathMiddleware re-encodes anything else).
_PLAIN_PATH = re.compile(r"/v1/[\x21-\x7e]*")


class EdgeAnswers:
    """The service's edge, asked by the worker from the request gunicorn has parsed.

    :meth:`environ` holds what the edge reads (or None for a request gunicorn and the app
    must see whole); :meth:`answer` is the edge's answer; :meth:`whole` the bytes gunicorn
    writes for it through WSGI (status line, ``Server``, ``Date``, ``Connection:
    keep-alive``, the app's headers in order, the body); :meth:`send` writes any other
    answer through gunicorn's own ``Response``.
    """

    def __init__(self, edge: Any) -> None:
        self._edge = edge
        self._date: tuple[int, str] = (0, "")
        # Answers sent without WSGI, kept or not (approximate under threads: for tests and curiosity).
        self.kept_sent = 0
        self.answers_sent = 0

    def environ(self, req: Any, client: Any) -> dict[str, Any] | None:
        """The edge's view of *req*, or None when it is not a plain GET of a data route."""
        if req.method != "GET" or req.version != (1, 1) or req.should_close() or req._expected_100_continue:
            return None
        path = req.uri.split("?", 1)[0].split("#", 1)[0]
        if not _PLAIN_PATH.fullmatch(path) or "://" in path:
            return None
        if isinstance(client, tuple):
            address = client[0]
        else:
            address = client.decode() if isinstance(client, bytes) else client
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": req.query, "REMOTE_ADDR": address}
        for name, value in req.headers:
            key = _READS.get(name)
            if key is not None:
                if key in environ:
                    return None  # repeated: gunicorn joins the values, the app then judges them
                environ[key] = value
            elif name in _DECLINES:
                return None
        environ[ARRIVAL_KEY] = self._edge.arrival(environ)
        return environ

    def answer(self, environ: dict[str, Any]) -> Answer | None:
        """The edge's answer (counted and logged as sent), its body read whole."""
        answer = self._edge.answer(environ)
        if answer is None:
            return None
        status, headers, body, kept = answer
        try:
            chunks = list(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if kept:
            self.kept_sent += 1
        else:
            self.answers_sent += 1
        return status, headers, chunks, kept

    def whole(self, answer: Answer) -> bytes | None:
        """*answer* as the bytes gunicorn writes for it, or None for anything but a plain answer
        of known length (gunicorn's own ``Response`` then writes it: :meth:`send`)."""
        status, headers, chunks, kept = answer
        if kept:  # the edge's fixed headers, Content-Length included: nothing to check
            lines = [f"{name}: {value}\r\n" for name, value in headers]
            body = chunks[0]
        else:
            checked = self._checked(status, headers, chunks)
            if checked is None:
                return None
            lines, body = checked
        head = f"HTTP/1.1 {status}\r\nServer: {wsgi.SERVER}\r\nDate: {self._http_date()}\r\nConnection: keep-alive\r\n"
        return f"{head}{''.join(lines)}\r\n".encode("latin-1") + body

    @staticmethod
    def _checked(status: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> tuple[list[str], bytes] | None:
        """Header lines and body as gunicorn would send them, if they pass its checks and the
        body has a known length (it is then not chunked, and the connection stays open)."""
        if not _STATUS.fullmatch(status) or status[:3] in ("204", "304"):
            return None
        length = None
        lines = []
        for name, value in headers:
            if not TOKEN_RE.fullmatch(name) or not wsgi.HEADER_VALUE_RE.fullmatch(value) or util.is_hoppish(name):
                return None
            value = value.strip(" \t")
            if name.lower() == "content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            lines.append(f"{name}: {value}\r\n")
        body = b"".join(chunks)
        if length is None or len(body) != length:
            return None
        return lines, body

    @staticmethod
    def send(answer: Answer, req: Any, sock: Any, cfg: Any) -> bool:
        """Write *answer* through gunicorn's ``Response``, as its WSGI path would; whether the
        connection stays open."""
        status, headers, chunks, _ = answer
        resp = wsgi.Response(req, sock, cfg)
        resp.start_response(status, headers)
        for chunk in chunks:
            resp.write(chunk)
        resp.close()
        return not resp.should_close()

    def _http_date(self) -> str:
        """gunicorn's ``Date`` value, formatted once a second."""
        now = int(time.time())
        date = self._date
        if date[0] != now:
            date = self._date = (now, util.http_date(now))
        return date[1]


def edge_answers_for(app: Any, cfg: Any) -> EdgeAnswers | None:
    """The edge of the service *app* under gunicorn's *cfg*, or None where its answers cannot
    be sent exactly as the WSGI path would send them: another app (the benchmark's bare
    Flask), the edge switched off, keep-alive off, a ``SCRIPT_NAME``, gunicorn's own access
    log or a ``post_request`` hook (both want the WSGI environ and response).
    """
    extensions = getattr(app, "extensions", None)
    edge = getattr(extensions.get("profile_proxy"), "edge", None) if isinstance(extensions, dict) else None
    if edge is None or not cfg.keepalive or os.environ.get("SCRIPT_NAME"):
        return None
    if cfg.accesslog or cfg.logconfig or cfg.logconfig_dict or cfg.logconfig_json or cfg.syslog:
        return None
    hook = cfg.settings["post_request"]
    if hook.value is not hook.default:
        return None
    return EdgeAnswers(edge)


class _Capture:
    """Stands in for the client socket while gunicorn writes its HTML page, keeping the bytes."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.written = bytearray()

    def gettimeout(self) -> float | None:
        return 0.0  # "already non-blocking": gunicorn then writes without toggling anything

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.written += data

    def send(self, data: bytes) -> int:
        self.written += data
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class JsonErrorThreadWorker(ThreadWorker):
    """``gthread`` with JSON bodies on the errors gunicorn answers itself, and a stamp of
    when each request was queued for a thread (the service's deadline counts from then)."""

    edge: EdgeAnswers | None = None

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.edge = edge_answers_for(self.wsgi, self.cfg)

    def handle_request(self, req: Any, conn: Any) -> bool:
        edge = self.edge
        if (
            edge is not None
            and self.alive
            and self.nr + 1 < self.max_requests
            and len(self.keepalived_conns) < self.max_keepalived
        ):
            environ = edge.environ(req, conn.client)
            if environ is not None:
                answer = edge.answer(environ)
                if answer is not None:
                    self.cfg.pre_request(self, req)
                    self.nr += 1
                    whole = edge.whole(answer)
                    if whole is None:
                        return edge.send(answer, req, conn.sock, self.cfg)
                    util.write(conn.sock, whole)
                    return True
        return bool(super().handle_request(req, conn))

    def enqueue_req(self, conn: Any) -> None:
        conn.queued_at = time.monotonic()
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        mark_queued(getattr(conn, "queued_at", None))
        return super().handle(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        capture = _Capture(client)
        # gunicorn decides the status and logs the refusal; only its page is replaced.
        super().handle_error(req, capture, addr, exc)
        match = _STATUS_LINE.match(bytes(capture.written))
        if match is None:
            return
        status = int(match.group(1))
        reason = match.group(2).decode("latin-1", "replace").strip() or "Error"
        try:
            util.write_nonblock(client, refusal_response(status, reason))
        except Exception:
            self.log.debug("Failed to send error message.")
