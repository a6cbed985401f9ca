"""Answers from the WSGI edge are byte for byte what Flask's path answers.

The same table of requests (every route, credentials styles, odd ids, bad input, misses
then hits, then misses while Amplitude fails in several ways) goes to two services on
one fake clock and one simulator: one with the edge (the default), one with
``EDGE_HITS=false``. Status line, every header but ``Date``, body, access line and
request metrics must match.
"""

from __future__ import annotations

import base64
import http.client
import json
from urllib.parse import urlsplit

import pytest

from app.observability import ACCESS_LOG
from testkit.clock import FakeClock
from tests.conftest import BRAZE_KEY, CURL_KEY

BASIC = "Basic " + base64.b64encode(f"braze:{BRAZE_KEY}".encode()).decode()
PATHS = [
    "/v1/users/user-42/recommendations/rec_home?limit=3",
    "/v1/users/user-42/recommendations?ids=rec_home,rec_email&limit=2",
    "/v1/users/user-42/recommendations",
    "/v1/users/user-42/recommendations/rec_cart",
    "/v1/users/user-42/properties?keys=first_name,plan",
    "/v1/users/user-42/properties",
    "/v1/users/user-42/properties/computed_favorite_category",
    "/v1/users/user-42/properties/nope",
    "/v1/users/user-42/cohorts",
    "/v1/users/user-42/cohorts/cohort_vip",
    "/v1/users/user-42/predictions/pred_churn",
    "/v1/users/user-42/predictions/pred_churn?type=pct",
    "/v1/users/user-42",
    "/v1/devices/dev-7/cohorts",
    "/v1/users/a%2Fb/cohorts",
    "/v1/users/caf%C3%A9/properties",
    "/v1/users/control-1/recommendations/rec_home?default=a,b&limit=1",
    "/v1/users/new-1/recommendations/rec_home?default=x",
    "/v1/users/new-1/recommendations/rec_home",
    "/v1/users/new-1/recommendations?ids=rec_home,rec_email&default=d",
    "/v1/users/unknown-1/cohorts",
    "/v1/users/null/cohorts",
    "/v1/users/user-42/recommendations/rec_home?limit=abc",
    "/v1/users/user-42/recommendations/rec_home?limit=1&limit=2",
    "/v1/users/user-42/cohorts?%zz",
    "/v1/users/user-42/cohorts/",
    "/v1/users//cohorts",
    "/v1/things/user-42/cohorts",
    "/v1/users/user-42/cohorts?unused=1",
]
#: Upstream failures, each met by a few fresh users (with and without a default) after the table.
FAULTS = [
    ("status", {"status": 500}),
    ("wrong_shape", {}),
    ("unauthorized", {}),
    ("rate_limited", {"retry_after": 30}),  # last: its back-off keeps Amplitude out of reach
]
FAULT_PATHS = [
    "/v1/users/{u}/recommendations/rec_home?default=a,b",
    "/v1/users/{u}/recommendations/rec_home",
    "/v1/users/{u}/cohorts",
]
CREDENTIALS = [
    {"Authorization": f"Bearer {BRAZE_KEY}"},
    {"X-API-Key": CURL_KEY},
    {"Authorization": BASIC},
    {},
    {"Authorization": "Bearer wrong-key-0000"},
]


def raw_get(url: str, path: str, headers: dict[str, str], method: str = "GET") -> tuple[str, list, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        kept = [(name, value) for name, value in response.getheaders() if name.lower() not in ("date", "server")]
        return f"{response.status} {response.reason}", kept, body
    finally:
        connection.close()


def access_lines(capsys) -> list[dict]:
    ACCESS_LOG.flush()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event":"request"' in line]
    return sorted(lines, key=lambda line: line["request_id"])


def test_every_answer_is_the_same_with_and_without_the_edge(make_service, sim, capsys):
    # Two clocks from the same start: each service lives the same (fake) time.
    # The circuit stays closed through the failures, so each one meets Amplitude.
    edge = make_service(clock=FakeClock(), BREAKER_FAILURE_THRESHOLD="100")
    flask = make_service(clock=FakeClock(), BREAKER_FAILURE_THRESHOLD="100", EDGE_HITS="false")
    answers: dict[str, list] = {"edge": [], "flask": []}
    lines: dict[str, list] = {}
    for name, service in (("edge", edge), ("flask", flask)):
        capsys.readouterr()
        sim.reset()
        for n, path in enumerate(PATHS):
            for k, credentials in enumerate(CREDENTIALS):
                for attempt in ("miss", "hit"):
                    headers = {**credentials, "X-Request-ID": f"t-{n}-{k}-{attempt}"}
                    answers[name].append((path, attempt, raw_get(service.url, path, headers)))
            head = {"X-API-Key": CURL_KEY, "X-Request-ID": f"t-{n}-head"}
            answers[name].append((path, "head", raw_get(service.url, path, head, "HEAD")))
        for n, (mode, options) in enumerate(FAULTS):
            sim.set_fault(mode, **options)
            for k, template in enumerate(FAULT_PATHS):
                path = template.format(u=f"fault-{n}-{k}")
                headers = {**CREDENTIALS[0], "X-Request-ID": f"f-{n}-{k}"}
                answers[name].append((path, mode, raw_get(service.url, path, headers)))
            sim.set_fault("none")
        lines[name] = access_lines(capsys)
    assert len(answers["edge"]) == len(answers["flask"])
    for mine, theirs in zip(answers["edge"], answers["flask"], strict=True):
        assert mine == theirs
    assert lines["edge"] == lines["flask"]
    hits = [answer for _, attempt, answer in answers["edge"] if attempt == "hit" and answer[0] == "200 OK"]
    faults = [json.loads(answer[2]) for _, attempt, answer in answers["edge"] if attempt in dict(FAULTS)]
    errors = {body.get("error") or body.get("reason") for body in faults}
    assert {"upstream_unavailable", "upstream_misconfigured", "rate_limited"} <= errors, faults
    assert any(body.get("fallback") for body in faults)
    assert len(hits) > 50  # the table really exercised cached answers...
    assert edge.extensions.edge.answered >= len(hits) // 2  # ...and the edge answered them
    assert flask.extensions.edge is None

    def request_metrics(service) -> list[str]:
        text = service.get("/metrics").text
        wanted = ("proxy_requests_total", "proxy_cache_lookups_total", "proxy_request_duration_seconds_count")
        return sorted(line for line in text.splitlines() if line.startswith(wanted))

    assert request_metrics(edge) == request_metrics(flask)


@pytest.mark.parametrize("edge_hits", ["true", "false"])
def test_hits_are_answered_either_way(make_service, sim, edge_hits):
    service = make_service(EDGE_HITS=edge_hits)
    assert service.get("/v1/users/user-1/cohorts").headers["X-Cache"] == "MISS"
    assert service.get("/v1/users/user-1/cohorts").headers["X-Cache"] == "HIT"
    assert sim.calls == 1
