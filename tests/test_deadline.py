"""The two-second promise when things are slow: time counts from arrival, hits never wait
behind misses, and a slow upstream cannot hold a thread past the deadline."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from app.observability import ACCESS_LOG
from testkit import wait_until


def access_lines(capsys) -> list[dict]:
    ACCESS_LOG.flush()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event":"request"' in line]


def front_stamp(seconds_ago: float) -> dict[str, str]:
    """The header nginx adds (``$msec``): when the front received the request."""
    return {"X-Request-Start": f"t={time.time() - seconds_ago:.3f}"}


def test_a_miss_that_already_waited_too_long_starts_no_call(service, sim, capsys):
    late = service.get("/v1/users/user-late/cohorts", headers=front_stamp(1.2))
    assert late.status_code == 503 and late.json()["error"] == "upstream_unavailable"
    assert int(late.headers["Retry-After"]) >= 1
    fallback = service.get("/v1/users/user-late/recommendations/rec_home?default=a", headers=front_stamp(1.2))
    assert fallback.status_code == 200 and fallback.json()["fallback"] is True
    assert sim.calls == 0
    lines = access_lines(capsys)
    assert all(line["total_ms"] >= 1200 for line in lines)  # counted from the front's stamp
    assert all(line["queue_ms"] >= 1200 for line in lines)  # and shown as time queued


def test_a_cached_answer_is_served_however_long_it_waited(service, sim):
    assert service.get("/v1/users/user-w1/cohorts").status_code == 200
    hit = service.get("/v1/users/user-w1/cohorts", headers=front_stamp(1.4))
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"


def test_the_front_stamp_counts_only_from_a_named_proxy(make_service, sim):
    service = make_service(FORWARDED_ALLOW_IPS="10.9.9.9")  # not the test client's 127.0.0.1
    answer = service.get("/v1/users/user-spoof/cohorts", headers=front_stamp(1.2))
    assert answer.status_code == 200 and sim.calls == 1


def test_cached_answers_never_wait_behind_misses_and_no_miss_is_turned_away(make_service, sim, clock):
    # The service's clock stands still, so its deadline cannot run out while the thirty
    # misses gather on a loaded machine; the socket's read timeout is the longest allowed.
    service = make_service(clock=clock, UPSTREAM_READ_TIMEOUT="1.4")
    assert service.get("/v1/users/user-cached/cohorts").status_code == 200
    sim.hold()
    with ThreadPoolExecutor(max_workers=30) as pool:
        waiting = [pool.submit(service.get, f"/v1/users/user-slow{n}/cohorts") for n in range(30)]
        wait_until(lambda: sim.calls == 31)  # thirty misses are waiting on Amplitude
        hit = service.get("/v1/users/user-cached/cohorts")
        sim.release()
        answers = [answer.result() for answer in waiting]
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"
    assert [answer.status_code for answer in answers] == [200] * 30
