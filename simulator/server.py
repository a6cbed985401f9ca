"""The simulator object: its HTTP server, configuration, faults, rate limit and records."""

from __future__ import annotations

import socket
import sys
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from simulator import data
from simulator.handler import _Handler
from simulator.pushes import CohortPushes

#: Each fault mode and the options it takes.
FAULT_OPTIONS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "slow": frozenset({"seconds"}),
    "hang": frozenset({"seconds"}),
    "dribble": frozenset({"interval"}),
    "trickle_headers": frozenset({"interval", "lines"}),
    "status": frozenset({"status", "body", "retry_after"}),
    "rate_limited": frozenset({"retry_after"}),
    "reset": frozenset(),
    "html": frozenset({"body"}),
    "truncated": frozenset(),
    "wrong_shape": frozenset({"body"}),
    "oversized": frozenset({"size_bytes"}),
    "unauthorized": frozenset(),
}
FAULT_MODES = frozenset(FAULT_OPTIONS)

#: The longest a request waits while the simulator is held (a test that forgets to release).
HOLD_LIMIT_SECONDS = 30.0


@dataclass(slots=True)
class RecordedRequest:
    """One profile request as received (``status`` 0 until answered, and for a cut connection)."""

    time: float
    path: str
    raw_query: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    status: int


@dataclass
class Fault:
    """A fault mode, how many more requests it applies to (None: until cleared) and its options."""

    mode: str
    remaining: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


