"""Many requests at once from one thread: a stampede whose client costs little CPU.

A thread per request (``requests`` in a pool) spends more CPU per request than the service
it measures, on the same two cores: a stampede test would then measure its own client.
Here every request has its own connection, all are written at once and read as the
answers come, on one thread with a selector. HTTP/1.1 answers with a Content-Length only
(the service sends nothing else).

The connections are opened first; then the requests are written one after another,
reading between writes whatever answers have already come, so an early answer's time is
not stretched by the writes after it. Each answer's time runs from its own request's
write to its last byte; bodies are decoded only once every answer is in.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

#: :attr:`NoAnswer.reason` of a request whose answer was not whole within the burst's timeout.
TIMEOUT = "timeout"
#: :attr:`NoAnswer.reason` of a connection the server closed before the whole answer.
CLOSED = "closed"
#: Requests written between two looks at the answers already come.
_WRITES_PER_READ = 16


@dataclass(frozen=True)
class Answer:
    """One answer: status, headers (lower-case names), the JSON body, seconds from sending to the last byte.

    The body is the decoded JSON, ``None`` when empty, or the text when it is not JSON.
    *sent_at* is the request's writing on :func:`time.monotonic`'s clock.
    """

    status: int
    headers: dict[str, str]
    body: Any
    seconds: float
    sent_at: float = 0.0


@dataclass(frozen=True)
class NoAnswer:
    """A request without a whole answer: why (:data:`TIMEOUT`, :data:`CLOSED` or a socket error's name), and when.

    *seconds* runs from sending the request until it was given up; *sent_at* is its writing on
    :func:`time.monotonic`'s clock (both 0 when it was never sent).
    """

    reason: str
    seconds: float
    sent_at: float = 0.0


class _Exchange:
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.sock: socket.socket | None = None
        self.received = bytearray()
        self.sent_at = 0.0
        #: When the last byte came, and the head and body as received.
        self.finished_at: float | None = None
        self.head: list[str] = []
        self.payload = b""
        self.failure: NoAnswer | None = None

    def parse(self) -> bool:
        """Whether the whole answer has arrived (then kept, stamped with the time now)."""
        head, sep, body = bytes(self.received).partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(body) < length:
            return False
        self.finished_at = time.monotonic()
        self.head, self.payload = lines, body[:length]
        return True

    def fail(self, reason: str) -> None:
        self.failure = NoAnswer(reason, time.monotonic() - self.sent_at if self.sent_at else 0.0, self.sent_at)

    def outcome(self) -> Answer | NoAnswer:
        """The answer, or why there is none (once one or the other is known)."""
        if self.finished_at is not None:
            headers = {}
            for line in self.head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                body = json.loads(self.payload) if self.payload else None
            except ValueError:
                body = self.payload.decode("utf-8", "replace")
            status = int(self.head[0].split()[1])
            return Answer(status, headers, body, self.finished_at - self.sent_at, self.sent_at)
        assert self.failure is not None, "neither answered nor failed yet"
        return self.failure


@overload
def burst(
    targets: Sequence[tuple[int, str]],
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    *,
    missing: Literal["raise"] = "raise",
) -> list[Answer]: ...


@overload
def burst(
    targets: Sequence[tuple[int, str]],
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    *,
    missing: Literal["report"],
) -> list[Answer | NoAnswer]: ...


def burst(
    targets: Sequence[tuple[int, str]],
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    *,
    missing: Literal["raise", "report"] = "raise",
) -> list[Answer] | list[Answer | NoAnswer]:
    """GET every ``(port, path)`` on 127.0.0.1 at once, one connection each; answers in the order given.

    With ``missing="report"`` nothing raises for one request: in the place of an answer not
    whole within *timeout* after the last request was written comes a :class:`NoAnswer`
    with reason :data:`TIMEOUT` (its *seconds* from its sending until then); a connection
    closed before its whole answer gives :data:`CLOSED`, and one that could not be opened,
    written or read gives the socket error's name (``ConnectionResetError``...).

    :raises AssertionError: (``missing="raise"``, the default) an answer did not arrive within *timeout*.
    :raises OSError: (``missing="raise"``) a connection could not be opened, written or read.
    """
    report = missing == "report"
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    exchanges = [
        _Exchange(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode())
        for _, path in targets
    ]
    selector = selectors.DefaultSelector()
    pending = 0

    def settle(exchange: _Exchange, reason: str | None = None) -> None:
        nonlocal pending
        if exchange.sock is not None:
            selector.unregister(exchange.sock)
        pending -= 1
        if reason is not None:
            exchange.fail(reason)

    def read(wait: float) -> None:
        for key, _ in selector.select(timeout=wait):
            exchange, sock = key.data, key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if not report:
                    raise
                settle(exchange, type(exc).__name__)
                continue
            exchange.received += chunk
            if exchange.parse():
                settle(exchange)
            elif not chunk:
                settle(exchange, CLOSED)

    try:
        for exchange, (port, _) in zip(exchanges, targets, strict=True):
            try:
                exchange.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            except OSError as exc:
                if not report:
                    raise
                exchange.fail(type(exc).__name__)
        # Connected first, then all sent as close together as can be.
        for n, exchange in enumerate(exchanges):
            if exchange.sock is None:
                continue
            exchange.sent_at = time.monotonic()
            try:
                exchange.sock.sendall(exchange.request)
            except OSError as exc:
                if not report:
                    raise
                exchange.fail(type(exc).__name__)
                continue
            exchange.sock.setblocking(False)
            selector.register(exchange.sock, selectors.EVENT_READ, exchange)
            pending += 1
            if n % _WRITES_PER_READ == _WRITES_PER_READ - 1:
                read(0.0)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            read(max(0.0, deadline - time.monotonic()))
        for exchange in exchanges:
            if exchange.finished_at is None and exchange.failure is None:
                exchange.fail(TIMEOUT)
        outcomes = [exchange.outcome() for exchange in exchanges]
        if report:
            return outcomes
        missed = [target for target, outcome in zip(targets, outcomes, strict=True) if isinstance(outcome, NoAnswer)]
        assert not missed, f"{len(missed)} of {len(targets)} got no whole answer within {timeout} s: {missed[:3]}"
        return [outcome for outcome in outcomes if isinstance(outcome, Answer)]
    finally:
        selector.close()
        for exchange in exchanges:
            if exchange.sock is not None:
                exchange.sock.close()
