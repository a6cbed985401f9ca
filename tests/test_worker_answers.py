"""Answers the gunicorn worker sends itself are byte for byte what gunicorn writes through WSGI.

:class:`app.http.worker.JsonErrorThreadWorker` asks the edge before gunicorn builds the
WSGI environ: for a kept answer, then for any other answer of the edge (a first answer, a
miss, a fallback, a typed error). Here two of those workers run in this process, each on
its own service (two fake clocks from the same start, one simulator): one sends the
edge's answers itself, the other has that switched off, so every request goes through
gunicorn's WSGI path. Each gets the same requests over real loopback connections,
through gunicorn's own parser and connection handling: the whole table of
``tests/test_edge.py`` (every route, credential styles, odd ids, bad input, misses, hits,
kept hits, HEAD, then Amplitude failing several ways). Every byte of every answer but the
``Date`` line, the access lines and the request metrics must match.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.workers.gthread import TConn

from app import create_app
from app.http.worker import JsonErrorThreadWorker, edge_answers_for
from testkit.clock import FakeClock
from tests.conftest import BRAZE_KEY, CURL_KEY, base_env
from tests.test_edge import CREDENTIALS, FAULT_PATHS, FAULTS, PATHS, access_lines

_DATE = re.compile(rb"\r\nDate: [^\r\n]*\r\n")


class _Loaded:
    """What gunicorn's worker asks for its app (``self.app.wsgi()``)."""

    def __init__(self, app: Any) -> None:
        self._app = app

    def wsgi(self) -> Any:
        return self._app


class InProcessWorker:
    """A real ``JsonErrorThreadWorker`` (no threads, no poller) serving one connection at a time."""

    def __init__(self, app: Any, *, kept: bool = True, **settings: Any) -> None:
        cfg = Config()
        cfg.set("keepalive", 75)
        for name, value in settings.items():
            cfg.set(name, value)
        self.worker = JsonErrorThreadWorker(1, os.getpid(), [], _Loaded(app), 30, cfg, Logger(cfg))
        self.worker.load_wsgi()
        if not kept:
            self.worker.edge = None
        self.listener = socket.create_server(("127.0.0.1", 0))

    @property
    def sent(self) -> int:
        """Answers the worker sent itself, without WSGI: kept ones and the edge's others."""
        edge = self.worker.edge
        return 0 if edge is None else edge.kept_sent + edge.answers_sent

    def serve(self, request: bytes) -> bytes:
        """Send *request* on a new connection; the worker handles it; the raw response comes back."""
        client = socket.create_connection(self.listener.getsockname(), timeout=10)
        accepted, address = self.listener.accept()
        try:
            client.sendall(request)
            conn = TConn(self.worker.cfg, accepted, address, self.listener.getsockname())
            self.worker.handle(conn)
            return read_response(client, head=request.startswith(b"HEAD "))
        finally:
            client.close()
            accepted.close()

    def close(self) -> None:
        self.listener.close()
        self.worker.tmp.close()


def read_response(client: socket.socket, *, head: bool) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return data
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"\r\nContent-Length: (\d+)", header)
    length = 0 if head or match is None else int(match.group(1))
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            break
        body += chunk
    return header + b"\r\n\r\n" + body


