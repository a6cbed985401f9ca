"""Many requests at once from one thread: a stampede whose client costs little CPU.

A thread per request (``requests`` in a pool) spends more CPU per request than the service
it measures, on the same two cores: a stampede test would then measure its own client.
Here every request has its own connection, all are written at once and read as the
answers come, on one thread with a selector. HTTP/1.1 answers with a Content-Length only
(the service sends nothing else).
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    """One answer: status, headers (lower-case names), the JSON body, seconds from sending to the last byte."""

    status: int
    headers: dict[str, str]
    body: Any
    seconds: float


class _Exchange:
    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.received = bytearray()
        self.sent_at = 0.0
        self.answer: Answer | None = None

    def parse(self) -> bool:
        """Whether the whole answer has arrived (then kept in :attr:`answer`)."""
        head, sep, body = bytes(self.received).partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(body) < length:
            return False
        payload = body[:length]
        self.answer = Answer(
            int(lines[0].split()[1]), headers, json.loads(payload) if payload else None, time.monotonic() - self.sent_at
        )
        return True


def burst(
    targets: Sequence[tuple[int, str]], headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> list[Answer]:
    """GET every ``(port, path)`` on 127.0.0.1 at once, one connection each; answers in the order given.

    :raises AssertionError: an answer did not arrive within *timeout*.
    """
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    exchanges = []
    selector = selectors.DefaultSelector()
    try:
        for port, path in targets:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode()
            exchanges.append(_Exchange(sock, request))
        for exchange in exchanges:  # connected first, then all sent as close together as can be
            exchange.sent_at = time.monotonic()
            exchange.sock.sendall(exchange.request)
            exchange.sock.setblocking(False)
            selector.register(exchange.sock, selectors.EVENT_READ, exchange)
        deadline = time.monotonic() + timeout
        pending = len(exchanges)
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                exchange = key.data
                chunk = exchange.sock.recv(65536)
                exchange.received += chunk
                if exchange.parse() or not chunk:
                    selector.unregister(exchange.sock)
                    pending -= 1
        missing = [targets[n] for n, exchange in enumerate(exchanges) if exchange.answer is None]
        assert not missing, f"{len(missing)} of {len(targets)} got no whole answer within {timeout} s: {missing[:3]}"
        return [exchange.answer for exchange in exchanges if exchange.answer is not None]
    finally:
        selector.close()
        for exchange in exchanges:
            exchange.sock.close()
