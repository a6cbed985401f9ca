"""The Amplitude User Profile API simulator: shapes, rules, limits, faults, records and control routes."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import requests

from app.cohorts.errors import CohortQueueUnavailable
from app.cohorts.receiver import Receipt
from app.cohorts.store import LocalCohortStore
from simulator import AmplitudeSimulator, RecordedRequest
from simulator.data import COHORTS, COMPUTATIONS, recommendation
from simulator.pushes import CohortPlan, CohortPusher
from testkit import wait_until
from testkit.clock import FakeClock
from tests.cohort_support import SECRET, SETTLE, CohortRig, serve_receiver  # noqa: F401 - a fixture

KEY = "sim-secret-key"
AUTH = {"Authorization": f"Api-Key {KEY}"}
RATE_LIMIT_BODY = (
    '{"error":"Number of requests per minute exceeds system limit. Contact Support if you need this limit raised"}'
)
UNKNOWN_BODY = '{"error":"User id and device id not seen before"}'
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[AmplitudeSimulator]:
    with AmplitudeSimulator(port=0) as sim:
        yield sim


@pytest.fixture
def sim(server: AmplitudeSimulator) -> Iterator[AmplitudeSimulator]:
    """The module's simulator, clean and unlimited for each test."""
    server.reset()
    server.rate_limit_per_minute = None
    server.latency_ms = 0
    server.unknown_user_status = 200
    yield server
    server.set_fault("none")


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def get(http: requests.Session, sim: AmplitudeSimulator, query: str = "", **kwargs: Any) -> requests.Response:
    kwargs.setdefault("headers", AUTH)
    kwargs.setdefault("timeout", 5)
    return http.get(f"{sim.url}/v1/userprofile?{query}", **kwargs)


