"""The production shape: nginx in front of gunicorn. JSON from the front, TLS, the client's address, make run-prod."""

from __future__ import annotations

import http.server
import importlib.util
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from app.errors import ApiError, Forbidden, InvalidRequest
from tests.conftest import BRAZE_KEY, SIM_SECRET
from tests.front_support import (
    HTTP09,
    OUTSIDER,
    RENDER,
    NginxFront,
    ProdShape,
    free_port,
    make_certificate,
    port_open,
    raw_request,
    read_until_closed,
    session_from,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {BRAZE_KEY}"}
HOST = b"Host: 127.0.0.1\r\n"
SIXTY_HEADERS = b"".join(b"X-H%d: v\r\n" % i for i in range(60))
LARGE_HEADERS = b"".join(b"X-F%d: " % i + b"c" * 4000 + b"\r\n" for i in range(10))  # 40 KB in all

#: Requests gunicorn refuses before the app sees them: (case, raw request, status directly, statuses via the front).
REFUSED = [
    ("request line over 8,190 bytes", b"GET /v1/users/" + b"a" * 9000 + b"/cohorts HTTP/1.1\r\n" + HOST + b"\r\n",
     414, {414}),
    ("header over 8,190 bytes", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
     431, {431}),
    # The front forwards only the headers the service reads: nothing to refuse through it.
    ("too many headers", b"GET /healthz HTTP/1.1\r\n" + HOST + SIXTY_HEADERS + b"\r\n", 431, None),
    ("bad HTTP version", b"GET /healthz HTTP/9.9\r\n" + HOST + b"\r\n", 400, {400, 505}),
    ("raw CR in the request line", b"GET /v1/users/a\rb/cohorts HTTP/1.1\r\n" + HOST + b"\r\n", 400, {400}),
    # nginx reads "GET /v1/users/a" + LF as an HTTP/0.9 request: the answer is a body without a head.
    ("raw LF in the request line", b"GET /v1/users/a\nb/cohorts HTTP/1.1\r\n" + HOST + b"\r\n", 400, {400, HTTP09}),
    ("not HTTP at all", b"\x16\x03\x01\x00\xa5 hello\r\n\r\n", 400, {400}),
    # nginx drops a malformed header line and serves the rest: nothing to refuse through the front.
    ("header without a colon", b"GET /healthz HTTP/1.1\r\n" + HOST + b"NoColonHere\r\n\r\n", 400, None),
]  # fmt: skip


def assert_json_error(answer, status: int | set[int]) -> dict:
    statuses = {status} if isinstance(status, int) else status
    assert answer.status in statuses, (answer.status, answer.body[:300])
    if answer.status == HTTP09:
        body = answer.json()
        assert isinstance(body, dict) and isinstance(body["error"], str)
        return body
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    body = answer.json()
    assert isinstance(body, dict)
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert answer.headers.get("cache-control") == "no-store"
    assert answer.headers.get("x-content-type-options") == "nosniff"
    return body


@pytest.fixture
def fronts() -> Iterator[Callable[..., NginxFront]]:
    started: list[NginxFront] = []

    def start(upstream: str, *extra: str, tls_port: int | None = None) -> NginxFront:
        front = NginxFront(upstream, *extra, tls_port=tls_port)
        started.append(front)
        return front

    yield start
    for front in started:
        front.stop()


@pytest.fixture
def backend(gunicorn_service, sim):
    """gunicorn as `make run-prod` runs it behind the front: it believes the front (127.0.0.1) only."""
    return gunicorn_service(TRUSTED_PROXY_COUNT=1, FORWARDED_ALLOW_IPS="127.0.0.1")


def test_gunicorn_refuses_directly_without_echoing_the_request(backend):
    """gunicorn served directly keeps its own page for what it refuses before the app (the
    front answers those in JSON, without quoting the request: below)."""
    for case, request, status, _ in REFUSED:
        answer = raw_request(backend.port, request)
        assert answer.status == status, case
        assert answer.headers.get("connection") == "close", case
    answer = raw_request(
        backend.port, b"GET /healthz HTTP/1.1\r\n" + HOST + f"Authorization Bearer {BRAZE_KEY}\r\n\r\n".encode()
    )
    assert answer.status == 400
    # gunicorn logs the refusal, never the line it refused.
    wait_for(lambda: "Invalid request from ip=" in backend.logs(), 10, "gunicorn to log the refusals")
    assert BRAZE_KEY not in backend.logs()
    # The service is still fine afterwards.
    assert requests.get(f"{backend.url}/v1/users/user-1/cohorts", headers=AUTH, timeout=5).status_code == 200


def test_refusals_are_json_through_the_front(backend, fronts):
    front = fronts(f"127.0.0.1:{backend.port}")
    for _case, request, _, statuses in REFUSED:
        if statuses is not None:
            assert_json_error(raw_request(front.port, request), statuses)
    front_only = [
        (b"POST /v1/users/u/cohorts HTTP/1.1\r\n" + HOST + b"Content-Length: 100000\r\n\r\n", 413),
        (b"TRACE / HTTP/1.1\r\n" + HOST + b"\r\n", 405),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked, foo\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 505),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /" + b"b" * 12000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + HOST + LARGE_HEADERS + b"\r\n", 431),
    ]  # fmt: skip
    for request, status in front_only:
        assert_json_error(raw_request(front.port, request), status)
    # A normal call goes through untouched; the front answers in JSON, and logs only what it answered itself.
    response = requests.get(f"{front.url}/v1/users/user-42/cohorts", headers=AUTH, timeout=5)
    assert response.status_code == 200 and response.json()["user_id"] == "user-42"
    lines = front.access_lines()
    assert {line["status"] for line in lines} >= {400, 405, 413, 414, 431, 501, 505}
    assert all(line["source"] == "front" for line in lines)
    assert 200 not in {line["status"] for line in lines}


