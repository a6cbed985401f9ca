"""Cut an upstream call at its deadline, whatever stage the exchange is in.

Socket timeouts bound each read, not the exchange: an answer that trickles in a header
line at a time would hold a thread long past the deadline. One watchdog thread keeps the
deadlines of the calls in flight and, when one passes, shuts down that call's socket; the
call then fails at once and its thread (or greenlet) is free. The pool's connection class
(urllib3's documented ``ConnectionCls`` seam) tells the watch of the call in progress, a
context variable of this module, which connection the call is using.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: The call in progress in this thread or greenlet (each has its own context).
_watched: ContextVar[WatchedCall | None] = ContextVar("upstream_watched_call", default=None)


class WatchedCall:
    """The connection one call is using, so the watchdog can cut it."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.was_cut = False
        self._finished = False
        self._lock = threading.Lock()

    def finish(self) -> None:
        """The answer is read: from now on the connection is the pool's, never to be cut."""
        with self._lock:
            self._finished = True

    def cut(self) -> None:
        with self._lock:
            sock = getattr(self.connection, "sock", None)
            if self._finished or sock is None:
                return  # done, or not connected yet (the connect timeout, capped by the deadline, bounds that)
            self.was_cut = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


#: The watchdog wakes at most this often, cutting every call due by then: a call is cut at
#: most this late, and under load the thread wakes a few dozen times a second, not per call.
TICK_SECONDS = 0.02


class Watchdog:
    """One daemon thread that cuts the calls whose deadline passed.

    A new call wakes it only when it is due before every call already watched (the
    thread sleeps until the earliest): a wake-up per call would take the GIL from the
    calling thread just as it sends its request.
    """

    def __init__(self) -> None:
        self._due: list[tuple[float, int, WatchedCall]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, seconds: float) -> Iterator[WatchedCall]:
        """Watch the calling thread's upstream call for *seconds* (real time)."""
        call = WatchedCall()
        token = _watched.set(call)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="upstream-watchdog", daemon=True)
                self._thread.start()
            due = time.monotonic() + seconds
            earliest = not self._due or due < self._due[0][0]
            heapq.heappush(self._due, (due, next(self._order), call))
            if earliest:
                self._wake.notify()
        try:
            yield call
        finally:
            call.finish()
            _watched.reset(token)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while not self._closed:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, _, call = heapq.heappop(self._due)
                    call.cut()  # a finished call ignores it
                self._wake.wait(max(TICK_SECONDS, self._due[0][0] - now) if self._due else None)


def finish_watched_call() -> None:
    """Mark the call in progress as done with its socket."""
    call = _watched.get()
    if call is not None:
        call.finish()


def _tell_watch(connection: Any) -> None:
    call = _watched.get()
    if call is not None:
        call.connection = connection


class _TellsWatch:
    """Tell the watch of the call in progress that the call uses this connection."""

    def connect(self) -> None:
        _tell_watch(self)  # before connecting: a handshake that trickles is cut too
        super().connect()  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        _tell_watch(self)  # a kept-alive connection is reused without connecting
        super().request(*args, **kwargs)  # type: ignore[misc]


class WatchedConnection(_TellsWatch, HTTPConnection):
    pass


class WatchedHTTPSConnection(_TellsWatch, HTTPSConnection):
    pass


class WatchedPool(HTTPConnectionPool):
    ConnectionCls = WatchedConnection


class WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection
