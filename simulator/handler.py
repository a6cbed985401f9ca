"""The simulator's HTTP handler: the profile route with its faults, and the ``/_sim`` control routes."""

from __future__ import annotations

import json
import socket
import struct
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from simulator import api
from simulator.api import Answer

if TYPE_CHECKING:
    from simulator.server import AmplitudeSimulator, RecordedRequest, _Server

PROFILE_PATH = "/v1/userprofile"
NOT_FOUND = Answer(404, b"", None)
CONFIG_NAMES = frozenset({"latency_ms", "rate_limit_per_minute", "unknown_user_status", "fault"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections to Amplitude
    # Every answer goes out in one write, and a dribble's bytes must leave one by one.
    disable_nagle_algorithm = True
    server_version = "amplitude-simulator"
    sys_version = ""
    server: _Server
    _current: tuple[RecordedRequest, int] | None = None

    def setup(self) -> None:
        super().setup()
        self.server.simulator._track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.simulator._track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown a load test's output

    # -- routing -----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._current = None
        sim = self.server.simulator
        path, _, raw_query = self.path.partition("?")
        if path == PROFILE_PATH:
            self._profile(sim, path, raw_query)
        elif path == "/_sim/stats":
            self._write(api.json_answer(200, sim.stats()))
        elif path == "/_sim/config":
            self._write(api.json_answer(200, sim.config()))
        else:
            self._write(NOT_FOUND)

    def do_POST(self) -> None:  # noqa: N802
        self._current = None
        sim = self.server.simulator
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length, self.close_connection = 0, True  # the body's end is unknown: no keep-alive
        raw = self.rfile.read(length) if length > 0 else b""
        path = self.path.partition("?")[0]
        if path not in ("/_sim/reset", "/_sim/config", "/_sim/push"):
            self._write(NOT_FOUND)
            return
        try:
            payload = json.loads(raw) if raw.strip() else {}
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            if path == "/_sim/reset":
                sim.reset(reset_config=bool(payload.get("reset_config")))
            elif path == "/_sim/push":
                _push(sim, payload)
            else:
                _configure(sim, payload)
        except (ValueError, TypeError) as exc:
            self._write(api.error(400, str(exc)))
            return
        self._write(api.json_answer(200, {**sim.stats(), "config": sim.config()}))

    # -- the profile API ---------------------------------------------------------------------

    def _profile(self, sim: AmplitudeSimulator, path: str, raw_query: str) -> None:
        params = parse_qsl(raw_query, keep_blank_values=True)
        self._current = sim._record(path, raw_query, params, dict(self.headers.items()))
        sim._hold_if_held()
        fault = sim._take_fault()
        mode, options = fault.mode, fault.options
        if sim.latency_ms and sim._wait(sim.latency_ms / 1000):
            return self._cut()
        if mode == "hang":
            # Read the request, say nothing, then close: a client without a read timeout waits.
            sim._wait(float(options.get("seconds", 30)))
            return self._cut()
        if mode == "reset":
            return self._reset()
        replacement = api.fault_answer(mode, options)
        if replacement is not None:
            return self._write(replacement)
        if mode == "slow" and sim._wait(float(options.get("seconds", 5))):
            return self._cut()
        answer = self._answer(sim, params)
        if mode == "oversized" and answer.status == 200:
            answer = api.padded(answer, int(options.get("size_bytes", 5_000_000)))
        if mode == "dribble":
            return self._dribble(sim, answer, float(options.get("interval", 0.2)))
        if mode == "trickle_headers":
            return self._trickle_headers(
                sim, answer, float(options.get("interval", 0.5)), int(options.get("lines", 20))
            )
        if mode == "truncated":
            return self._write(answer, send=len(answer.body) // 2)
        return self._write(answer)

    def _answer(self, sim: AmplitudeSimulator, params: list[tuple[str, str]]) -> Answer:
        """The real API's answer: auth, then the rate limit, then the profile."""
        refused = api.check_key(self.headers.get("Authorization"), sim.secret_key)
        if refused is not None:
            return refused
        if not sim._admit():
            return Answer(429, api.RATE_LIMITED)
        return api.profile(params, sim.rec_ids, sim.unknown_user_status)

    # -- writing -----------------------------------------------------------------------------

    def _head(self, answer: Answer) -> bytes:
        reason = self.responses.get(answer.status, ("",))[0]
        lines = [f"HTTP/1.1 {answer.status} {reason}", f"Server: {self.server_version}"]
        lines.append(f"Date: {self.date_time_string()}")
        if answer.content_type:
            lines.append(f"Content-Type: {answer.content_type}")
        lines.append(f"Content-Length: {len(answer.body)}")
        lines.extend(f"{name}: {value}" for name, value in answer.headers)
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _mark(self, status: int) -> None:
        if self._current is not None:
            self.server.simulator._answered(*self._current, status)

    def _write(self, answer: Answer, send: int | None = None) -> None:
        """Send *answer* in one write; with *send*, only that many body bytes, then close."""
        self._mark(answer.status)
        body = answer.body if send is None else answer.body[:send]
        try:
            self.wfile.write(self._head(answer) + body)
        except OSError:
            self.close_connection = True
        if send is not None:
            self.close_connection = True

    def _dribble(self, sim: AmplitudeSimulator, answer: Answer, interval: float) -> None:
        """Headers at once, then the body one byte per *interval*."""
        self._mark(answer.status)
        try:
            self.wfile.write(self._head(answer))
            for index in range(len(answer.body)):
                if sim._wait(interval):
                    break
                self.wfile.write(answer.body[index : index + 1])
        except OSError:
            pass  # the client gave up: that is what the fault is for
        self.close_connection = True

    def _trickle_headers(self, sim: AmplitudeSimulator, answer: Answer, interval: float, lines: int) -> None:
        """The status line, then one made-up header line per *interval*, then the answer's own."""
        self._mark(answer.status)
        head = self._head(answer)
        status_line, _, rest = head.partition(b"\r\n")
        try:
            self.wfile.write(status_line + b"\r\n")
            for index in range(lines):
                if sim._wait(interval):
                    break
                self.wfile.write(f"X-Trickle-{index}: x\r\n".encode())
            else:
                self.wfile.write(rest + answer.body)
        except OSError:
            pass  # the client gave up: that is what the fault is for
        self.close_connection = True

    def _cut(self) -> None:
        """Close without answering (a FIN once the handler returns)."""
        self.close_connection = True

    def _reset(self) -> None:
        """Close at once with a TCP RST, sending nothing."""
        self.close_connection = True
        # SO_LINGER on with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket really closes only once its reader is closed too.
        self.rfile.close()
        self.connection.close()


def _push(sim: AmplitudeSimulator, payload: dict[str, Any]) -> None:
    """Apply ``POST /_sim/push``: start posting Cohort Webhooks batches (``url``, ``secret``, and
    optionally ``cohorts``, ``users``, ``every``), as ``--push-url`` does at start."""
    url, secret = payload.get("url"), payload.get("secret")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("url must be the receiver's http(s) URL")
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret must be the webhook secret")
    cohorts = payload.get("cohorts", ["cohort_vip"])
    if not isinstance(cohorts, list) or not cohorts or not all(isinstance(c, str) and c for c in cohorts):
        raise ValueError("cohorts must be a list of cohort ids")
    users, every = payload.get("users", 5000), payload.get("every", 0)
    if isinstance(users, bool) or not isinstance(users, int) or not 1 <= users <= 1_000_000:
        raise ValueError("users must be an int from 1 to 1000000")
    if isinstance(every, bool) or not isinstance(every, int | float) or every < 0:
        raise ValueError("every must be a number of seconds >= 0")
    sim.push_cohorts(url, secret, tuple(cohorts), users, float(every))


def _configure(sim: AmplitudeSimulator, payload: dict[str, Any]) -> None:
    """Apply ``POST /_sim/config``, all or nothing."""
    unexpected = set(payload) - CONFIG_NAMES
    if unexpected:
        raise ValueError(f"unknown settings {sorted(unexpected)}")
    latency = payload.get("latency_ms", sim.latency_ms)
    if isinstance(latency, bool) or not isinstance(latency, int | float) or latency < 0:
        raise ValueError("latency_ms must be a number >= 0")
    limit = payload.get("rate_limit_per_minute", sim.rate_limit_per_minute)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError("rate_limit_per_minute must be an int >= 0 or null")
    unknown_status = payload.get("unknown_user_status", sim.unknown_user_status)
    if isinstance(unknown_status, bool) or not isinstance(unknown_status, int) or not 100 <= unknown_status <= 599:
        raise ValueError("unknown_user_status must be an HTTP status")
    if "fault" in payload:
        fault = payload["fault"]
        if not isinstance(fault, dict) or "mode" not in fault:
            raise ValueError('fault must be an object with a "mode"')
        options = {k: v for k, v in fault.items() if k not in ("mode", "count")}
        sim.set_fault(fault["mode"], fault.get("count"), **options)  # validates before anything changes
    sim.latency_ms, sim.rate_limit_per_minute, sim.unknown_user_status = latency, limit or None, unknown_status
