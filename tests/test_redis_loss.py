"""Redis killed under one instance: its workers go on at once through the machine's file.

One gunicorn (two workers, the private SQLite file gunicorn.conf.py makes beside Redis),
a Redis of the test's own, the simulator as Amplitude with the limit enforced (it answers
429 past it). Redis is killed mid-run; then it comes back empty.
"""

from __future__ import annotations

import os
import signal
import time

import redis
import requests

from testkit import wait_until
from testkit.processes import children
from tests.conftest import BRAZE_KEY

LIMIT = 40
AUTH = {"Authorization": f"Bearer {BRAZE_KEY}", "Connection": "close"}  # a new connection: any worker


def ask(service, user: str) -> requests.Response:
    return requests.get(f"{service.url}/v1/users/{user}/cohorts", headers=AUTH, timeout=5)


def admission_modes(service) -> dict[str, float]:
    """``proxy_admission_mode`` as a scrape shows it: live workers per mode."""
    lines = requests.get(f"{service.url}/metrics", headers=AUTH, timeout=5).text.splitlines()
    prefix = 'proxy_admission_mode{mode="'
    return {line[len(prefix) :].split('"')[0]: float(line.split()[-1]) for line in lines if line.startswith(prefix)}


def test_one_instance_answers_new_users_within_two_seconds_of_a_redis_kill_and_keeps_the_limit(
    gunicorn_service, sim, own_redis
):
    sim.rate_limit_per_minute = LIMIT
    service = gunicorn_service(REDIS_URL=own_redis.url, WEB_CONCURRENCY=2, UPSTREAM_RATE_LIMIT_PER_MINUTE=LIMIT,
                               REDIS_TIMEOUT_SECONDS=0.5)  # fmt: skip
    wait_until(lambda: len(children(service.process.pid)) == 2, timeout=30, message="not 2 workers")
    client = redis.Redis.from_url(own_redis.url, socket_timeout=2)
    # Both workers have beaten (and so told the machine's file what Redis holds: nothing yet).
    wait_until(lambda: client.zcard("ampproxy:fleet") == 2, timeout=15, message="two workers in the fleet")
    assert "keep the machine's copy of their grants through" in service.logs()
    before = [ask(service, f"user-before-{n}") for n in range(LIMIT // 2)]
    assert [answer.status_code for answer in before] == [200] * (LIMIT // 2)
    assert client.zcard("ampproxy:admission") == LIMIT // 2
    wait_until(lambda: admission_modes(service).get("shared") == 2.0, timeout=10, message="both workers on Redis")

    os.kill(own_redis.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    killed = time.monotonic()
    first_data = None
    asked = 0
    while time.monotonic() - killed < 10 and asked < 200:
        answer = ask(service, f"user-after-{asked}")
        asked += 1
        if answer.status_code == 200 and answer.headers["X-Cache"] == "MISS":
            first_data = time.monotonic() - killed
            break
    assert first_data is not None and first_data < 2.0, (first_data, answer.status_code, answer.text)

    # Through the file, the two workers together spend what the limit leaves, and no more.
    for n in range(asked, asked + 2 * LIMIT):
        ask(service, f"user-after-{n}")
        if sim.calls >= LIMIT:
            break
    refused = ask(service, "user-after-full")
    assert refused.status_code == 503 and refused.json()["error"] == "rate_limited"
    assert sim.calls == LIMIT
    ready = requests.get(f"{service.url}/readyz", timeout=5).json()
    assert ready["checks"]["redis"] == "unavailable" and ready["checks"]["admission"] == "machine"
    wait_until(lambda: admission_modes(service).get("machine") == 2.0, timeout=10, message="both on the file")

    # Redis comes back empty: the grants made meanwhile, and the ones Redis lost, are written back.
    own_redis.start()
    wait_until(lambda: admission_modes(service).get("shared") == 2.0, timeout=15, message="both back on Redis")
    assert client.zcard("ampproxy:admission") == LIMIT
    after = ask(service, "user-back-1")
    assert after.status_code == 503 and after.json()["error"] == "rate_limited"
    assert sim.count_by_status().get(429, 0) == 0
    assert sim.max_in_window(60.0) <= LIMIT
    client.close()