NO_FAULT = Fault("none")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # bursts of new connections from load tests
    allow_reuse_address = True
    simulator: AmplitudeSimulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients and faults cut connections on purpose; anything else is a bug worth showing.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class AmplitudeSimulator:
    """Amplitude's User Profile API on loopback: deterministic per identity, with faults and a rate limit."""

    def __init__(
        self,
        secret_key: str = "sim-secret-key",
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit_per_minute: int | None = 600,
        latency_ms: float = 0,
        unknown_user_status: int = 200,
        rec_ids: set[str] | frozenset[str] | None = None,
        max_records: int | None = 100_000,
    ) -> None:
        self.secret_key = secret_key
        self.rate_limit_per_minute = rate_limit_per_minute
        self.latency_ms = latency_ms
        self.unknown_user_status = unknown_user_status
        self.rec_ids = frozenset(rec_ids) if rec_ids is not None else data.DEFAULT_REC_IDS
        self._initial = (rate_limit_per_minute, latency_ms, unknown_user_status)
        self._lock = threading.Lock()
        # Records are bounded for long benchmark runs; the counters and arrival times cover everything.
        self._records: deque[RecordedRequest] = deque(maxlen=max_records)
        self._arrivals = array("d")
        self._by_status: dict[int, int] = {}
        self._accepted: deque[float] = deque()
        self._fault = NO_FAULT
        self._generation = 0
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._open = threading.Event()  # cleared by hold(): answers wait until release()
        self._open.set()
        self._thread: threading.Thread | None = None
        self._pushes: list[CohortPushes] = []
        self._server = _Server((host, port), _Handler)
        self._server.simulator = self

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8100``."""
        host, port = self._server.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> AmplitudeSimulator:
        """Serve in a background daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="amplitude-simulator", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from another thread)."""
        self._thread = threading.current_thread()
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving, end waiting faults and close open connections."""
        self._stopping.set()
        self._open.set()
        for pushes in self._pushes:
            pushes.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                # Wakes the handler thread blocked reading a kept-alive connection.
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> AmplitudeSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests look at ----------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Profile requests received, whatever their outcome."""
        with self._lock:
            return len(self._arrivals)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the recorded profile requests, oldest first (the latest ``max_records``)."""
        with self._lock:
            return list(self._records)

    def count_by_status(self) -> dict[int, int]:
        """Profile requests by the status answered (0: not answered yet, or cut without an answer)."""
        with self._lock:
            return dict(self._by_status)

    def max_in_window(self, seconds: float = 60.0) -> int:
        """The most profile requests received within any window of *seconds*."""
        with self._lock:
            times = self._arrivals[:]
        best = start = 0
        for end, moment in enumerate(times):
            while moment - times[start] >= seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    def reset(self, reset_config: bool = False) -> None:
        """Forget records, the rate-limit window and the fault; with *reset_config* also the settings."""
        with self._lock:
            self._records.clear()
            self._arrivals = array("d")
            self._by_status.clear()
            self._accepted.clear()
            self._fault = NO_FAULT
            self._generation += 1  # requests still in flight no longer count
        self._open.set()
        if reset_config:
            # Back to what the constructor (or the command line) said.
            self.rate_limit_per_minute, self.latency_ms, self.unknown_user_status = self._initial

    def hold(self) -> None:
        """Receive (and count) profile requests but answer none until :meth:`release`.

        Lets a test keep a call in flight for exactly as long as it needs, instead of
        guessing a latency; a held request waits at most ``HOLD_LIMIT_SECONDS``.
        """
        self._open.clear()

    def release(self) -> None:
        """Answer the held requests (and every later one) as usual."""
        self._open.set()

    def _hold_if_held(self) -> None:
        if not self._open.is_set():
            self._open.wait(HOLD_LIMIT_SECONDS)

    def set_fault(self, mode: str, count: int | None = None, **options: Any) -> None:
        """Apply *mode* to the next *count* profile requests (None: until ``set_fault("none")``)."""
        if mode not in FAULT_OPTIONS:
            raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(FAULT_MODES)}")
        unexpected = set(options) - FAULT_OPTIONS[mode]
        if unexpected:
            raise ValueError(f"fault {mode!r} takes no option {sorted(unexpected)}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError("count must be a positive int or None")
        with self._lock:
            self._fault = NO_FAULT if mode == "none" else Fault(mode, count, dict(options))

    @property
    def fault(self) -> Fault:
        """The fault in force (``remaining``: requests it still applies to)."""
        with self._lock:
            return Fault(self._fault.mode, self._fault.remaining, dict(self._fault.options))

    def config(self) -> dict[str, Any]:
        """The runtime settings, as ``/_sim/config`` reports them."""
        fault = self.fault
        return {
            "latency_ms": self.latency_ms,
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "unknown_user_status": self.unknown_user_status,
            "fault": {"mode": fault.mode, "count": fault.remaining, **fault.options},
        }

    def stats(self) -> dict[str, Any]:
        """What ``GET /_sim/stats`` answers (with ``pushes`` once cohort pushes started)."""
        stats: dict[str, Any] = {
            "calls": self.calls,
            "by_status": {str(status): n for status, n in sorted(self.count_by_status().items())},
            "max_in_60s": self.max_in_window(60.0),
        }
        if self._pushes:
            stats["pushes"] = [pushes.report() for pushes in self._pushes]
        return stats

    def push_cohorts(
        self, url: str, secret: str, cohort_ids: tuple[str, ...] = ("cohort_vip",), users: int = 5000,
        every: float = 0.0,
    ) -> CohortPushes:  # fmt: skip
        """POST Cohort Webhooks batches to *url* in the background, as Amplitude would, until :meth:`stop`.

        Each cohort's members are those the profile data gives (see :mod:`simulator.pushes`).
        """
        pushes = CohortPushes(url, secret, cohort_ids, users, every, stopping=self._stopping)
        self._pushes.append(pushes)
        pushes.start()
        return pushes

    # -- used by the handler ---------------------------------------------------------------

    def _record(
        self, path: str, raw_query: str, params: list[tuple[str, str]], headers: dict[str, str]
    ) -> tuple[RecordedRequest, int]:
        with self._lock:
            # The clock is read under the lock so that arrival times stay sorted.
            record = RecordedRequest(time.monotonic(), path, raw_query, params, headers, 0)
            self._records.append(record)
            self._arrivals.append(record.time)
            self._by_status[0] = self._by_status.get(0, 0) + 1
            return record, self._generation

    def _answered(self, record: RecordedRequest, generation: int, status: int) -> None:
        # Called before the answer's first byte leaves, so a client never sees it before the counters do.
        with self._lock:
            if record.status == 0 and status != 0 and generation == self._generation:
                self._by_status[0] -= 1
                if not self._by_status[0]:
                    del self._by_status[0]
                self._by_status[status] = self._by_status.get(status, 0) + 1
            record.status = status

    def _take_fault(self) -> Fault:
        with self._lock:
            fault = self._fault
            if fault.mode == "none":
                return fault
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = NO_FAULT
            return fault

    def _admit(self) -> bool:
        """Count the request against the per-minute limit; False when over it."""
        limit = self.rate_limit_per_minute
        now = time.monotonic()
        with self._lock:
            # A sliding window over the requests accepted (as Amplitude counts them), not the rejected.
            while self._accepted and now - self._accepted[0] >= 60.0:
                self._accepted.popleft()
            if limit and len(self._accepted) >= limit:
                return False
            self._accepted.append(now)
            return True

    def _wait(self, seconds: float) -> bool:
        """Sleep up to *seconds*, cut short by :meth:`stop`; True when stopping."""
        return self._stopping.wait(seconds) if seconds > 0 else self._stopping.is_set()

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)
