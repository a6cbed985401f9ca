"""One request path in every configuration: what the shipped server does with odd requests.

Each of these once answered differently on a second request path the service kept beside
Flask's (a hand-written worker and a WSGI edge); there is now one path, and these hold it.
"""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest
import requests

from app.observability import ACCESS_LOG, request_id_from
from tests.conftest import BRAZE_KEY
from tests.front_support import raw_request

HOST = b"Host: 127.0.0.1\r\n"
AUTH = f"Authorization: Bearer {BRAZE_KEY}\r\n".encode()


def proxied(port: int, client: str, path: str) -> bytes:
    """A request as a PROXY-protocol (v1) front sends it for *client*, from loopback."""
    head = f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode()
    return head + f"GET {path} HTTP/1.1\r\n".encode() + HOST + AUTH + b"Connection: close\r\n\r\n"


def test_proxy_protocol_clients_are_judged_by_the_address_the_proxy_names(gunicorn_service, sim):
    """Behind a PROXY-protocol load balancer (gunicorn's ``--proxy-protocol``, trusted from
    loopback by ``proxy_allow_ips``), the allowlist judges the client the header names, not
    the balancer: an outsider sent through an allowed balancer gets 403 and costs no call."""
    service = gunicorn_service("--proxy-protocol", "v1", ALLOWED_CIDRS="203.0.113.0/24")
    outsider = raw_request(service.port, proxied(service.port, "198.51.100.9", "/v1/users/user-pp1/cohorts"))
    assert outsider.status == 403 and json.loads(outsider.body)["error"] == "forbidden"
    assert sim.calls == 0
    inside = raw_request(service.port, proxied(service.port, "203.0.113.7", "/v1/users/user-pp2/cohorts"))
    assert inside.status == 200 and json.loads(inside.body)["user_id"] == "user-pp2"
    assert sim.calls == 1


@pytest.mark.parametrize(
    ("target", "status", "user"),
    [
        # "://" inside a path is data, not the start of an absolute-form target.
        ("/v1/users/a://b/v1/users/user-42/recommendations/rec_home", 404, None),
        ("/v1/users/a%3A%2F%2Fb/cohorts", 200, "a://b"),
        # A real absolute-form target (RFC 9112 3.2.2) is routed on its path.
        ("http://127.0.0.1/v1/users/user-43/cohorts", 200, "user-43"),
    ],
)
def test_absolute_form_targets_are_recognised_only_when_the_target_does_not_start_with_a_slash(
    gunicorn_service, sim, target, status, user
):
    service = gunicorn_service()
    answer = raw_request(service.port, f"GET {target} HTTP/1.1\r\n".encode() + HOST + AUTH + b"\r\n")
    body = json.loads(answer.body)
    assert answer.status == status, body
    if user is not None:
        assert body["user_id"] == user


@pytest.mark.parametrize("header", ["abc\n", "abc\r\nX-Evil: 1", "a b", "", "x" * 129, "é"])
def test_a_request_id_is_honoured_only_when_all_of_it_is_sane(header):
    assert request_id_from(header) != header


@pytest.mark.parametrize("header", ["abc", "req-1:2.3_4", "x" * 128])
def test_a_sane_request_id_is_honoured(header):
    assert request_id_from(header) == header


def test_distinct_query_strings_do_not_grow_memory(service, sim):
    """Answers are not kept per path and query: a caller varying an ignored parameter over
    thousands of URLs (each one up to 8 KB) holds no memory in the service."""
    with requests.Session() as session:
        headers = {"Authorization": f"Bearer {BRAZE_KEY}"}
        url = f"{service.url}/v1/users/user-mem/cohorts"
        assert session.get(url, headers=headers, timeout=5).status_code == 200
        padding = "p" * 4000
        for n in range(50):  # the first answers allocate what every later one reuses
            session.get(f"{url}?n={n}&pad={padding}", headers=headers, timeout=5)
        ACCESS_LOG.flush()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(50, 1550):
                assert session.get(f"{url}?n={n}&pad={padding}", headers=headers, timeout=5).status_code == 200
            ACCESS_LOG.flush()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert sim.calls == 1
    # 1,500 URLs of 4 KB: kept answers keyed by them would hold more than 6 MB.
    assert grown < 1_000_000, f"{grown:,} bytes held after 1,500 distinct URLs"