def raw_exchange(sim: AmplitudeSimulator, query: str = "user_id=user-1", timeout: float = 5) -> socket.socket:
    """A raw socket that has sent one authorized profile request."""
    host, port = sim.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    request = f"GET /v1/userprofile?{query} HTTP/1.1\r\nHost: sim\r\nAuthorization: Api-Key {KEY}\r\n\r\n"
    sock.sendall(request.encode())
    return sock


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of the headers; returns (head, body bytes already read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, f"closed before the headers ended: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError("no Content-Length")


# -- shapes ---------------------------------------------------------------------------------

BASE_KEYS = {"recommendations", "user_id", "device_id", "amp_props", "cohort_ids"}


def test_no_flags_gives_nulls(sim, http):
    response = get(http, sim, "user_id=user-42")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    user = response.json()["userData"]
    assert set(response.json()) == {"userData"}
    assert set(user) == BASE_KEYS
    assert user["user_id"] == "user-42"
    assert user["amp_props"] is None and user["cohort_ids"] is None and user["recommendations"] is None


def test_user_properties(sim, http):
    props = get(http, sim, "user_id=user-42&get_amp_props=true").json()["userData"]["amp_props"]
    assert set(props) == {"first_name", "plan", "city", "lifetime_value", "sessions_30d"}
    assert props["plan"] in ("free", "pro", "enterprise")
    assert isinstance(props["lifetime_value"], float) and round(props["lifetime_value"], 2) == props["lifetime_value"]
    assert isinstance(props["sessions_30d"], int)


def test_computations_keyed_by_name_and_merged(sim, http):
    only = get(http, sim, "user_id=user-42&get_computations=true").json()["userData"]["amp_props"]
    assert set(only) == set(COMPUTATIONS.values())
    both = get(http, sim, "user_id=user-42&get_amp_props=true&get_computations=true").json()["userData"]["amp_props"]
    props = get(http, sim, "user_id=user-42&get_amp_props=true").json()["userData"]["amp_props"]
    assert both == {**props, **only}
    chosen = get(http, sim, "user_id=user-42&get_computations=true&comp_id=cmp_fav,cmp_nope").json()
    assert set(chosen["userData"]["amp_props"]) == {"computed_favorite_category"}
    assert get(http, sim, "user_id=user-42&get_computations=true&comp_id=nope").json()["userData"]["amp_props"] == {}


def test_cohorts(sim, http):
    cohorts = get(http, sim, "user_id=user-42&get_cohort_ids=true").json()["userData"]["cohort_ids"]
    assert "cohort_vip" in cohorts and set(cohorts) <= set(COHORTS)
    assert get(http, sim, "user_id=user-1&get_cohort_ids=true").json()["userData"]["cohort_ids"] == []


def test_recommendations(sim, http):
    user = get(http, sim, "user_id=user-42&get_recs=true&rec_id=rec_home,rec_nope,rec_email").json()["userData"]
    recs = user["recommendations"]
    assert [r["rec_id"] for r in recs] == ["rec_home", "rec_email"]
    home = recs[0]
    assert set(home) == {"rec_id", "child_rec_id", "items", "is_control", "recommendation_source", "last_updated"}
    assert home["child_rec_id"] == "rec_home-child" and home["recommendation_source"] == "model_v3"
    assert len(home["items"]) == 50 and all(i.startswith("sku-") and len(i) == 9 for i in home["items"])
    assert home["is_control"] is False
    assert abs(home["last_updated"] - 1_764_000_000) < 86_400 * 30
    assert recs[1]["items"] != home["items"]
    assert get(http, sim, "user_id=user-42&get_recs=true&rec_id=nope").json()["userData"]["recommendations"] == []


def test_rec_type_and_control_group(sim, http):
    def home(query):
        return get(http, sim, f"user_id={query}&get_recs=true&rec_id=rec_home").json()["userData"]["recommendations"][0]

    model = home("user-42")
    random = home("user-42&rec_type=random")
    assert random["recommendation_source"] == "random" and random["items"] != model["items"]
    assert home("user-42&rec_type=model")["items"] == model["items"]
    assert home("control-1")["is_control"] is True
    assert home("control-1&rec_type=model")["is_control"] is False
    assert home("control-1&rec_type=random")["is_control"] is False


def test_control_group_is_about_ten_percent():

    share = sum(recommendation("user", f"user-{n}", "rec_home", None)["is_control"] for n in range(1000)) / 1000
    assert 0.05 < share < 0.15


@pytest.mark.parametrize("user", ["new-1", "inactive-7"])
def test_new_and_inactive_users_have_no_recommendations(sim, http, user):
    response = get(http, sim, f"user_id={user}&get_recs=true&rec_id=rec_home&get_amp_props=true")
    assert response.status_code == 200
    user_data = response.json()["userData"]
    assert user_data["recommendations"] is None and user_data["amp_props"]


def test_propensities(sim, http):
    assert "propensity" not in get(http, sim, "user_id=user-42").json()["userData"]
    score = get(http, sim, "user_id=user-42&get_propensity=true&prediction_id=pred_churn,pred_buy").json()["userData"]
    props = score["propensities"]
    assert [(p["pred_id"], p["prop_type"]) for p in props] == [("pred_churn", "score"), ("pred_buy", "score")]
    assert all(isinstance(p["prop"], float) and 0 <= p["prop"] <= 1 and round(p["prop"], 4) == p["prop"] for p in props)
    assert score["propensity"] == props[0]["prop"]
    query = "user_id=user-42&get_propensity=true&prediction_id=pred_churn&propensity_type=pct"
    pct = get(http, sim, query).json()["userData"]
    assert pct["propensities"][0]["prop_type"] == "pct"
    assert isinstance(pct["propensity"], int) and 0 <= pct["propensity"] <= 100


def test_device_lookup_and_determinism(sim, http):
    first = get(http, sim, "device_id=device-abc&get_amp_props=true&get_cohort_ids=true").json()
    again = get(http, sim, "device_id=device-abc&get_amp_props=true&get_cohort_ids=true").json()
    assert first == again
    assert first["userData"]["device_id"] == "device-abc"
    assert first["userData"]["user_id"] is None or first["userData"]["user_id"].startswith("user-")
    assert get(http, sim, "device_id=device-1").json()["userData"]["user_id"] is None
    assert get(http, sim, "user_id=user-5").json()["userData"]["device_id"] is None
    assert get(http, sim, "user_id=user-42").json()["userData"]["device_id"].startswith("device-")


def test_all_flags_together(sim, http):
    query = (
        "user_id=user-42&get_amp_props=true&get_cohort_ids=true&get_computations=true&get_recs=true"
        "&rec_id=rec_home,rec_cart&get_propensity=true&prediction_id=p1"
    )
    user = get(http, sim, query).json()["userData"]
    assert set(user) == BASE_KEYS | {"propensity", "propensities"}
    assert all(user[key] is not None for key in user)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 404])
