"""The shared tier: one cache, one budget and one call per user across processes and instances.

Every test that does not kill Redis runs twice (the ``shared_env`` fixture): two
services sharing a Redis (two instances), and two sharing one SQLite file (two processes
of one machine, without a server).
"""

from __future__ import annotations

import random
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from testkit import wait_until


def test_two_instances_share_one_cache(make_service, sim, shared_env):
    first = make_service(**shared_env)
    second = make_service(**shared_env)
    assert first.get("/v1/users/user-1/cohorts").headers["X-Cache"] == "MISS"
    response = second.get("/v1/users/user-1/properties")
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "HIT"
    assert sim.calls == 1


def test_two_instances_missing_one_user_at_once_make_one_call(make_service, sim, shared_env):
    sim.latency_ms = 300
    services = [make_service(**shared_env) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(lambda n: services[n % 2].get("/v1/users/user-stampede/cohorts"), range(40)))
    assert [r.status_code for r in responses] == [200] * 40
    assert sim.calls == 1


@pytest.mark.serial
def test_two_instances_missing_many_users_at_once_make_one_call_each(make_service, sim, shared_env):
    """Each of 300 cold ids asked six times, through both instances, in a shuffled order."""
    sim.latency_ms = 300
    # The widest deadline the settings allow: this is about one call per id and no gaps
    # between processes, on a machine the rest of the suite keeps busy.
    # Upstream threads for every client (a flight also waits on the other instance's call).
    services = [make_service(REQUEST_DEADLINE_SECONDS=1.9, UPSTREAM_CONCURRENCY=64, **shared_env) for _ in range(2)]
    asks = [(n % 2, f"user-race-{n // 6}") for n in range(300 * 6)]
    random.Random(9).shuffle(asks)

    def ask(item: tuple[int, str]) -> tuple[int, str]:
        instance, user = item
        response = services[instance].get(f"/v1/users/{user}/cohorts")
        return response.status_code, response.text

    with ThreadPoolExecutor(max_workers=48) as pool:
        answers = list(pool.map(ask, asks))
    assert [status for status, _ in answers] == [200] * len(asks), [text for status, text in answers if status != 200][
        :3
    ]
    assert sim.calls == 300


def test_unknown_user_is_shared_too(make_service, sim, shared_env):
    first = make_service(**shared_env)
    second = make_service(**shared_env)
    assert first.get("/v1/users/unknown-shared/cohorts").status_code == 404
    assert second.get("/v1/users/unknown-shared/cohorts").status_code == 404
    assert sim.calls == 1


def test_budget_is_shared_across_instances(make_service, sim, shared_env):
    # One shared log for both: 20 calls in the window between them, whoever asks.
    # Separate logs would grant 20 each.
    services = [
        make_service(**shared_env, UPSTREAM_RATE_LIMIT_PER_MINUTE=20, BUDGET_MAX_WAIT_SECONDS=0) for _ in range(2)
    ]
    answers = [services[n % 2].get(f"/v1/users/user-b{n}/cohorts") for n in range(30)]
    assert [a.status_code for a in answers].count(200) == 20
    refused = [a for a in answers if a.status_code != 200]
    assert {(a.status_code, a.json()["error"]) for a in refused} == {(503, "rate_limited")}
    assert all(55 <= int(a.headers["Retry-After"]) <= 61 for a in refused)  # when the first call leaves
    assert sim.calls == 20


def test_a_429_pauses_every_instance(make_service, sim, shared_env):
    first = make_service(**shared_env)
    second = make_service(**shared_env)
    sim.set_fault("rate_limited", count=1, retry_after=30)
    response = first.get("/v1/users/user-429/cohorts")
    assert response.status_code == 503 and response.json()["error"] == "rate_limited"
    paused = second.get("/v1/users/user-other/cohorts")
    assert paused.status_code == 503 and paused.json()["error"] == "rate_limited"
    assert 1 <= int(paused.headers["Retry-After"]) <= 30
    assert sim.calls == 1


def test_redis_killed_mid_run_and_restarted(make_service, sim, own_redis, clock):
    service = make_service(clock=clock, REDIS_URL=own_redis.url)
    assert service.get("/v1/users/user-r1/cohorts").status_code == 200
    assert service.get("/readyz", key=None).json()["checks"]["redis"] == "ok"

    own_redis.stop()
    # Cached users still come from L1.
    cached = service.get("/v1/users/user-r1/cohorts")
    assert cached.status_code == 200 and cached.headers["X-Cache"] == "HIT"
    ready = service.get("/readyz", key=None)
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded" and ready.json()["checks"]["redis"] == "unavailable"
    # New users wait until nothing the fleet granted through Redis can share a window with
    # this process's own grants (a window plus the heartbeat timeout), then use its share.
    refused = service.get("/v1/users/user-r2/cohorts")
    assert refused.status_code == 503 and refused.json()["error"] == "rate_limited"
    clock.advance(70)
    assert service.get("/v1/users/user-r2/cohorts").status_code == 200

    own_redis.start()
    clock.advance(1.1)  # the pause after a failure, on the service's clock
    assert service.get("/v1/users/user-r3/cohorts").status_code == 200
    assert service.get("/readyz", key=None).json()["checks"]["redis"] == "ok"
    # The new profile went to Redis again: a second instance finds it there.
    other = make_service(clock=clock, REDIS_URL=own_redis.url)
    assert other.get("/v1/users/user-r3/cohorts").headers["X-Cache"] == "HIT"
    assert sim.calls == 3
    # The call made while cut off was written into the shared log when Redis came back.
    admitted = redis.Redis.from_url(own_redis.url).zcard("ampproxy:admission")
    assert admitted == 2  # user-r2 (merged) and user-r3


