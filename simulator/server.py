"""An HTTP server imitating Amplitude's User Profile API, with a rate limit and faults."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from simulator import data

UNKNOWN_USER = b'{"error":"User id and device id not seen before"}'
RATE_LIMITED = (
    b'{"error":"Number of requests per minute exceeds system limit. Contact Support if you need this limit raised"}'
)
FAULT_MODES = {
    "none", "slow", "hang", "dribble", "status", "rate_limited", "reset", "html", "truncated", "wrong_shape",
    "oversized", "unauthorized",
}  # fmt: skip


@dataclass
class RecordedRequest:
    """One profile request as the simulator saw it (recorded on arrival; ``status`` 0 until answered)."""

    time: float
    path: str
    raw_query: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    status: int


@dataclass
class Fault:
    mode: str
    remaining: int | None
    options: dict[str, Any]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True
    simulator: AmplitudeSimulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Faults cut connections on purpose; their broken pipes are not news.
        pass


class AmplitudeSimulator:
    """The User Profile API on loopback, deterministic per identity."""

    def __init__(
        self,
        secret_key: str = "sim-secret-key",
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit_per_minute: int | None = 600,
        latency_ms: float = 0,
        unknown_user_status: int = 200,
        rec_ids: set[str] | frozenset[str] | None = None,
    ) -> None:
        self.secret_key = secret_key
        self.rate_limit_per_minute = rate_limit_per_minute
        self.latency_ms = latency_ms
        self.unknown_user_status = unknown_user_status
        self.rec_ids = frozenset(rec_ids) if rec_ids is not None else data.DEFAULT_REC_IDS
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._accepted: deque[float] = deque()
        self._fault = Fault("none", None, {})
        self._server = _Server((host, port), _Handler)
        self._server.simulator = self
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> AmplitudeSimulator:
        self._thread = threading.Thread(target=self._server.serve_forever, name="amplitude-simulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> AmplitudeSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests look at ----------------------------------------------------------------

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count_by_status(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for request in self.requests:
            counts[request.status] = counts.get(request.status, 0) + 1
        return counts

    def max_in_window(self, seconds: float = 60.0) -> int:
        """The most requests received within any window of *seconds*."""
        times = sorted(request.time for request in self.requests)
        best, start = 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    def reset(self, reset_config: bool = False) -> None:
        with self._lock:
            self._requests.clear()
            self._accepted.clear()
            self._fault = Fault("none", None, {})
        if reset_config:
            self.latency_ms, self.rate_limit_per_minute, self.unknown_user_status = 0, 600, 200

    def set_fault(self, mode: str, count: int | None = None, **options: Any) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        with self._lock:
            self._fault = Fault(mode, count, options)

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_status": {str(k): v for k, v in self.count_by_status().items()},
            "max_in_60s": self.max_in_window(60.0),
        }

    # -- used by the handler ---------------------------------------------------------------

    def _take_fault(self) -> Fault:
        with self._lock:
            fault = self._fault
            if fault.mode == "none":
                return fault
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = Fault("none", None, {})
            return Fault(fault.mode, None, dict(fault.options))

    def _admit(self) -> bool:
        """Count the request against the per-minute limit; False when over it."""
        limit = self.rate_limit_per_minute
        now = time.monotonic()
        with self._lock:
            while self._accepted and now - self._accepted[0] >= 60.0:
                self._accepted.popleft()
            if limit and len(self._accepted) >= limit:
                return False
            self._accepted.append(now)
            return True

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    # -- routing -----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path, _, raw_query = self.path.partition("?")
        if path == "/_sim/stats":
            self._send(200, json.dumps(self.server.simulator.stats()).encode())
        elif path == "/v1/userprofile":
            self._profile(path, raw_query)
        else:
            self._send(404, b"", content_type=None)

    def do_POST(self) -> None:  # noqa: N802
        sim = self.server.simulator
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"{}") if length else {}
        if self.path == "/_sim/reset":
            sim.reset(reset_config=bool(payload.get("reset_config")))
        elif self.path == "/_sim/config":
            for name in ("latency_ms", "rate_limit_per_minute", "unknown_user_status"):
                if name in payload:
                    setattr(sim, name, payload[name])
            if "fault" in payload:
                fault = dict(payload["fault"])
                sim.set_fault(fault.pop("mode"), fault.pop("count", None), **fault)
        else:
            self._send(404, b"", content_type=None)
            return
        self._send(200, json.dumps(sim.stats()).encode())

    # -- the profile API ---------------------------------------------------------------------

    def _profile(self, path: str, raw_query: str) -> None:
        sim = self.server.simulator
        params = parse_qsl(raw_query, keep_blank_values=True)
        record = RecordedRequest(time.monotonic(), path, raw_query, params, dict(self.headers.items()), 0)
        sim._record(record)
        record.status = self._answer(sim, params)

    def _answer(self, sim: AmplitudeSimulator, params: list[tuple[str, str]]) -> int:
        """Write the answer and return its status (0 when the connection was cut)."""
        authorization = self.headers.get("Authorization")
        if not authorization:
            return self._send(401, b"Missing Api-Key in Authorization header", content_type="text/plain")
        if authorization != f"Api-Key {sim.secret_key}":
            return self._send(401, b"Invalid Api-Key", content_type="text/plain")
        if not sim._admit():
            return self._send(429, RATE_LIMITED)
        fault = sim._take_fault()
        if fault.mode != "none":
            handled = self._fault(fault, params)
            if handled is not None:
                return handled
        if sim.latency_ms:
            time.sleep(sim.latency_ms / 1000)
        return self._userprofile(sim, params)

    def _userprofile(self, sim: AmplitudeSimulator, params: list[tuple[str, str]]) -> int:
        query = dict(params)
        if "user_id" in query:
            kind, identity = "user", query["user_id"]
        elif "device_id" in query:
            kind, identity = "device", query["device_id"]
        else:
            return self._send(400, b'{"error":"user_id or device_id is required"}')
        flags = {
            name: query.get(name) == "true"
            for name in ("get_amp_props", "get_cohort_ids", "get_computations", "get_recs", "get_propensity")
        }
        flags["rec_id"] = [r for r in query.get("rec_id", "").split(",") if r]
        flags["comp_id"] = [c for c in query["comp_id"].split(",") if c] if "comp_id" in query else None
        flags["rec_type"] = query.get("rec_type")
        flags["prediction_id"] = [p for p in query.get("prediction_id", "").split(",") if p]
        flags["propensity_type"] = query.get("propensity_type", "score")
        if flags["get_recs"] and not flags["rec_id"]:
            return self._send(400, b'{"error":"rec_id is required with get_recs"}')
        if flags["rec_type"] not in (None, "model", "random"):
            return self._send(400, b'{"error":"rec_type must be model or random"}')
        if flags["get_propensity"] and not flags["prediction_id"]:
            return self._send(400, b'{"error":"prediction_id is required with get_propensity"}')
        if flags["propensity_type"] not in ("score", "pct"):
            return self._send(400, b'{"error":"propensity_type must be score or pct"}')
        if data.is_unknown(identity):
            return self._send(sim.unknown_user_status, UNKNOWN_USER)
        body = {"userData": data.user_data(kind, identity, flags, sim.rec_ids)}
        return self._send(200, json.dumps(body, separators=(",", ":")).encode())

    # -- faults ------------------------------------------------------------------------------

    def _fault(self, fault: Fault, params: list[tuple[str, str]]) -> int | None:
        options, mode = fault.options, fault.mode
        if mode == "slow":
            time.sleep(float(options.get("seconds", 5)))
            return None
        if mode == "hang":
            time.sleep(float(options.get("seconds", 30)))
            self.close_connection = True
            return 0
        if mode == "status":
            status = int(options.get("status", 500))
            body = options.get("body", {"error": f"simulated HTTP {status}"})
            return self._send(status, json.dumps(body).encode())
        if mode == "rate_limited":
            retry_after = options.get("retry_after")
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return self._send(429, RATE_LIMITED, headers=headers)
        if mode == "reset":
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return 0
        if mode == "html":
            return self._send(200, b"<html><body><h1>Service maintenance</h1></body></html>", content_type="text/html")
        if mode == "unauthorized":
            return self._send(401, b"Invalid Api-Key", content_type="text/plain")
        if mode == "wrong_shape":
            return self._send(200, json.dumps(options.get("body", {"data": []})).encode())
        body = self._normal_body(params)
        if mode == "dribble":
            self._send_headers(200, len(body))
            interval = float(options.get("interval", 0.2))
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(interval)
            except OSError:
                pass
            self.close_connection = True
            return 200
        if mode == "truncated":
            self._send_headers(200, len(body))
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return 200
        if mode == "oversized":
            size = int(options.get("size_bytes", 5_000_000))
            padded = {"userData": {"recommendations": None, "user_id": "x", "device_id": None,
                                   "amp_props": {"padding": "x" * size}, "cohort_ids": None}}  # fmt: skip
            return self._send(200, json.dumps(padded).encode())
        return None

    def _normal_body(self, params: list[tuple[str, str]]) -> bytes:
        query = dict(params)
        identity = query.get("user_id") or query.get("device_id") or "someone"
        flags = {"get_amp_props": True, "get_computations": True, "get_cohort_ids": True, "get_recs": False,
                 "get_propensity": False, "comp_id": None, "rec_id": [], "rec_type": None,
                 "prediction_id": [], "propensity_type": "score"}  # fmt: skip
        return json.dumps({"userData": data.user_data("user", identity, flags, frozenset())}).encode()

    # -- writing -----------------------------------------------------------------------------

    def _send_headers(self, status: int, length: int, content_type: str | None = "application/json",
                      headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str | None = "application/json",
              headers: dict[str, str] | None = None) -> int:  # fmt: skip
        try:
            self._send_headers(status, len(body), content_type, headers)
            self.wfile.write(body)
        except OSError:
            self.close_connection = True
        return status