def test_unknown_user_status_is_configurable(sim, http, status):
    sim.unknown_user_status = status
    for query in ("user_id=unknown-1&get_amp_props=true", "device_id=unknown"):
        response = get(http, sim, query)
        assert response.status_code == status
        assert response.text == UNKNOWN_BODY


def test_auth_errors(sim, http):
    missing = get(http, sim, "user_id=user-1", headers={})
    assert (missing.status_code, missing.text) == (401, "Missing Api-Key in Authorization header")
    assert missing.headers["Content-Type"] == "text/plain"
    wrong = get(http, sim, "user_id=user-1", headers={"Authorization": "Api-Key nope"})
    assert (wrong.status_code, wrong.text) == (401, "Invalid Api-Key")
    assert sim.count_by_status() == {401: 2}


@pytest.mark.parametrize(
    "query",
    [
        "",
        "get_amp_props=true",
        "user_id=",
        "user_id=u&get_recs=true",
        "user_id=u&get_propensity=true",
        "user_id=u&get_recs=true&rec_id=rec_home&rec_type=other",
        "user_id=u&get_propensity=true&prediction_id=p&propensity_type=other",
    ],
)
def test_bad_requests(sim, http, query):
    response = get(http, sim, query)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert isinstance(response.json()["error"], str)


@pytest.mark.parametrize("path", ["/", "/v1/userprofile/", "/v2/userprofile?user_id=u"])
def test_wrong_path_is_an_empty_404(sim, http, path):
    response = http.get(sim.url + path, headers=AUTH, timeout=5)
    assert response.status_code == 404
    assert response.headers["Content-Length"] == "0" and response.content == b""
    assert sim.calls == 0


def test_rate_limit(sim, http):
    sim.rate_limit_per_minute = 5
    statuses = [get(http, sim, f"user_id=user-{n}").status_code for n in range(8)]
    assert statuses == [200] * 5 + [429] * 3
    refused = get(http, sim, "user_id=user-1")
    assert refused.text == RATE_LIMIT_BODY and refused.headers["Content-Type"] == "application/json"
    sim.rate_limit_per_minute = 7  # raised at runtime: the rejected ones did not use the window
    assert [get(http, sim, "user_id=user-1").status_code for _ in range(3)] == [200, 200, 429]
    assert sim.count_by_status() == {200: 7, 429: 5}
    sim.reset()
    assert get(http, sim, "user_id=user-1").status_code == 200


def test_latency(sim, http):
    sim.latency_ms = 150
    started = time.monotonic()
    assert get(http, sim, "user_id=user-1").status_code == 200
    assert time.monotonic() - started >= 0.15


# -- faults -----------------------------------------------------------------------------------


