"""The security requirements, as a caller or an operator would notice them.

Network allowlist and trusted proxies, named caller keys and rotation, the brake on
failed authentications, the admin key for /metrics, the per-caller miss cap and the
bounded cache, what never leaks (Amplitude key, caller keys), redirects that are never
followed, the response headers, and the non-root image.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from app.observability import ACCESS_LOG, JsonFormatter
from app.settings import SettingsError, load_settings
from testkit import wait_until
from tests.conftest import BRAZE_KEY, CURL_KEY, ROOT, SIM_SECRET

RETRYABLE = re.compile(r"^[1-9][0-9]*$")


# -- helpers ---------------------------------------------------------------------------------


def raw_get(url: str, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    """Send *target* exactly as given (no client-side normalisation); return (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def access_records(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The JSON access lines written to stdout so far (the access log bypasses ``logging``)."""
    ACCESS_LOG.flush()
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def everything_logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """Every log record (message, JSON rendering, exception text) and everything on stdout/stderr."""
    ACCESS_LOG.flush()
    formatter = JsonFormatter()
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(formatter.format(record))
        parts.append(repr(record.args))
        parts.append(str(record.exc_text or ""))
        parts.append(repr(getattr(record, "fields", "")))
    captured = capsys.readouterr()
    parts += [caplog.text, captured.out, captured.err]
    return "\n".join(parts)


def response_text(response: requests.Response) -> str:
    """Status line, every header and the body, as one string to search for secrets."""
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    return f"{response.status_code} {response.reason}\n{headers}\n\n{response.text}"


def assert_json_error(response: requests.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert body["error"] == error and body["message"]
    return body


# -- 1. network allowlist and trusted proxies ----------------------------------------------------


def test_address_outside_allowlist_is_403_before_any_other_work(make_service, sim):
    service = make_service(ALLOWED_CIDRS="10.0.0.0/8")
    attempts = [
        service.get("/v1/users/user-1/properties"),  # a valid key
        service.get("/v1/users/user-2/cohorts", key=None),  # no credentials: still 403, not 401
        service.get("/v1/users/user-3/cohorts", key="wrong-key-0000"),
        service.get("/v1/users/%00/cohorts"),  # invalid input: still 403, not 400
        service.get("/v1/users/user-4/recommendations/rec_home?default=a,b"),  # no fallback either
        service.get("/metrics"),
        service.get("/no-such-route"),
    ]
    for response in attempts:
        body = assert_json_error(response, 403, "forbidden")
        assert set(body) == {"error", "message"}
        assert response.headers["Cache-Control"] == "no-store"
    assert sim.calls == 0
    # Nothing was judged about the key: no authentication failure was counted.
    exposition, _ = service.extensions.metrics.render()
    assert b"proxy_auth_failures_total{" not in exposition
    # Probes stay reachable from anywhere, without a key.
    assert service.get("/healthz", key=None).status_code == 200
    assert service.get("/readyz", key=None).status_code == 200
    assert sim.calls == 0


def test_allowed_address_passes(make_service, sim):
    service = make_service(ALLOWED_CIDRS="10.0.0.0/8,127.0.0.1/32")
    response = service.get("/v1/users/user-1/properties")
    assert response.status_code == 200
    assert response.json()["user_id"] == "user-1"
    assert sim.calls == 1


def test_trusted_proxy_entry_decides_and_left_entries_are_ignored(make_service, sim):
    """The test client plays the one trusted proxy: it appends the client's address on the right."""
    service = make_service(TRUSTED_PROXY_COUNT=1, ALLOWED_CIDRS="203.0.113.0/24")
    allowed = service.get("/v1/users/user-1/cohorts", headers={"X-Forwarded-For": "203.0.113.7"})
    assert allowed.status_code == 200
    assert sim.calls == 1
    # A client-spoofed allowed address on the left, the proxy-appended real one on the right.
    spoofed = service.get("/v1/users/user-2/cohorts", headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.1"})
    assert_json_error(spoofed, 403, "forbidden")
    # No proxy entry at all: the connection's own address (127.0.0.1) is judged.
    direct = service.get("/v1/users/user-3/cohorts")
    assert_json_error(direct, 403, "forbidden")
    assert sim.calls == 1


def test_spoofed_forwarded_for_is_ignored_without_trusted_proxies(make_service, sim):
    service = make_service(ALLOWED_CIDRS="203.0.113.0/24")  # TRUSTED_PROXY_COUNT defaults to 0
    for header in ("203.0.113.7", "203.0.113.7, 203.0.113.8", "203.0.113.7,127.0.0.1"):
        response = service.get("/v1/users/user-1/cohorts", headers={"X-Forwarded-For": header})
        assert_json_error(response, 403, "forbidden")
    response = service.get(
        "/v1/users/user-1/cohorts", headers={"Forwarded": "for=203.0.113.7", "X-Real-IP": "203.0.113.7"}
    )
    assert_json_error(response, 403, "forbidden")
    assert sim.calls == 0


def test_auth_brake_counts_the_client_address_behind_the_trusted_proxy(make_service, sim):
    service = make_service(TRUSTED_PROXY_COUNT=1, AUTH_FAILURE_LIMIT_PER_MINUTE=3)
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    for _ in range(3):
        assert service.get("/v1/users/user-1/cohorts", key="guess-0000000", headers=attacker).status_code == 401
    assert service.get("/v1/users/user-1/cohorts", key="guess-0000001", headers=attacker).status_code == 429
    # Another client behind the same proxy is not braked by the attacker's failures.
    other = {"X-Forwarded-For": "198.51.100.77"}
    assert service.get("/v1/users/user-1/cohorts", key="typo-0000000", headers=other).status_code == 401
    assert service.get("/v1/users/user-1/cohorts", headers=other).status_code == 200


# -- 2. named caller keys and rotation --------------------------------------------------------------

OLD_KEY = "rotation-old-key-7f3a91c2"
NEW_KEY = "rotation-new-key-b84e0d55"


def test_two_named_keys_work_and_only_their_names_are_logged(make_service, sim, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    service = make_service(PROXY_API_KEYS=f"braze-old:{OLD_KEY},braze-new:{NEW_KEY}")
    capsys.readouterr()
    assert service.get("/v1/users/user-1/cohorts", key=OLD_KEY).status_code == 200
    assert service.get("/v1/users/user-2/cohorts", headers={"X-API-Key": NEW_KEY}).status_code == 200
    assert requests.get(service.url + "/v1/users/user-3/cohorts", auth=("braze", NEW_KEY), timeout=5).status_code == 200
    assert service.get("/v1/users/user-4/cohorts", key="not-a-key-at-all").status_code == 401
    metrics = service.get("/metrics", key=NEW_KEY)
    assert metrics.status_code == 200
    records = access_records(capsys)
    callers = [record["caller"] for record in records if record["route"] == "/v1/{kind}/{id}/cohorts"]
    assert callers == ["braze-old", "braze-new", "braze-new", None]
    assert 'caller="braze-old"' in metrics.text and 'caller="braze-new"' in metrics.text
    logged = json.dumps(records) + everything_logged(caplog, capsys)
    for secret in (OLD_KEY, NEW_KEY, "not-a-key-at-all", SIM_SECRET):
        assert secret not in logged
        assert secret not in metrics.text


def test_a_removed_key_no_longer_works(make_service, sim):
    before = make_service(PROXY_API_KEYS=f"braze-old:{OLD_KEY},braze-new:{NEW_KEY}")
    assert before.get("/v1/users/user-1/cohorts", key=OLD_KEY).status_code == 200
    after = make_service(PROXY_API_KEYS=f"braze-new:{NEW_KEY}")
    for style in ({"Authorization": f"Bearer {OLD_KEY}"}, {"X-API-Key": OLD_KEY}):
        response = after.get("/v1/users/user-2/cohorts", key=None, headers=style)
        assert_json_error(response, 401, "unauthorized")
    response = requests.get(after.url + "/v1/users/user-2/cohorts", auth=("braze", OLD_KEY), timeout=5)
    assert_json_error(response, 401, "unauthorized")
    assert after.get("/v1/users/user-2/cohorts", key=NEW_KEY).status_code == 200
    assert sim.calls == 2


def test_a_key_that_is_a_prefix_or_extension_of_a_real_key_fails(service, sim):
    for near_miss in (BRAZE_KEY[:-1], BRAZE_KEY + "0", BRAZE_KEY.upper(), " " + BRAZE_KEY + "x", f"braze:{BRAZE_KEY}"):
        assert service.get("/v1/users/user-1/cohorts", key=near_miss).status_code == 401
    assert sim.calls == 0


# -- 3. failed authentications: counted, logged without the value, braked -------------------------


def test_auth_failures_are_counted_logged_without_value_and_braked(make_service, sim, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    service = make_service(AUTH_FAILURE_LIMIT_PER_MINUTE=3)
    presented = "wrong-but-plausible-key-5e1d"
    for _ in range(2):
        assert_json_error(service.get("/v1/users/user-1/cohorts", key=presented), 401, "unauthorized")
    assert_json_error(service.get("/v1/users/user-1/cohorts", key=None), 401, "unauthorized")
    # Past the limit, failures from this address are refused at once...
    for attempt in (
        service.get("/v1/users/user-1/cohorts", key=presented),
        service.get("/v1/users/user-1/cohorts", key=None),
        service.get("/metrics", key=presented),
    ):
        body = assert_json_error(attempt, 429, "too_many_auth_failures")
        assert RETRYABLE.match(attempt.headers["Retry-After"])
        assert int(attempt.headers["Retry-After"]) <= 60
        assert body.get("retry_after") in (None, int(attempt.headers["Retry-After"]))
        assert attempt.headers["Cache-Control"] == "no-store"
    # ...while the right key from the same address still works.
    ok = service.get("/v1/users/user-1/cohorts")
    assert ok.status_code == 200
    assert sim.calls == 1
    metrics = service.get("/metrics").text
    assert 'proxy_auth_failures_total{reason="invalid"} 2.0' in metrics
    assert 'proxy_auth_failures_total{reason="missing"} 1.0' in metrics
    assert 'proxy_auth_failures_total{reason="braked"} 3.0' in metrics
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "authentication failed" in r.getMessage()]
    assert len(warnings) == 3
    assert all("127.0.0.1" in r.getMessage() for r in warnings)
    logged = everything_logged(caplog, capsys)
    assert presented not in logged and presented not in metrics
    assert BRAZE_KEY not in logged and BRAZE_KEY not in metrics


def test_auth_brake_zero_turns_it_off(make_service):
    service = make_service(AUTH_FAILURE_LIMIT_PER_MINUTE=0)
    statuses = {service.get("/v1/users/user-1/cohorts", key=f"wrong-key-{n:04d}").status_code for n in range(8)}
    assert statuses == {401}


# -- 4. /metrics and the admin key --------------------------------------------------------------------

ADMIN_KEY = "ops-key-12345"


def test_metrics_need_the_admin_key_when_admin_keys_are_set(make_service, sim):
    service = make_service(ADMIN_API_KEYS=f"ops:{ADMIN_KEY}")
    assert service.get("/v1/users/user-1/cohorts").status_code == 200
    assert_json_error(service.get("/metrics"), 401, "unauthorized")  # Braze's caller key
    assert_json_error(service.get("/metrics", key=CURL_KEY), 401, "unauthorized")
    assert_json_error(service.get("/metrics", key=None), 401, "unauthorized")
    admin = service.get("/metrics", key=ADMIN_KEY)
    assert admin.status_code == 200 and "proxy_requests_total" in admin.text
    assert ADMIN_KEY not in admin.text
    # The admin key is for metrics only: it does not read profiles.
    assert_json_error(service.get("/v1/users/user-2/cohorts", key=ADMIN_KEY), 401, "unauthorized")
    assert sim.calls == 1


def test_metrics_accept_a_caller_key_without_admin_keys(service):
    assert service.get("/metrics").status_code == 200
    assert service.get("/metrics", key=CURL_KEY).status_code == 200
    assert_json_error(service.get("/metrics", key=None), 401, "unauthorized")


def test_metrics_carry_no_user_ids_or_path_values(service, capsys):
    for path in (
        "/v1/users/user-secretive-123/properties",
        "/v1/users/user-secretive-123/properties/prop-secretive-456",
        "/v1/devices/device-secretive-321/cohorts/cohort-secretive-789",
        "/v1/users/user-secretive-123/recommendations/rec-secretive-000",
        "/v1/users/unknown-secretive-654/cohorts",
        "/v1/users/user-secretive-123/predictions/pred-secretive-111",
        "/v1/users/user-secretive-123/cohorts?limit=1&limit=2",
        "/v1/users/user-secretive-123/nothing-secretive-here",
    ):
        service.get(path)
    text = service.get("/metrics").text
    assert "secretive" not in text
    assert "secretive" not in json.dumps(access_records(capsys))


# -- 5. one caller's misses are capped; the cache is bounded -------------------------------------------


def test_one_key_streaming_random_ids_is_capped_while_another_key_is_not(make_service, sim):
    service = make_service(CALLER_MISS_LIMIT_PER_MINUTE=3)
    statuses, ids = [], []
    for _ in range(15):
        ids.append(f"unknown-{uuid.uuid4().hex}")
        response = service.get(f"/v1/users/{ids[-1]}/cohorts")
        statuses.append(response.status_code)
        if response.status_code == 503:
            body = assert_json_error(response, 503, "rate_limited")
            assert RETRYABLE.match(response.headers["Retry-After"])
            assert body["retry_after"] == int(response.headers["Retry-After"])
            assert response.headers["Cache-Control"] == "no-store"
        else:
            assert_json_error(response, 404, "user_not_found")
    braze_calls = sim.calls
    assert 1 <= braze_calls <= 3
    assert statuses.count(404) == braze_calls and statuses.count(503) == 15 - braze_calls
    # Known random ids from the same key are refused too.
    assert service.get(f"/v1/users/user-{uuid.uuid4().hex}/properties").status_code == 503
    # With default= the template still renders, without an upstream call.
    fallback = service.get(f"/v1/users/user-{uuid.uuid4().hex}/recommendations/rec_home?default=sku-1,sku-2")
    assert fallback.status_code == 200
    body = fallback.json()
    assert body["fallback"] is True and body["reason"] == "rate_limited" and body["items"] == ["sku-1", "sku-2"]
    # What was already fetched is still answered from the cache, without a call.
    assert_json_error(service.get(f"/v1/users/{ids[0]}/cohorts"), 404, "user_not_found")
    assert sim.calls == braze_calls
    # Another key still gets upstream calls: its allowance is its own.
    other = service.get(f"/v1/users/user-curl-{uuid.uuid4().hex}/cohorts", key=CURL_KEY)
    assert other.status_code == 200 and other.headers["X-Cache"] == "MISS"
    assert sim.calls == braze_calls + 1
    assert sim.requests[-1].params[0][1].startswith("user-curl-")


def test_cache_stays_within_its_bound_under_random_ids(make_service, sim):
    service = make_service(CACHE_MAX_ENTRIES=50)
    statuses = set()
    started = time.monotonic()
    for n in range(300):
        prefix = "unknown" if n % 3 == 0 else "user"
        statuses.add(service.get(f"/v1/users/{prefix}-{uuid.uuid4().hex}/cohorts").status_code)
        assert len(service.extensions.profile_store) <= 50
        assert time.monotonic() - started < 30
    assert statuses <= {200, 404}
    assert len(service.extensions.profile_store) <= 50
    assert sim.calls == 300


# -- 6. what never leaks ------------------------------------------------------------------------------

FAULTS = [
    pytest.param("status", {"status": 500}, 503, id="status-500"),
    pytest.param("status", {"status": 403, "body": {"error": "forbidden"}}, 503, id="status-403"),
    pytest.param("unauthorized", {}, 502, id="unauthorized"),
    pytest.param("html", {}, 503, id="html"),
    pytest.param("reset", {}, 503, id="reset"),
    pytest.param("truncated", {}, 503, id="truncated"),
    pytest.param("wrong_shape", {}, 503, id="wrong-shape"),
]


@pytest.mark.parametrize(("mode", "options", "status"), FAULTS)
def test_secrets_never_leak_under_upstream_failures(make_service, sim, caplog, capsys, mode, options, status):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    service = make_service(BREAKER_FAILURE_THRESHOLD=1000)
    sim.set_fault(mode, **options)
    responses = [
        service.get("/v1/users/user-leak-1/properties"),
        service.get("/v1/users/user-leak-2/recommendations/rec_home?default=sku-1", headers={"X-API-Key": CURL_KEY}),
        requests.get(service.url + "/v1/devices/device-leak-3/cohorts", auth=("braze", BRAZE_KEY), timeout=5),
        service.get("/v1/users/user-leak-4", key="wrong-key-leak-0000"),
        service.get("/metrics"),
    ]
    assert responses[0].status_code == status
    assert responses[0].json()["error"] == ("upstream_misconfigured" if status == 502 else "upstream_unavailable")
    assert responses[1].status_code == 200 and responses[1].json()["fallback"] is True
    assert responses[3].status_code == 401
    seen = "\n".join(map(response_text, responses))
    seen += "\n" + repr(service.extensions.settings) + "\n" + everything_logged(caplog, capsys)
    for secret in (SIM_SECRET, BRAZE_KEY, CURL_KEY, "wrong-key-leak-0000"):
        assert secret not in seen, f"{secret!r} leaked"
    # The Amplitude key went to Amplitude, in the Authorization header only; caller keys never did.
    assert sim.calls >= 3
    for recorded in sim.requests:
        assert recorded.path == "/v1/userprofile"
        assert recorded.headers.get("Authorization") == f"Api-Key {SIM_SECRET}"
        upstream = recorded.raw_query + json.dumps(recorded.headers)
        assert SIM_SECRET not in recorded.raw_query
        assert BRAZE_KEY not in upstream and CURL_KEY not in upstream
        assert "X-API-Key" not in recorded.headers and "x-api-key" not in recorded.headers


def test_settings_repr_and_errors_never_show_secrets(make_service):
    service = make_service(ADMIN_API_KEYS=f"ops:{ADMIN_KEY}", REDIS_URL="redis://:redis-pass-9d8c@127.0.0.1:1/0")
    shown = repr(service.extensions.settings) + str(service.extensions.settings)
    for secret in (SIM_SECRET, BRAZE_KEY, CURL_KEY, ADMIN_KEY, "redis-pass-9d8c"):
        assert secret not in shown
    assert "<redacted>" in shown
    # A key's own repr shows its name only.
    assert "braze" in repr(service.extensions.settings.caller_keys[0])
    assert BRAZE_KEY not in repr(service.extensions.settings.caller_keys[0])
    base = {"AMPLITUDE_SECRET_KEY": SIM_SECRET, "PROXY_API_KEYS": f"braze:{BRAZE_KEY}"}
    bad = [
        {"PROXY_API_KEYS": "braze:short7"},
        {"PROXY_API_KEYS": f"braze:{BRAZE_KEY},curl:has space-in-key"},
        {"PROXY_API_KEYS": f"braze:{BRAZE_KEY},braze:{CURL_KEY}"},
        {"ADMIN_API_KEYS": "ops:tiny"},
        {"AMPLITUDE_API_URL": f"https://user:{SIM_SECRET}@not a url"},
        {"AMPLITUDE_API_URL": "http://profile-api.example.com"},
        {"REDIS_URL": f"http://:{SIM_SECRET}@example.com"},
    ]
    for override in bad:
        with pytest.raises(SettingsError) as caught:
            load_settings({**base, **override})
        message = str(caught.value)
        for secret in (SIM_SECRET, BRAZE_KEY, CURL_KEY, "short7", "has space-in-key", "tiny"):
            assert secret not in message, (override, message)


def test_secrets_never_appear_in_gunicorn_output(gunicorn_service, sim):
    service = gunicorn_service(LOG_LEVEL="DEBUG", BREAKER_FAILURE_THRESHOLD=1000)
    headers = {"Authorization": f"Bearer {BRAZE_KEY}"}
    seen = []
    for n, (mode, options) in enumerate(
        [("none", {}), ("status", {"status": 500}), ("unauthorized", {}), ("html", {}), ("reset", {})]
    ):
        sim.set_fault(mode, **options)
        seen.append(requests.get(f"{service.url}/v1/users/user-g{n}/properties", headers=headers, timeout=5))
    seen.append(
        requests.get(f"{service.url}/v1/users/user-g/cohorts", headers={"X-API-Key": "wrong-gk-0000"}, timeout=5)
    )
    seen.append(requests.get(f"{service.url}/metrics", headers={"X-API-Key": CURL_KEY}, timeout=5))
    assert [r.status_code for r in seen] == [200, 503, 502, 503, 503, 401, 200]
    wait_until(lambda: "Amplitude rejected the secret key" in service.logs())
    output = service.logs() + "\n".join(map(response_text, seen))
    assert "Amplitude rejected the secret key" in output  # the log really was captured
    for secret in (SIM_SECRET, BRAZE_KEY, CURL_KEY, "wrong-gk-0000"):
        assert secret not in output


# -- 7. upstream redirects are never followed; the upstream must be https --------------------------


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        server: Any = self.server
        server.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        if server.redirect_to is not None:
            self.send_response(server.status)
            self.send_header("Location", server.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"userData": {"user_id": "stolen", "amp_props": {"x": 1}, "cohort_ids": []}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(redirect_to: str | None = None, status: int = 302) -> ThreadingHTTPServer:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    server.seen = []
    server.redirect_to = redirect_to
    server.status = status
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def redirecting_upstream(request) -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    target = _serve()
    redirector = _serve(f"http://127.0.0.1:{target.server_address[1]}", status=request.param)
    yield redirector, target
    for server in (redirector, target):
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("redirecting_upstream", [301, 302, 303, 307, 308], indirect=True)
def test_upstream_redirects_are_not_followed(make_service, redirecting_upstream):
    redirector, target = redirecting_upstream
    service = make_service(AMPLITUDE_API_URL=f"http://127.0.0.1:{redirector.server_address[1]}")
    response = service.get("/v1/users/user-1/properties")
    body = assert_json_error(response, 502, "upstream_misconfigured")
    assert "stolen" not in response.text and body["error"] == "upstream_misconfigured"
    assert response.headers["Cache-Control"] == "no-store"
    fallback = service.get("/v1/users/user-2/recommendations/rec_home?default=sku-9")
    assert fallback.status_code == 200
    assert fallback.json()["fallback"] is True and fallback.json()["reason"] == "upstream_misconfigured"
    assert len(redirector.seen) == 2
    assert all(seen["authorization"] == f"Api-Key {SIM_SECRET}" for seen in redirector.seen)
    assert target.seen == []  # never called, so never saw the key


@pytest.mark.parametrize(
    "url", ["http://profile-api.example.com", "HTTP://profile-api.example.com", "Http://profile-api.example.com"]
)
def test_settings_refuse_a_plain_http_upstream(url):
    env = {"AMPLITUDE_SECRET_KEY": SIM_SECRET, "PROXY_API_KEYS": f"braze:{BRAZE_KEY}", "AMPLITUDE_API_URL": url}
    with pytest.raises(SettingsError, match="AMPLITUDE_API_URL"):
        load_settings(env)
    allowed = load_settings({**env, "ALLOW_INSECURE_UPSTREAM": "true"})
    assert allowed.upstream_profile_url.lower() == "http://profile-api.example.com/v1/userprofile"


def test_settings_accept_https_and_reject_other_schemes():
    env = {"AMPLITUDE_SECRET_KEY": SIM_SECRET, "PROXY_API_KEYS": f"braze:{BRAZE_KEY}"}
    assert load_settings(env).upstream_profile_url == "https://profile-api.amplitude.com/v1/userprofile"
    assert load_settings({**env, "AMPLITUDE_API_URL": "https://eu.example.com/"}).upstream_profile_url == (
        "https://eu.example.com/v1/userprofile"
    )
    for url in ("ftp://profile-api.example.com", "file:///etc/passwd", "profile-api.example.com", "//example.com"):
        with pytest.raises(SettingsError, match="AMPLITUDE_API_URL"):
            load_settings({**env, "AMPLITUDE_API_URL": url, "ALLOW_INSECURE_UPSTREAM": "true"})


# -- 8. response headers ---------------------------------------------------------------------------


def _case_403(make_service, sim):
    return make_service(ALLOWED_CIDRS="10.0.0.0/8").get("/v1/users/user-1/cohorts")


def _case_429(make_service, sim):
    service = make_service(AUTH_FAILURE_LIMIT_PER_MINUTE=1)
    service.get("/v1/users/user-1/cohorts", key="wrong-key-0000")
    return service.get("/v1/users/user-1/cohorts", key="wrong-key-0000")


def _case_503(make_service, sim):
    sim.set_fault("status", status=500)
    return make_service().get("/v1/users/user-1/cohorts")


def _case_502(make_service, sim):
    sim.set_fault("unauthorized")
    return make_service().get("/v1/users/user-1/cohorts")


def _plain(path: str, key: str | None = BRAZE_KEY, method: str = "GET"):
    def case(make_service, sim):
        service = make_service()
        if method != "GET":
            return service.session.request(method, service.url + path, headers={"X-API-Key": BRAZE_KEY}, timeout=5)
        return service.get(path, key=key)

    return case


HEADER_CASES = [
    pytest.param(_plain("/v1/users/user-1/properties"), 200, "data", id="200-properties"),
    pytest.param(_plain("/v1/users/user-1/recommendations/rec_home?limit=2"), 200, "data", id="200-recommendation"),
    pytest.param(_plain("/v1/users/user-1"), 200, "data", id="200-profile"),
    pytest.param(_plain("/v1/users/unknown-1/recommendations/rec_home?default=a"), 200, "fallback", id="200-fallback"),
    pytest.param(_plain("/v1/users/user-1/cohorts?limit=1&limit=2"), 400, "error", id="400"),
    pytest.param(_plain("/v1/users/user-1/cohorts", key=None), 401, "error", id="401"),
    pytest.param(_case_403, 403, "error", id="403"),
    pytest.param(_plain("/v1/users/unknown-1/cohorts"), 404, "error", id="404-user-not-found"),
    pytest.param(_plain("/no-such-route"), 404, "error", id="404-route"),
    pytest.param(_plain("/v1/users/user-1/cohorts", method="POST"), 405, "error", id="405"),
    pytest.param(_case_429, 429, "error", id="429"),
    pytest.param(_case_502, 502, "error", id="502"),
    pytest.param(_case_503, 503, "error", id="503"),
    pytest.param(_plain("/healthz", key=None), 200, "probe", id="healthz"),
    pytest.param(_plain("/readyz", key=None), 200, "probe", id="readyz"),
    pytest.param(_plain("/metrics"), 200, "metrics", id="metrics"),
    pytest.param(_plain("/metrics", key=None), 401, "error", id="metrics-401"),
]


@pytest.mark.parametrize(("case", "status", "kind"), HEADER_CASES)
def test_every_response_says_nosniff_and_errors_are_not_stored(make_service, sim, case, status, kind):
    response = case(make_service, sim)
    assert response.status_code == status, response.text
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    cache_control = response.headers.get("Cache-Control", "")
    if kind == "data":
        match = re.fullmatch(r"private, max-age=(\d+)", cache_control)
        assert match and 0 <= int(match.group(1)) <= 300
    elif kind in ("error", "fallback", "probe", "metrics"):
        assert cache_control == "no-store"
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict) and body["error"] and body["message"]


def test_max_age_counts_down_as_the_entry_ages(make_service, sim, clock):
    service = make_service(clock=clock, CACHE_TTL_SECONDS=120, STALE_WHILE_REVALIDATE_SECONDS=600)

    def max_age(path: str) -> tuple[int, str]:
        response = service.get(path)
        assert response.status_code == 200
        match = re.fullmatch(r"private, max-age=(\d+)", response.headers["Cache-Control"])
        assert match, response.headers["Cache-Control"]
        return int(match.group(1)), response.headers["X-Cache"]

    first, cache = max_age("/v1/users/user-1/properties")
    assert cache == "MISS" and 119 <= first <= 120
    clock.advance(30)
    second, cache = max_age("/v1/users/user-1/cohorts")  # same profile, another route
    assert cache == "HIT" and 89 <= second <= 90
    clock.advance(80)
    third, cache = max_age("/v1/users/user-1/properties")
    assert cache == "HIT" and 9 <= third <= 10
    clock.advance(20)  # past the TTL: stale, served at once, nothing fresh left to promise
    fourth, cache = max_age("/v1/users/user-1/properties")
    assert cache == "STALE" and fourth == 0
    assert first > second > third > fourth
    assert sim.calls <= 2  # the first fetch and at most one background refresh


def test_server_header_shows_no_version_under_gunicorn(gunicorn_service):
    service = gunicorn_service()
    headers = {"Authorization": f"Bearer {BRAZE_KEY}"}
    responses = [
        requests.get(service.url + "/v1/users/user-1/cohorts", headers=headers, timeout=5),
        requests.get(service.url + "/v1/users/user-1/cohorts", timeout=5),
        requests.get(service.url + "/no-such-route", headers=headers, timeout=5),
        requests.get(service.url + "/healthz", timeout=5),
        requests.get(service.url + "/metrics", headers=headers, timeout=5),
    ]
    assert [r.status_code for r in responses] == [200, 401, 404, 200, 200]
    for response in responses:
        server = response.headers.get("Server", "")
        assert not re.search(r"\d", server), server  # gunicorn names itself, without a version
        assert "python" not in server.lower() and "werkzeug" not in server.lower()
    # gunicorn's own refusal (a request line over its limit) names no server either.
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 4")
    assert b"gunicorn" not in answer.lower()
    assert not re.search(rb"(?im)^server:.*\d", answer)


# -- 9. the image runs as a non-root user ----------------------------------------------------------


def test_docker_image_runs_as_non_root():
    text = (Path(ROOT) / "Dockerfile").read_text()
    final_stage = re.split(r"(?im)^FROM\s", text)[-1]
    users = re.findall(r"(?im)^USER\s+(\S+)", final_stage)
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert "useradd" in final_stage or "adduser" in final_stage