def request(path: str, headers: dict[str, str], method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: proxy.test", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def without_date(response: bytes) -> bytes:
    assert len(_DATE.findall(response)) == 1, response
    return _DATE.sub(b"\r\nDate: -\r\n", response)


@pytest.fixture
def workers(sim) -> Iterator[dict[str, tuple[Any, InProcessWorker, FakeClock]]]:
    built: dict[str, tuple[Any, InProcessWorker, FakeClock]] = {}
    for name, kept in (("worker", True), ("wsgi", False)):
        clock = FakeClock()
        app = create_app(environ=base_env(sim, BREAKER_FAILURE_THRESHOLD="100", CACHE_TTL_SECONDS="3600"), clock=clock)
        built[name] = (app, InProcessWorker(app, kept=kept), clock)
    yield built
    for app, worker, _ in built.values():
        worker.close()
        app.extensions["profile_proxy"].close()


def test_every_answer_is_the_same_whether_the_worker_or_wsgi_sends_it(workers, sim, capsys):
    answers: dict[str, list[tuple[str, str, bytes]]] = {}
    lines: dict[str, list] = {}
    for name, (_, worker, clock) in workers.items():
        capsys.readouterr()
        sim.reset()
        answers[name] = []
        for n, path in enumerate(PATHS):
            for k, credentials in enumerate(CREDENTIALS):
                for attempt in ("miss", "hit", "kept"):
                    clock.advance(3)  # Age and max-age move on between the attempts
                    headers = {**credentials, "X-Request-ID": f"t-{n}-{k}-{attempt}"}
                    answers[name].append((path, attempt, worker.serve(request(path, headers))))
            head = {"X-API-Key": CURL_KEY, "X-Request-ID": f"t-{n}-head"}
            answers[name].append((path, "head", worker.serve(request(path, head, "HEAD"))))
        for n, (mode, options) in enumerate(FAULTS):
            sim.set_fault(mode, **options)
            for k, template in enumerate(FAULT_PATHS):
                path = template.format(u=f"fault-{n}-{k}")
                headers = {**CREDENTIALS[0], "X-Request-ID": f"f-{n}-{k}"}
                answers[name].append((path, mode, worker.serve(request(path, headers))))
            sim.set_fault("none")
        lines[name] = access_lines(capsys)

    for (path, attempt, mine), (_, _, theirs) in zip(answers["worker"], answers["wsgi"], strict=True):
        assert without_date(mine) == without_date(theirs), (path, attempt)
    assert lines["worker"] == lines["wsgi"]
    kept_hits = [a for _, attempt, a in answers["worker"] if attempt == "kept" and a.startswith(b"HTTP/1.1 200 ")]
    data = [a for _, _, a in answers["worker"] if b"\r\nX-Cache: " in a]
    edge = workers["worker"][1].worker.edge
    assert len(kept_hits) > 50  # the table really reached kept answers...
    assert edge.kept_sent >= len(kept_hits)  # ...and the worker sent them whole, in one write
    assert edge.kept_sent + edge.answers_sent >= len(data)  # every data answer (misses too) skipped WSGI
    assert workers["wsgi"][1].sent == 0

    def request_metrics(app: Any) -> list[str]:
        text = app.test_client().get("/metrics").get_data(as_text=True)
        wanted = ("proxy_requests_total", "proxy_cache_lookups_total", "proxy_request_duration_seconds_count")
        return sorted(line for line in text.splitlines() if line.startswith(wanted))

    assert request_metrics(workers["worker"][0]) == request_metrics(workers["wsgi"][0])


COHORTS = "/v1/users/user-42/cohorts"
BEARER = {"Authorization": f"Bearer {BRAZE_KEY}"}
#: Requests for a kept answer that gunicorn and the app must still answer themselves.
UNUSUAL = {
    "connection close": request(COHORTS, {**BEARER, "Connection": "close"}),
    "HTTP/1.0": request(COHORTS, BEARER, version="HTTP/1.0"),
    "a body": request(COHORTS, {**BEARER, "Content-Length": "0"}),
    "two credentials": request(COHORTS, {**BEARER, "X-Request-ID": "a"}).replace(
        b"X-Request-ID: a", b"Authorization: Bearer other"
    ),
    "two request ids": request(COHORTS, {**BEARER, "X-Request-ID": "a"}).replace(
        b"X-Request-ID: a", b"X-Request-ID: a\r\nX-Request-ID: b"
    ),
    "absolute form": request("http://proxy.test" + COHORTS, BEARER),
    "expect": request(COHORTS, {**BEARER, "Expect": "100-continue"}),
}


@pytest.mark.parametrize("case", sorted(UNUSUAL))
def test_unusual_requests_go_through_wsgi_with_the_same_answer(workers, case):
    warm = request(COHORTS, BEARER)
    for _, worker, _ in workers.values():
        worker.serve(warm)
        assert b"\r\nX-Cache: HIT\r\n" in worker.serve(warm)  # kept: the next plain request could be sent
    fast, slow = workers["worker"][1], workers["wsgi"][1]
    sent = fast.sent
    mine, theirs = fast.serve(UNUSUAL[case]), slow.serve(UNUSUAL[case])
    assert fast.sent == sent  # gunicorn and the app answered it
    assert re.sub(rb"X-Request-ID: [^\r]*", b"", without_date(mine)) == re.sub(
        rb"X-Request-ID: [^\r]*", b"", without_date(theirs)
    )
    assert fast.serve(warm).startswith(b"HTTP/1.1 200 ") and fast.sent == sent + 1


def test_an_allowlist_behind_trusted_proxies_is_judged_by_the_app(sim):
    """With X-Forwarded-For deciding the client's address, the allowlist is Flask's to apply:
    the proxy's own address (allowed here) is not the client's."""
    app = create_app(
        environ=base_env(sim, ALLOWED_CIDRS="127.0.0.0/8", TRUSTED_PROXY_COUNT="1", FORWARDED_ALLOW_IPS="127.0.0.1"),
        clock=FakeClock(),
    )
    worker = InProcessWorker(app)
    try:
        inside = request(COHORTS, {**BEARER, "X-Forwarded-For": "127.0.0.9"})
        outside = request(COHORTS, {**BEARER, "X-Forwarded-For": "192.0.2.9"})
        for _ in range(3):
            assert worker.serve(inside).startswith(b"HTTP/1.1 200 ")
        assert worker.serve(outside).startswith(b"HTTP/1.1 403 ")
        assert worker.sent == 0
        assert sim.calls == 1
    finally:
        worker.close()
        app.extensions["profile_proxy"].close()


def test_only_the_service_is_answered_without_wsgi(sim):
    """The benchmark's bare Flask app, the service with the edge off, and gunicorn's own
    access log or a post_request hook (both want the WSGI response) all go through WSGI."""
    from bench.bare_app import app as bare

    cfg = Config()
    service = create_app(environ=base_env(sim), clock=FakeClock())
    no_edge = create_app(environ=base_env(sim, EDGE_HITS="false"), clock=FakeClock())
    try:
        assert edge_answers_for(service, cfg) is not None
        assert edge_answers_for(bare, cfg) is None
        assert edge_answers_for(no_edge, cfg) is None
        with_log = Config()
        with_log.set("accesslog", "-")
        assert edge_answers_for(service, with_log) is None
        with_hook = Config()
        with_hook.set("post_request", lambda worker, req, environ, resp: None)
        assert edge_answers_for(service, with_hook) is None
        no_keepalive = Config()
        no_keepalive.set("keepalive", 0)
        assert edge_answers_for(service, no_keepalive) is None
    finally:
        service.extensions["profile_proxy"].close()
        no_edge.extensions["profile_proxy"].close()