def test_fault_count_then_normal(sim, http):
    sim.set_fault("status", count=2, status=503)
    first, second, third = (get(http, sim, "user_id=user-1") for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.json() == {"error": "simulated 503 Service Unavailable"}
    sim.set_fault("status", status=500, body={"error": "boom"}, retry_after=3)
    for _ in range(2):
        response = get(http, sim, "user_id=user-1")
        assert (response.status_code, response.json(), response.headers["Retry-After"]) == (500, {"error": "boom"}, "3")
    sim.set_fault("none")
    assert get(http, sim, "user_id=user-1").status_code == 200


def test_fault_validation(sim):
    with pytest.raises(ValueError):
        sim.set_fault("explode")
    with pytest.raises(ValueError):
        sim.set_fault("slow", secs=1)
    with pytest.raises(ValueError):
        sim.set_fault("slow", count=0)


def test_slow(sim, http):
    sim.set_fault("slow", seconds=0.3)
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        get(http, sim, "user_id=user-1", timeout=0.1)
    assert get(http, sim, "user_id=user-1").status_code == 200  # a new connection, also slow
    assert time.monotonic() - started >= 0.1 + 0.3


def test_hang_sends_nothing_then_closes_and_blocks_no_one(sim, http):
    sim.set_fault("hang", count=1, seconds=3)
    with raw_exchange(sim) as sock:
        wait_until(lambda: sim.calls == 1)  # the hang has begun; others are still answered meanwhile
        started = time.monotonic()
        assert get(http, sim, "user_id=user-2").status_code == 200
        assert time.monotonic() - started < 2.5  # well before the hang ends
        assert read_all(sock) == b""
        assert time.monotonic() - started >= 2
    assert sim.count_by_status() == {0: 1, 200: 1}


def test_dribble(sim):
    sim.set_fault("dribble", interval=0.05)
    with raw_exchange(sim) as sock:
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert content_length(head) > 50 and rest == b""
        started = time.monotonic()
        first, second, third = sock.recv(100), sock.recv(100), sock.recv(100)
        assert (len(first), len(second), len(third)) == (1, 1, 1)
        assert first == b"{"
        assert time.monotonic() - started >= 0.08


def test_truncated(sim, http):
    sim.set_fault("truncated", count=1)
    with raw_exchange(sim, "user_id=user-1&get_amp_props=true") as sock:
        head, rest = read_head(sock)
        body = rest + read_all(sock)
    full = get(http, sim, "user_id=user-1&get_amp_props=true").content
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: application/json" in head
    assert content_length(head) == len(full)
    assert body == full[: len(full) // 2]


def test_reset_sends_rst(sim):
    sim.set_fault("reset")
    with raw_exchange(sim) as sock:
        with pytest.raises(ConnectionResetError):
            while sock.recv(1024):
                pass
    assert sim.count_by_status() == {0: 1}


def test_html_wrong_shape_unauthorized(sim, http):
    sim.set_fault("html", count=1)
    html = get(http, sim, "user_id=user-1")
    assert html.status_code == 200 and html.headers["Content-Type"].startswith("text/html") and "<html>" in html.text
    sim.set_fault("wrong_shape", count=1)
    assert get(http, sim, "user_id=user-1").json() == {"data": []}
    sim.set_fault("wrong_shape", count=1, body=[1, 2])
    assert get(http, sim, "user_id=user-1").json() == [1, 2]
    sim.set_fault("unauthorized", count=1)
    unauthorized = get(http, sim, "user_id=user-1")
    assert (unauthorized.status_code, unauthorized.text) == (401, "Invalid Api-Key")


@pytest.mark.parametrize(("retry_after", "header"), [(7, "7"), (None, None)])
def test_rate_limited_fault(sim, http, retry_after, header):
    sim.set_fault("rate_limited", count=1, retry_after=retry_after)
    response = get(http, sim, "user_id=user-1")
    assert (response.status_code, response.text) == (429, RATE_LIMIT_BODY)
    assert response.headers.get("Retry-After") == header


def test_oversized(sim, http):
    sim.set_fault("oversized", count=1, size_bytes=200_000)
    response = get(http, sim, "user_id=user-1&get_cohort_ids=true")
    assert response.status_code == 200 and len(response.content) >= 200_000
    user = response.json()["userData"]
    assert set(user) == BASE_KEYS and isinstance(user["amp_props"], dict) and user["cohort_ids"] is not None


def test_faults_need_no_key_but_slow_answers_normally(sim, http):
    sim.set_fault("status", count=1, status=502)
    assert get(http, sim, "user_id=user-1", headers={}).status_code == 502
    sim.set_fault("slow", count=1, seconds=0.01)
    assert get(http, sim, "user_id=user-1", headers={}).status_code == 401


# -- records ----------------------------------------------------------------------------------


def test_records_exact_params_and_headers(sim, http):
    weird = "a&b=c#d/e% f ü€"
    response = http.get(
        f"{sim.url}/v1/userprofile",
        params=[("user_id", weird), ("get_amp_props", "true"), ("empty", "")],
        headers={**AUTH, "X-Trace": "t1"},
        timeout=5,
    )
    assert response.json()["userData"]["user_id"] == weird
    (record,) = sim.requests
    assert isinstance(record, RecordedRequest)
    assert record.path == "/v1/userprofile"
    assert record.params == [("user_id", weird), ("get_amp_props", "true"), ("empty", "")]
    assert record.raw_query == f"user_id={quote(weird, safe='')}&get_amp_props=true&empty=".replace("%20", "+")
    assert record.headers["Authorization"] == AUTH["Authorization"] and record.headers["X-Trace"] == "t1"
    assert record.status == 200 and record.time <= time.monotonic()


def test_every_outcome_is_recorded(sim, http):
    get(http, sim, "user_id=user-1")
    get(http, sim, "user_id=user-1", headers={})
    get(http, sim, "")
    sim.set_fault("status", count=1, status=500)
    get(http, sim, "user_id=user-1")
    http.get(sim.url + "/_sim/stats", timeout=5)  # control routes are not recorded
    assert sim.calls == 4
    assert sim.count_by_status() == {200: 1, 401: 1, 400: 1, 500: 1}
    assert [r.status for r in sim.requests] == [200, 401, 400, 500]


def test_max_in_window(sim, http):
    for _ in range(3):
        get(http, sim, "user_id=user-1")
    time.sleep(1.0)  # deliberate spacing: the two groups are a second apart
    for _ in range(2):
        get(http, sim, "user_id=user-1")
    assert sim.max_in_window(60) == 5
    assert sim.max_in_window(0.95) == 3
    assert sim.max_in_window(0.000001) == 1
    sim.reset()
    assert (sim.calls, sim.requests, sim.count_by_status(), sim.max_in_window()) == (0, [], {}, 0)


# -- control over HTTP --------------------------------------------------------------------------


def test_http_control_routes(sim, http):
    get(http, sim, "user_id=user-1")
    get(http, sim, "user_id=user-1", headers={})
    stats = http.get(sim.url + "/_sim/stats", timeout=5).json()
    assert stats == {"calls": 2, "by_status": {"200": 1, "401": 1}, "max_in_60s": 2}

    # The window already holds the 200 (not the 401): a limit of 2 admits one more.
    config = {"latency_ms": 0, "rate_limit_per_minute": 2, "unknown_user_status": 404, "fault": {"mode": "none"}}
    answer = http.post(sim.url + "/_sim/config", json=config, timeout=5)
    assert answer.status_code == 200 and answer.json()["config"]["rate_limit_per_minute"] == 2
    assert (sim.rate_limit_per_minute, sim.unknown_user_status) == (2, 404)
    assert get(http, sim, "user_id=unknown-1").status_code == 404
    assert get(http, sim, "user_id=user-1").status_code == 429

    fault = {"fault": {"mode": "status", "count": 1, "status": 503}, "rate_limit_per_minute": 0}
    assert http.post(sim.url + "/_sim/config", json=fault, timeout=5).status_code == 200
    assert sim.rate_limit_per_minute is None
    assert get(http, sim, "user_id=user-1").status_code == 503
    assert get(http, sim, "user_id=user-1").status_code == 200

    for bad in ({"latency_ms": -1}, {"fault": {"mode": "nope"}}, {"typo": 1}, [1]):
        response = http.post(sim.url + "/_sim/config", json=bad, timeout=5)
        assert response.status_code == 400 and "error" in response.json()
    assert sim.unknown_user_status == 404  # a refused config changed nothing

    assert http.post(sim.url + "/_sim/reset", timeout=5).status_code == 200
    assert http.get(sim.url + "/_sim/stats", timeout=5).json() == {"calls": 0, "by_status": {}, "max_in_60s": 0}
    assert http.post(sim.url + "/_sim/nope", timeout=5).status_code == 404


def test_reset_config_restores_the_constructor_settings(http):
    with AmplitudeSimulator(rate_limit_per_minute=3, latency_ms=0, rec_ids={"rec_x"}) as own:
        own.rate_limit_per_minute, own.unknown_user_status = None, 404
        own.set_fault("status", status=500)
        own.reset(reset_config=True)
        assert (own.rate_limit_per_minute, own.unknown_user_status, own.fault.mode) == (3, 200, "none")
        recs = get(http, own, "user_id=user-1&get_recs=true&rec_id=rec_home,rec_x").json()["userData"]
        assert [r["rec_id"] for r in recs["recommendations"]] == ["rec_x"]


def test_stop_ends_open_connections_and_waiting_faults():
    own = AmplitudeSimulator().start()
    own.set_fault("hang", seconds=30)
    with raw_exchange(own) as sock:
        wait_until(lambda: own.calls == 1)
        started = time.monotonic()
        own.stop()
        assert read_all(sock) == b""
        assert time.monotonic() - started < 2


def test_many_requests_are_quick(sim, http):
    started = time.monotonic()
    for n in range(300):
        assert get(http, sim, f"user_id=user-{n % 30}&get_amp_props=true&get_recs=true&rec_id=rec_home").ok
    # A Nagle stall (40 ms a request) would take 12 s; without one this takes well under a second.
    assert time.monotonic() - started < 8


def test_command_line():
    env = {"PATH": "/usr/bin:/bin", "SIMULATOR_SECRET_KEY": "cli-key"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", str(port), "--rate-limit", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        with requests.get(
            f"http://127.0.0.1:{port}/v1/userprofile?user_id=user-1",
            headers={"Authorization": "Api-Key cli-key"},
            timeout=5,
        ) as response:
            assert response.status_code == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0, stderr
    assert stderr == ""


def test_hold_keeps_requests_in_flight_until_release(sim, http):
    sim.hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(get, http, sim, "user_id=user-1")
        wait_until(lambda: sim.calls == 1)  # received and counted, not answered
        assert not pending.done()
        sim.release()
        assert pending.result(timeout=10).status_code == 200


# -- cohort webhooks pushes ------------------------------------------------------------------


def test_the_push_plan_agrees_with_the_profile_api(sim, http):
    plan = CohortPlan("cohort_vip", users=400, properties=False)
    for user in plan.population[::4]:
        cohorts = get(http, sim, f"user_id={user}&get_cohort_ids=true").json()["userData"]["cohort_ids"]
        assert ("cohort_vip" in cohorts) == (user in plan.truth) == plan.member(user)
    # The full sync, then the changes in order, end exactly at the truth.
    members: set[str] = set()
    for sync in plan.syncs():
        for batch in sync:
            members = members | set(batch.user_ids) if batch.in_cohort else members - set(batch.user_ids)
    assert members == plan.truth and plan.joiners and plan.leavers and plan.flappers


def test_deliveries_repeat_reorder_and_hold_back_like_amplitude():
    plan = CohortPlan("cohort_vip", users=4000, batch_size=300, properties=False)
    full, changes, again = plan.syncs()
    order = plan.deliveries()
    assert len(order) > len({batch.message_id for batch in order}) == len(full) + len(changes) + len(again)
    assert order[-1] == full[-1]  # a full-sync batch after every change
    assert order.index(again[0]) < min(order.index(batch) for batch in changes)  # T2 before T1
    assert max(len(batch.user_ids) for batch in order) == 300
    payload = orjson.loads(order[0].body)
    assert set(payload) == {"cohort_name", "cohort_id", "in_cohort", "computed_time", "message_id", "users"}
    assert payload["computed_time"] == str(plan.times[0]) and "::enter::" in payload["message_id"]


class _Recorder(BaseHTTPRequestHandler):
    """A receiver that records each POST and answers the next status of its script (then 200)."""

    statuses: list[int] = []
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers.items()), body))
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"statuses": [], "received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", handler
    server.shutdown()
    server.server_close()


