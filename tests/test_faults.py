"""Fault injection against the simulator: status, body, headers, time bound and call count."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.observability import ACCESS_LOG
from testkit import wait_until

#: Braze waits this long for an answer; the service's own deadline (1.5 s) is inside it.
BRAZE_TIMEOUT_MS = 2000


def served_ms(capsys, response) -> float:
    """How long the service itself took to answer *response*, from its access log.

    Durations come from the service (arrival to answer), not from the test client, whose
    own scheduling on a busy machine is not the product's.
    """
    ACCESS_LOG.flush()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    request_id = response.headers["X-Request-ID"]
    return next(line["total_ms"] for line in lines if line.get("request_id") == request_id)


def _recommendation(**fields: object) -> dict:
    return {"body": {"userData": {"recommendations": [fields]}}}


FAILURES = [
    ("timeout", "slow", {"seconds": 3}),
    ("hang", "hang", {"seconds": 5}),
    ("dribble", "dribble", {"interval": 0.2}),
    ("500", "status", {"status": 500}),
    ("502", "status", {"status": 502}),
    ("503", "status", {"status": 503}),
    ("reset", "reset", {}),
    ("html", "html", {}),
    ("truncated", "truncated", {}),
    ("wrong-shape", "wrong_shape", {}),
    ("wrong-shape-array", "wrong_shape", {"body": [1, 2, 3]}),
    ("wrong-shape-userdata", "wrong_shape", {"body": {"userData": {"recommendations": "nope"}}}),
    ("wrong-shape-null-userdata", "wrong_shape", {"body": {"userData": None}}),
    ("boolean-item-ids", "wrong_shape", _recommendation(rec_id="rec_home", items=[True])),
    ("too-many-items", "wrong_shape", _recommendation(rec_id="rec_home", items=["a"] * 1001)),
    ("recommendation-without-id", "wrong_shape", _recommendation(items=["a"])),
    ("prediction-without-id", "wrong_shape", {"body": {"userData": {"propensities": [{"prop": 0.5}]}}}),
    ("oversized", "oversized", {"size_bytes": 3_000_000}),
]


@pytest.mark.parametrize(("name", "mode", "options"), FAILURES, ids=[f[0] for f in FAILURES])
def test_upstream_failure_is_a_prompt_retryable_503(service, sim, capsys, name, mode, options):
    sim.set_fault(mode, **options)
    response = service.get("/v1/users/user-f1/cohorts")
    assert response.status_code == 503
    assert response.json()["error"] == "upstream_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Cache-Control"] == "no-store"
    assert served_ms(capsys, response) < BRAZE_TIMEOUT_MS
    assert sim.calls == 1


@pytest.mark.parametrize(("name", "mode", "options"), FAILURES, ids=[f[0] for f in FAILURES])
def test_upstream_failure_with_default_is_a_fallback(service, sim, capsys, name, mode, options):
    sim.set_fault(mode, **options)
    response = service.get("/v1/users/user-f2/recommendations/rec_home?default=a,b")
    assert response.status_code == 200
    assert response.json()["fallback"] is True and response.json()["reason"] == "upstream_unavailable"
    assert served_ms(capsys, response) < BRAZE_TIMEOUT_MS


@pytest.mark.parametrize(("name", "mode", "options"), FAILURES[:4], ids=[f[0] for f in FAILURES[:4]])
def test_failures_never_replace_good_data(make_service, sim, clock, name, mode, options):
    # On the fake clock a slow upstream is still bounded by the client's socket timeouts,
    # which are real; what is asserted is that the stale answer replaces the failure.
    service = make_service(clock=clock, CACHE_TTL_SECONDS=60, STALE_WHILE_REVALIDATE_SECONDS=0)
    good = service.get("/v1/users/user-f3/cohorts")
    assert good.status_code == 200
    clock.advance(3600)
    sim.set_fault(mode, **options)
    response = service.get("/v1/users/user-f3/cohorts")
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "STALE"
    assert response.json() == good.json()
    sim.set_fault("none")
    clock.advance(1)
    # Still the good entry: the error was not cached in its place.
    again = service.get("/v1/users/user-f3/cohorts")
    assert again.status_code == 200 and again.json() == good.json()


def test_stale_if_error_has_a_limit(make_service, sim, clock):
    service = make_service(
        clock=clock, CACHE_TTL_SECONDS=60, STALE_WHILE_REVALIDATE_SECONDS=0, STALE_IF_ERROR_SECONDS=600
    )
    assert service.get("/v1/users/user-f4/cohorts").status_code == 200
    clock.advance(60 + 601)
    sim.set_fault("status", status=500)
    assert service.get("/v1/users/user-f4/cohorts").status_code == 503


@pytest.mark.parametrize(("retry_after", "expected"), [(7, 7), (None, 30)])
def test_429_backs_off_without_retrying(service, sim, retry_after, expected):
    sim.set_fault("rate_limited", count=1, retry_after=retry_after)
    first = service.get("/v1/users/user-g1/cohorts")
    assert first.status_code == 503
    assert first.json()["error"] == "rate_limited"
    assert int(first.headers["Retry-After"]) == expected
    # Every other user is held back too, without a call, for the back-off period.
    second = service.get("/v1/users/user-g2/cohorts")
    assert second.status_code == 503 and second.json()["error"] == "rate_limited"
    assert 1 <= int(second.headers["Retry-After"]) <= expected
    assert sim.calls == 1


def test_unauthorized_upstream_is_never_retried(service, sim):
    sim.set_fault("unauthorized")
    for _ in range(3):
        response = service.get("/v1/users/user-h1/cohorts")
        assert response.status_code == 502
    assert sim.calls == 3  # one per request, no retries


@pytest.mark.serial
def test_stampede_of_200_on_one_cold_user_makes_one_call(service, sim):
    sim.hold()  # the one call stays in flight until every request is waiting on it or answered
    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = [pool.submit(service.get, "/v1/users/user-herd/properties") for _ in range(200)]
        wait_until(lambda: sim.calls >= 1)
        sim.release()
        results = [answer.result() for answer in answers]
    assert [r.status_code for r in results] == [200] * 200
    assert {r.headers["X-Cache"] for r in results} <= {"MISS", "HIT"}
    assert sim.calls == 1


def test_stampede_on_one_expired_user_makes_one_refresh(make_service, sim, clock):
    service = make_service(clock=clock, CACHE_TTL_SECONDS=60)
    assert service.get("/v1/users/user-exp/properties").status_code == 200
    clock.advance(120)
    sim.latency_ms = 300
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: service.get("/v1/users/user-exp/properties"), range(100)))
    assert [r.status_code for r in responses] == [200] * 100
    # Nobody waited: answers before the refresh landed are stale, any after it are fresh hits.
    assert "STALE" in {r.headers["X-Cache"] for r in responses}
    assert {r.headers["X-Cache"] for r in responses} <= {"STALE", "HIT"}
    wait_until(lambda: sim.calls >= 2)
    wait_until(lambda: service.get("/v1/users/user-exp/properties").headers["X-Cache"] == "HIT")
    assert sim.calls == 2


def test_breaker_opens_then_half_opens_with_one_probe(make_service, sim, clock):
    service = make_service(clock=clock, BREAKER_FAILURE_THRESHOLD=3, BREAKER_COOLDOWN_SECONDS=1)
    sim.set_fault("status", status=500)
    for n in range(3):
        assert service.get(f"/v1/users/user-b{n}/cohorts").status_code == 503
    assert sim.calls == 3
    # Open: answered at once, no call.
    response = service.get("/v1/users/user-b9/cohorts")
    assert response.status_code == 503 and response.json()["error"] == "upstream_unavailable"
    assert sim.calls == 3
    assert service.get("/readyz", key=None).json()["checks"]["circuit"] == "open"

    clock.advance(1.1)  # the cool-down, on the service's clock
    sim.set_fault("none")
    sim.hold()  # the probe stays in flight while the others arrive
    with ThreadPoolExecutor(max_workers=1) as pool:
        probe = pool.submit(service.get, "/v1/users/user-p0/cohorts")
        wait_until(lambda: sim.calls == 4)
        others = [service.get(f"/v1/users/user-p{n}/cohorts").status_code for n in range(1, 10)]
        sim.release()
        statuses = [probe.result().status_code, *others]
    # Half-open: exactly one probe went through; the rest were answered without a call.
    assert sim.calls == 4
    assert statuses == [200] + [503] * 9
    # The probe succeeded, so the circuit is closed again.
    assert service.get("/v1/users/user-after/cohorts").status_code == 200
    assert service.get("/readyz", key=None).json()["checks"]["circuit"] == "closed"


def test_calls_that_start_late_and_run_out_of_time_do_not_open_the_circuit(make_service, sim):
    """A call that starts with less of the deadline left than the read timeout (the request
    waited: in a stampede, for a slot) and gets no answer in time says nothing of Amplitude;
    the same slow Amplitude asked on time is a failure, and opens the circuit."""
    service = make_service(BREAKER_FAILURE_THRESHOLD=2)
    sim.set_fault("slow", seconds=3)
    for n in range(4):
        # Received by the front 0.8 s ago: 0.65 s left of the deadline, less than the 1 s read timeout.
        late = service.get(f"/v1/users/late-{n}/cohorts", headers={"X-Request-Start": f"t={time.time() - 0.8:.3f}"})
        assert late.status_code == 503 and late.json()["error"] == "upstream_unavailable"
    assert sim.calls == 4  # each call went out
    assert service.get("/readyz", key=None).json()["checks"]["circuit"] == "closed"
    for n in range(2):
        assert service.get(f"/v1/users/on-time-{n}/cohorts").status_code == 503
    assert service.get("/readyz", key=None).json()["checks"]["circuit"] == "open"


def test_breaker_open_serves_stale_at_once(make_service, sim, clock):
    service = make_service(
        clock=clock,
        CACHE_TTL_SECONDS=60,
        STALE_WHILE_REVALIDATE_SECONDS=0,
        BREAKER_FAILURE_THRESHOLD=2,
        BREAKER_COOLDOWN_SECONDS=3600,
    )
    assert service.get("/v1/users/user-s1/cohorts").status_code == 200
    sim.set_fault("status", status=503)
    for n in range(2):
        service.get(f"/v1/users/user-x{n}/cohorts")
    calls = sim.calls
    clock.advance(600)
    response = service.get("/v1/users/user-s1/cohorts")
    assert response.status_code == 200 and response.headers["X-Cache"] == "STALE"
    assert sim.calls == calls  # the open circuit answered without waiting on Amplitude


def test_budget_exhausted_answers_stale_then_fallback_then_503(make_service, sim, clock):
    # 30 a minute, on the fake clock; the window starts as if a predecessor had spent it evenly.
    service = make_service(
        clock=clock,
        CACHE_TTL_SECONDS=60,
        STALE_WHILE_REVALIDATE_SECONDS=0,
        UPSTREAM_RATE_LIMIT_PER_MINUTE=30,
        BUDGET_MAX_WAIT_SECONDS=0.25,
    )
    clock.advance(2.2)  # one slot of the ramp is free
    assert service.get("/v1/users/user-k1/cohorts").status_code == 200
    clock.advance(600)  # user-k1 is past its TTL; the whole window is free again
    for n in range(30):  # spend it
        assert service.get(f"/v1/users/user-k0-{n}/cohorts").headers["X-Cache"] == "MISS"
    stale = service.get("/v1/users/user-k1/cohorts")
    assert stale.status_code == 200 and stale.headers["X-Cache"] == "STALE"
    fallback = service.get("/v1/users/user-k2/recommendations/rec_home?default=x")
    assert fallback.status_code == 200 and fallback.json()["reason"] == "rate_limited"
    refused = service.get("/v1/users/user-k3/cohorts")
    assert refused.status_code == 503 and refused.json()["error"] == "rate_limited"
    assert 59 <= int(refused.headers["Retry-After"]) <= 61  # when the oldest of the 30 leaves the window
    assert sim.calls == 31