def test_the_service_errors_pass_through_the_front_unchanged(backend, fronts):
    front = fronts(f"127.0.0.1:{backend.port}")
    for path, status, error in [
        ("/v1/users/user-1/cohorts", 401, "unauthorized"),
        ("/no-such-route", 404, "not_found"),
    ]:
        response = requests.get(front.url + path, timeout=5)
        assert response.status_code == status
        assert response.json()["error"] == error
        assert response.headers["X-Request-ID"]


def test_front_errors_when_the_service_is_down_or_silent(fronts, tmp_path):
    """502 with nothing listening; 504 when the service accepts but never answers; stalled clients dropped."""
    down = fronts(f"127.0.0.1:{free_port()}")
    body = assert_json_error(raw_request(down.port, b"GET /v1/users/u/cohorts HTTP/1.1\r\n" + HOST + b"\r\n"), 502)
    assert body["error"] == "bad_gateway"
    assert raw_request(down.port, b"GET /readyz HTTP/1.1\r\n" + HOST + b"\r\n").headers["retry-after"] == "5"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepted by the kernel, never answered
        port = silent.getsockname()[1]
        slow = fronts(f"127.0.0.1:{port}", "--upstream-timeout", "1", "--body-timeout", "1", "--header-timeout", "1")
        request = b"GET /v1/users/u/cohorts HTTP/1.1\r\n" + HOST + b"\r\n"
        assert assert_json_error(raw_request(slow.port, request), 504)["error"] == "gateway_timeout"
    # A client that stalls in its headers or body is dropped once its timeout passes (nginx closes
    # a timed-out connection without an answer: nothing that is not JSON ever reaches it).
    for stalled in (
        b"GET /v1/users/u/cohorts HTTP/1.1\r\nHost: 127",
        b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\nab",
    ):
        received, closed = read_until_closed(slow.port, stalled, timeout=15)
        assert closed and received == b"", received[:200]


def test_front_passes_the_client_address_and_ignores_a_clients_own_header(gunicorn_service, sim, fronts):
    service = gunicorn_service(ALLOWED_CIDRS="braze:US-01", TRUSTED_PROXY_COUNT=1, FORWARDED_ALLOW_IPS="127.0.0.1")
    front = fronts(f"127.0.0.1:{service.port}")
    inside = "54.87.8.34"  # a US-01 sending address
    # A client naming a Braze address itself: the front appends the real one, which is judged.
    spoofed = requests.get(
        f"{front.url}/v1/users/user-1/cohorts", headers={**AUTH, "X-Forwarded-For": inside}, timeout=5
    )
    assert spoofed.status_code == 403 and spoofed.json()["error"] == "forbidden"
    # Behind a load balancer the front is told to believe (127.0.0.1 plays it), Braze's address counts...
    edge = fronts(f"127.0.0.1:{service.port}", "--real-ip-from", "127.0.0.1")
    served = requests.get(f"{edge.url}/v1/users/user-2/cohorts", headers={**AUTH, "X-Forwarded-For": inside}, timeout=5)
    assert served.status_code == 200 and served.json()["user_id"] == "user-2"
    # ...but only from that load balancer: the same header from anyone else changes nothing.
    outsider = session_from(OUTSIDER)
    try:
        refused = outsider.get(
            f"{edge.url}/v1/users/user-3/cohorts", headers={**AUTH, "X-Forwarded-For": inside}, timeout=5
        )
    finally:
        outsider.close()
    assert refused.status_code == 403
    assert sim.calls == 1