def test_redis_never_configured_reports_not_configured(service):
    body = requests.get(service.url + "/readyz", timeout=5).json()
    assert body == {
        "status": "ok",
        "checks": {"settings": "ok", "circuit": "closed", "redis": "not_configured", "admission": "process"},
    }


def test_a_locked_state_file_is_skipped_like_an_unreachable_redis(make_service, sim, sqlite_env, clock):
    """Another process holds the SQLite file's write lock: cached users still come from L1, new
    users wait as they would for Redis, and the file is used again once it is free."""
    path = sqlite_env["SHARED_STATE_PATH"]
    service = make_service(clock=clock, **sqlite_env)
    assert service.get("/v1/users/user-l1/cohorts").status_code == 200
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        cached = service.get("/v1/users/user-l1/cohorts")
        assert cached.status_code == 200 and cached.headers["X-Cache"] == "HIT"
        refused = service.get("/v1/users/user-l2/cohorts")
        assert refused.status_code == 503 and refused.json()["error"] == "rate_limited"
        clock.advance(70)  # a window plus the heartbeat timeout: this process's share is safe to use
        assert service.get("/v1/users/user-l2/cohorts").status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    clock.advance(1.1)  # the pause after a failure, on the service's clock
    assert service.get("/v1/users/user-l3/cohorts").status_code == 200
    other = make_service(clock=clock, **sqlite_env)
    assert other.get("/v1/users/user-l3/cohorts").headers["X-Cache"] == "HIT"
    assert sim.calls == 3
    # The call made while the file was locked was written into the shared log afterwards.
    in_window = "SELECT count(*) FROM grants WHERE stamp > ?"
    assert sqlite3.connect(path).execute(in_window, (clock.time() - 60.6,)).fetchone()[0] == 2


def test_readiness_and_metrics_show_a_state_file_that_refuses_writes(make_service, sim, sqlite_env, clock):
    """Another process holds the file's write lock: reads still go through (WAL), writes do
    not. /readyz says so (still 200: the service serves on), the gauge drops to 0, and both
    come back once a write goes through again."""

    def shared_file_gauge() -> str:
        lines = service.get("/metrics").text.splitlines()
        return next(line.split()[-1] for line in lines if line.startswith("proxy_shared_file_available "))

    service = make_service(clock=clock, **sqlite_env)
    ready = service.get("/readyz", key=None)
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "checks": {
            "settings": "ok",
            "circuit": "closed",
            "redis": "not_configured",
            "shared_state": "ok",
            "admission": "shared",
        },
    }
    assert shared_file_gauge() == "1.0"
    other = make_service(clock=clock, **sqlite_env)
    assert other.get("/v1/users/user-w0/cohorts").status_code == 200  # in the file, not in this one's cache
    holder = sqlite3.connect(sqlite_env["SHARED_STATE_PATH"], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert service.get("/v1/users/user-w1/cohorts").status_code == 503  # its claim is a write

        def read_from_the_file() -> bool:
            # Past the pause after a failure (the real-time heartbeat's too): the file is tried again.
            clock.advance(1.1)
            read = service.get("/v1/users/user-w0/cohorts")
            return read.status_code == 200 and read.headers["X-Cache"] == "HIT"

        wait_until(read_from_the_file, 10, message="a read from the locked file")  # reads go through...
        ready = service.get("/readyz", key=None)  # ...but the file still refuses writes
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["checks"]["shared_state"] == "unavailable"
        assert shared_file_gauge() == "0.0"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    clock.advance(1.1)  # the pause after a failure, on the service's clock
    assert service.get("/v1/users/user-w2/cohorts").status_code == 200
    assert service.get("/readyz", key=None).json()["checks"]["shared_state"] == "ok"
    assert shared_file_gauge() == "1.0"
    assert sim.calls == 2


def test_without_a_state_file_the_gauge_says_not_in_use(service):
    lines = service.get("/metrics").text.splitlines()
    assert "proxy_shared_file_available -1.0" in lines
    assert "shared_state" not in service.get("/readyz", key=None).json()["checks"]


def test_a_kept_state_file_remembers_the_budget_across_a_restart(make_service, sim, tmp_path, clock):
    """A new file ramps up (what was spent before it is unknown); a restart on a kept file does not."""
    path = str(tmp_path / "kept.sqlite3")
    settings = {"SHARED_STATE_PATH": path, "UPSTREAM_RATE_LIMIT_PER_MINUTE": 3, "BUDGET_MAX_WAIT_SECONDS": 0}
    first = make_service(clock=clock, **settings)
    assert first.get("/v1/users/user-k0/cohorts").status_code == 503  # the ramp: none free yet
    clock.advance(61)
    assert [first.get(f"/v1/users/user-k{n}/cohorts").status_code for n in range(1, 5)] == [200, 200, 200, 503]
    first.extensions.close()  # the process stops
    restarted = make_service(clock=clock, **settings)
    assert restarted.get("/v1/users/user-k5/cohorts").status_code == 503  # the window is still full
    clock.advance(61)
    assert restarted.get("/v1/users/user-k5/cohorts").status_code == 200
    assert sim.calls == 4
