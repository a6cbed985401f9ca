"""gunicorn's gthread worker, answering the requests gunicorn refuses itself with JSON.

gunicorn rejects some requests before the app sees them (a raw CR in the request line,
a request line or header over 8,190 bytes, too many headers, a bad HTTP version) and
answers them with an HTML page. This worker keeps gunicorn's judgement (which status,
what it logs) and replaces only the body: the same ``{"error": ..., "message": ...}``
object every other error of the service has. ``gunicorn.conf.py`` names it.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from app.http.arrival import mark_queued

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