def test_tls_with_a_certificate_made_here(backend, fronts, tmp_path):
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed: run `make system-deps`"
    cert, key = make_certificate(tmp_path)
    tls_port = free_port()
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-listen", f"127.0.0.1:{tls_port}"]
    front = fronts(f"127.0.0.1:{backend.port}", *tls, tls_port=tls_port)
    for host in ("127.0.0.1", "localhost"):
        result = subprocess.run(
            [curl, "--silent", "--show-error", "--fail-with-body", "--cacert", str(cert), "--max-time", "10",
             "--resolve", f"localhost:{tls_port}:127.0.0.1", "-H", f"Authorization: Bearer {BRAZE_KEY}",
             f"https://{host}:{tls_port}/v1/users/user-42/cohorts"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert '"user_id":"user-42"' in result.stdout.replace(" ", "")
    # Without the certificate, curl refuses: it really is TLS with that certificate.
    untrusted = subprocess.run(
        [curl, "--silent", "--max-time", "10", f"https://127.0.0.1:{tls_port}/healthz"], capture_output=True, timeout=30
    )
    assert untrusted.returncode != 0
    # Plain HTTP keeps working beside it.
    assert requests.get(f"{front.url}/healthz", timeout=5).status_code == 200


def test_make_run_prod_serves_demo_data_through_the_front(tmp_path):
    shape = ProdShape(tmp_path / "run-prod.log")
    try:
        response = requests.get(
            f"{shape.url}/v1/users/user-42/recommendations/rec_home", auth=("braze", "demo-key"), timeout=5
        )
        assert response.status_code == 200
        assert response.json()["user_id"] == "user-42"
        assert response.headers["Server"] == "nginx"  # answered through the front
        # gunicorn listens on loopback behind it; the log says where to call.
        assert port_open(shape.backend_port)
        wait_for(lambda: f"http://localhost:{shape.port}" in shape.logs(), 10, "the start-up lines")
        assert "DEMO MODE" in shape.logs()
        assert_json_error(raw_request(shape.port, b"GET /healthz HTTP/9.9\r\n" + HOST + b"\r\n"), {400, 505})
    finally:
        shape.stop()
    assert not port_open(shape.port) and not port_open(shape.backend_port)
    assert SIM_SECRET not in shape.logs()


def test_make_run_prod_defaults_to_localhost_8000():
    script = (Path(__file__).resolve().parent.parent / "scripts" / "run-prod.sh").read_text()
    assert "front_port=${FRONT_PORT:-8000}" in script
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert "run-prod:" in makefile and "./scripts/run-prod.sh" in makefile


def test_front_and_service_use_the_same_error_codes():
    spec = importlib.util.spec_from_file_location("front_render", RENDER)
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    service: dict[int, str] = {400: InvalidRequest.error, 403: Forbidden.error, 500: ApiError.error}
    service.update({404: "not_found", 405: "method_not_allowed"})  # app/errors.py, for Flask's own errors
    for status in set(render.FRONT_ERRORS) & set(service):
        assert render.FRONT_ERRORS[status][0] == service[status], status


def test_rendering_refuses_half_a_tls_setup_and_trusting_everyone(tmp_path):
    for extra in (["--tls-cert", str(tmp_path / "missing.pem")], ["--real-ip-from", "*"], ["--upstream", "nowhere"]):
        result = subprocess.run(
            [sys.executable, str(RENDER), "--prefix", str(tmp_path / "p"), *extra],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert result.stderr.startswith("render: ")


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: keep-alive, close\r\n",
        b"Connection: keep-alive\r\nConnection: close\r\n",
        b"Connection: close\r\n",
    ],
    ids=["one header", "a second header", "alone"],
)
def test_the_front_closes_when_any_connection_header_says_close(backend, fronts, connection):
    """RFC 9112 9.6: ``close`` in any Connection header ends the connection after the answer."""
    front = fronts(f"127.0.0.1:{backend.port}")
    request = b"GET /healthz HTTP/1.1\r\n" + HOST + connection + b"\r\n"
    received, closed = read_until_closed(front.port, request, timeout=10)
    assert received.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in received
    assert closed, "the front kept the connection open"


def test_the_front_stamps_each_request_with_its_arrival(fronts):
    """The deadline counts from the front's ``X-Request-Start``: the front sets it, whatever the client sent."""
    seen: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.headers.get("X-Request-Start", ""))
            body = b'{"status":"ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        front = fronts(f"127.0.0.1:{server.server_port}")
        before = time.time()
        response = requests.get(f"{front.url}/healthz", headers={"X-Request-Start": "t=1"}, timeout=5)
        after = time.time()
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200
    assert len(seen) == 1 and seen[0].startswith("t=")
    assert before - 1 <= float(seen[0][2:]) <= after + 1  # the front's clock, not the client's "t=1"