def test_a_push_carries_amplitudes_headers_and_is_retried_until_a_200(recorder):
    url, handler = recorder
    handler.statuses = [503, 500]
    pauses: list[float] = []
    pusher = CohortPusher(url, "push-secret-0000000001", sleep=pauses.append)
    batch = CohortPlan("cohort_vip", users=50).syncs()[0][0]
    result = pusher.push(batch)
    assert (result.status, result.attempts, pauses) == (200, 3, [0.1, 0.2])
    headers, body = handler.received[-1]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Amplitude/Webhook/1.0"
    assert headers["Authorization"] == "Bearer push-secret-0000000001"
    assert body == batch.body and [sent for _, sent in handler.received] == [batch.body] * 3  # the same message
    pusher.close()


def test_retries_are_bounded(recorder):
    url, handler = recorder
    handler.statuses = [500] * 10
    pauses: list[float] = []
    pusher = CohortPusher(url, "push-secret-0000000001", attempts=5, max_backoff=0.5, sleep=pauses.append)
    result = pusher.push(CohortPlan("cohort_vip", users=50).syncs()[0][0])
    assert (result.status, result.attempts, pauses) == (500, 5, [0.1, 0.2, 0.4, 0.5])
    assert pusher.statuses == [500] * 5
    pusher.close()


