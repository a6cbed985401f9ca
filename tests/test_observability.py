"""Request ids, JSON access logs, Prometheus metrics, health probes and graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading

import requests

from app.observability import ACCESS_LOG
from testkit import wait_until
from tests.conftest import BRAZE_KEY, CURL_KEY, SIM_SECRET


def access_records(capsys):
    """The JSON access lines written to stdout so far."""
    ACCESS_LOG.flush()
    out = capsys.readouterr().out
    return [line for line in map(json.loads, filter(None, out.splitlines())) if line.get("event") == "request"]


def test_request_id_is_honoured_or_generated(service):
    given = service.get("/v1/users/user-1/cohorts", headers={"X-Request-ID": "braze-abc-123"})
    assert given.headers["X-Request-ID"] == "braze-abc-123"
    made = service.get("/v1/users/user-1/cohorts")
    assert len(made.headers["X-Request-ID"]) == 32
    hostile = service.get("/v1/users/user-1/cohorts", headers={"X-Request-ID": "x" * 300})
    assert hostile.headers["X-Request-ID"] != "x" * 300


def test_one_access_log_line_per_request_without_user_ids(service, capsys, caplog):
    caplog.set_level("DEBUG")
    service.get("/v1/users/user-secret-id/recommendations/rec_home", headers={"X-Request-ID": "req-1"})
    service.get("/v1/users/user-secret-id/recommendations/rec_home", headers={"X-Request-ID": "req-2"})
    first, second = access_records(capsys)
    assert first["request_id"] == "req-1" and second["request_id"] == "req-2"
    assert first["route"] == "/v1/{kind}/{id}/recommendations/{rec_id}"
    assert first["method"] == "GET" and first["status"] == 200
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert first["upstream_ms"] > 0 and second["upstream_ms"] == 0
    assert first["total_ms"] >= first["upstream_ms"]
    assert first["caller"] == "braze"
    assert first["time"].endswith("Z") and first["level"] == "info"
    assert "user-secret-id" not in json.dumps([first, second]) + caplog.text
    assert BRAZE_KEY not in json.dumps([first, second]) + caplog.text


def test_user_ids_are_logged_only_when_asked(make_service, capsys):
    make_service(LOG_USER_IDS="true").get("/v1/users/user-visible/cohorts")
    assert access_records(capsys)[-1]["user"] == "user-visible"


def test_log_lines_are_json_on_stdout(gunicorn_service, sim):
    service = gunicorn_service()
    requests.get(service.url + "/v1/users/user-1/cohorts", headers={"X-API-Key": CURL_KEY}, timeout=5)
    sim.set_fault("status", status=500)
    requests.get(service.url + "/v1/users/user-2/cohorts", headers={"X-API-Key": CURL_KEY}, timeout=5)

    def cohort_lines() -> list[dict]:
        lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == "request" and line["route"].endswith("/cohorts")]

    requests_logged = wait_until(lambda: len(cohort_lines()) >= 2 and cohort_lines())
    assert [line["status"] for line in requests_logged if line["route"].endswith("/cohorts")] == [200, 503]
    assert all(line["caller"] == "curl" for line in requests_logged if line["route"].endswith("/cohorts"))
    logs = service.logs()
    assert SIM_SECRET not in logs and CURL_KEY not in logs and BRAZE_KEY not in logs


def test_metrics_count_requests_cache_and_upstream(service, sim):
    service.get("/v1/users/user-m1/cohorts")
    service.get("/v1/users/user-m1/cohorts")
    service.get("/v1/users/unknown-m2/cohorts")
    service.get("/v1/users/unknown-m2/cohorts")
    text = service.get("/metrics").text
    assert 'proxy_requests_total{caller="braze",route="/v1/{kind}/{id}/cohorts",status="200"} 2.0' in text
    assert 'proxy_cache_lookups_total{outcome="hit"} 1.0' in text
    assert 'proxy_cache_lookups_total{outcome="miss"} 2.0' in text
    assert 'proxy_cache_lookups_total{outcome="negative"} 1.0' in text
    assert 'proxy_upstream_calls_total{outcome="ok"} 1.0' in text
    assert 'proxy_upstream_calls_total{outcome="not_found"} 1.0' in text
    assert "proxy_request_duration_seconds_bucket" in text and "proxy_upstream_duration_seconds_count" in text
    assert "proxy_circuit_state 0.0" in text
    assert "proxy_redis_available -1.0" in text
    assert "proxy_budget_tokens" in text
    assert "user-m1" not in text and "unknown-m2" not in text and BRAZE_KEY not in text


def test_metrics_count_requests_turned_away(make_service):
    service = make_service(UPSTREAM_RATE_LIMIT_PER_MINUTE=30, BUDGET_MAX_WAIT_SECONDS=0)
    assert service.get("/v1/users/user-t1/cohorts").status_code == 503
    assert 'proxy_budget_turned_away_total{class="live"} 1.0' in service.get("/metrics").text


def test_metrics_need_a_key(service):
    assert service.get("/metrics", key=None).status_code == 401


def test_metrics_add_up_across_gunicorn_workers(gunicorn_service, sim):
    service = gunicorn_service(WEB_CONCURRENCY=2)
    headers = {"Authorization": f"Bearer {BRAZE_KEY}"}
    for n in range(20):
        # New connections each time, so the kernel spreads them over both workers.
        requests.get(f"{service.url}/v1/users/user-w{n}/cohorts", headers=headers, timeout=5)
    expected = 'proxy_requests_total{caller="braze",route="/v1/{kind}/{id}/cohorts",status="200"} 20.0'
    # Each worker counts its requests a moment after answering them (off the request thread).
    wait_until(lambda: expected in requests.get(service.url + "/metrics", headers=headers, timeout=5).text)


def test_readyz_reports_without_calling_amplitude(service, sim):
    body = service.get("/readyz", key=None).json()
    assert body["status"] == "ok" and body["checks"]["circuit"] == "closed"
    assert sim.calls == 0


def test_graceful_shutdown_finishes_in_flight_requests(gunicorn_service, sim):
    sim.latency_ms = 800
    service = gunicorn_service()
    results: list[int] = []

    def slow_request(n: int) -> None:
        response = requests.get(
            f"{service.url}/v1/users/user-sd{n}/cohorts", headers={"Authorization": f"Bearer {BRAZE_KEY}"}, timeout=5
        )
        results.append(response.status_code)

    threads = [threading.Thread(target=slow_request, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sim.calls == 5)  # all five are waiting on Amplitude
    service.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=10)
    assert results == [200] * 5
    assert service.process.wait(timeout=25) == 0
    try:
        requests.get(service.url + "/healthz", timeout=1)
    except requests.ConnectionError:
        pass
    else:
        raise AssertionError("the server still accepts connections after shutdown")


def test_request_ids_are_unique_across_gunicorn_workers(gunicorn_service, sim):
    service = gunicorn_service(WEB_CONCURRENCY=2)
    ids = [
        requests.get(service.url + "/healthz", headers={"Connection": "close"}, timeout=5).headers["X-Request-ID"]
        for _ in range(40)
    ]
    assert len(set(ids)) == len(ids)
