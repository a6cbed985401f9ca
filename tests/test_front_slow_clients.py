"""500 slow-header clients: through the front or straight into gunicorn, nobody else notices.

Each slow client sends one header byte every few seconds. nginx holds such connections in
its event loop and drops them after its header timeout (10 s); gunicorn's gevent worker
holds each in a greenlet of its own. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import BRAZE_KEY
from tests.front_support import ProdShape

pytestmark = pytest.mark.slow

SLOW_CLIENTS = 500
DRIBBLE_EVERY = 3.0  # seconds between two header bytes of one slow client
WINDOW = 6.0  # seconds of normal lookups while the slow clients dribble (under the front's 10 s header timeout)
PROMISE = 1.5  # every normal lookup answers 200 within this: the service's deadline (Braze gives 2 s)
HEADER_TIMEOUT = 10.0  # the front's client_header_timeout (deploy/nginx/render.py default)


class Dribblers:
    """*count* connections sending a request's headers one byte every DRIBBLE_EVERY seconds."""

    def __init__(self, port: int, count: int = SLOW_CLIENTS) -> None:
        self.sockets: list[socket.socket] = []
        self.sent = [0] * count
        self.failed = [False] * count
        self._stop = threading.Event()
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /v1/users/user-slow/cohorts HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                self.sockets.append(sock)
        except BaseException:
            self.close()
            raise
        self.connected_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dribblers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        gap = DRIBBLE_EVERY / len(self.sockets)
        for _ in range(20):  # bounded: at most 20 rounds (60 s), and stopped well before
            for n, sock in enumerate(self.sockets):
                if self._stop.wait(gap):
                    return
                if self.failed[n]:
                    continue
                try:
                    sock.send(b"a")
                    self.sent[n] += 1
                except OSError:
                    self.failed[n] = True  # the server dropped this one

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def dropped_by_server(self, within: float) -> int:
        """How many connections the server closed, waiting at most *within* seconds in all."""
        deadline = time.monotonic() + within
        closed = 0
        # epoll, not select(): descriptors past 1024 are likely with 500 sockets open.
        with selectors.DefaultSelector() as selector:
            for sock in self.sockets:
                selector.register(sock, selectors.EVENT_READ)
            pending = len(self.sockets)
            while pending and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        closed += 1
                        pending -= 1
                        selector.unregister(sock)
        return closed

    def close(self) -> None:
        self._stop.set()
        for sock in self.sockets:
            sock.close()


def normal_lookups(url: str, window: float, timeout: float) -> list[tuple[int | None, float]]:
    """Lookups as a normal caller makes them, each on a new connection, for *window* seconds (at most 200)."""
    results: list[tuple[int | None, float]] = []
    deadline = time.monotonic() + window
    n = 0
    while time.monotonic() < deadline and n < 200:
        started = time.monotonic()
        try:
            response = requests.get(
                f"{url}/v1/users/user-fast-{n % 5}/cohorts",
                headers={"Authorization": f"Bearer {BRAZE_KEY}", "Connection": "close"},
                timeout=timeout,
            )
            status: int | None = response.status_code
            error = None if status == 200 else response.text[:200]
        except requests.RequestException as exc:
            status, error = None, type(exc).__name__
        results.append((status, time.monotonic() - started) if error is None else (status, error))
        n += 1
        time.sleep(0.05)
    return results


def test_through_the_front_500_slow_clients_do_not_slow_other_callers(tmp_path: Path):
    shape = ProdShape(tmp_path / "run-prod.log", env={"PROXY_API_KEYS": f"braze:{BRAZE_KEY}"})
    dribblers = None
    try:
        dribblers = Dribblers(shape.port)
        time.sleep(0.5)  # every slow client is connected and mid-headers
        results = normal_lookups(shape.url, WINDOW, timeout=5)
        dribblers.stop()
        assert len(results) >= 10
        assert [status for status, _ in results] == [200] * len(results), results
        slowest = max(seconds for _, seconds in results)
        assert slowest <= PROMISE, f"slowest lookup {slowest:.2f} s"
        # The slow clients really were there the whole time: still connected, still dribbling.
        assert sum(1 for n in dribblers.sent if n >= 1) >= 0.95 * SLOW_CLIENTS
        assert sum(dribblers.failed) <= 0.05 * SLOW_CLIENTS
        # And the front drops them once its header timeout has passed.
        waited = time.monotonic() - dribblers.connected_at
        closed = dribblers.dropped_by_server(within=max(0.0, HEADER_TIMEOUT - waited) + 10)
        assert closed >= 0.95 * SLOW_CLIENTS
    finally:
        if dribblers is not None:
            dribblers.close()
        shape.stop()


def test_straight_into_gunicorn_the_same_slow_clients_cost_it_nothing_either(gunicorn_service, sim):
    """Each slow client holds a greenlet of the gevent worker, a few kilobytes, and no thread:
    other callers go on (the front is there for its header timeout, buffering and JSON)."""
    service = gunicorn_service(WEB_CONCURRENCY=1)  # one worker, whatever the default
    dribblers = Dribblers(service.port)
    try:
        time.sleep(0.5)
        results = normal_lookups(service.url, window=4.0, timeout=PROMISE)
    finally:
        dribblers.close()
    assert len(results) >= 2
    assert all(status == 200 and seconds < PROMISE for status, seconds in results), results