def test_the_simulator_keeps_a_cohort_by_pushes_that_agree_with_its_profile_api(http, serve_receiver):  # noqa: F811
    clock = FakeClock(start=time.time())  # the batches carry real computed times
    rig = CohortRig(LocalCohortStore(clock), clock)
    rig.membership.open()
    flaky = {"left": 2}
    receive = rig.receiver.receive

    def receive_after_two_failures(body: bytes, authorization: str | None) -> Receipt:
        if flaky["left"]:
            flaky["left"] -= 1
            raise CohortQueueUnavailable()  # Amplitude retries the same message
        return receive(body, authorization)

    rig.receiver.receive = receive_after_two_failures  # type: ignore[method-assign]
    served = serve_receiver(rig.receiver)
    with AmplitudeSimulator(port=0, rate_limit_per_minute=None) as own:
        pushes = own.push_cohorts(served.url, SECRET, ("cohort_vip",), users=3000)
        plan = pushes.plans[0]
        expected = len(plan.deliveries())
        wait_until(lambda: len(pushes.results) == expected, timeout=30)
        assert all(result.status == 200 for result in pushes.results)
        report = own.stats()["pushes"][0]
        assert report == {"batches": expected, "delivered": expected, "failed": 0, "attempts": expected + 2}
        assert rig.receiver.counts["duplicate"] > 0
        rig.apply_all()
        clock.advance(SETTLE)
        answers = rig.answers("cohort_vip", plan.population)
        assert answers == {user: user in plan.truth for user in plan.population}
        for user in plan.population[::50]:
            query = f"user_id={user}&get_cohort_ids=true"
            cohorts = get(http, own, query).json()["userData"]["cohort_ids"]
            assert ("cohort_vip" in cohorts) is answers[user]


def test_command_line_pushes_to_a_receiver(serve_receiver):  # noqa: F811
    clock = FakeClock(start=time.time())
    rig = CohortRig(LocalCohortStore(clock), clock)
    served = serve_receiver(rig.receiver)
    env = {"PATH": "/usr/bin:/bin", "SIMULATOR_PUSH_SECRET": SECRET}
    argv = [sys.executable, "-m", "simulator", "--port", "0", "--push-url", served.url, "--push-users", "2000"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: rig.receiver.counts["queued"] >= 3, timeout=30)
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert "pushing cohorts cohort_vip to" in stdout
    assert rig.receiver.counts["refused:unauthorized"] == 0


def test_command_line_push_needs_a_secret():
    argv = [sys.executable, "-m", "simulator", "--port", "0", "--push-url", "http://127.0.0.1:9/hook"]
    done = subprocess.run(argv, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--push-secret" in done.stderr
