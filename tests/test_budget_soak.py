"""The budget under sustained load, as Amplitude would count it: the simulator's own window.

Each test floods real gunicorn services with distinct users for a minute or two, paced
(tens of requests a second: far more misses than the budget allows) and bounded in
count and time, loopback only. The simulator enforces the same per-minute limit, so a
leak shows up as a 429 there.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from app.settings import load_settings
from tests.conftest import BRAZE_KEY, CURL_KEY, ROOT, base_env

#: What Braze gives an answer; the service's own deadline (1.5 s) sits inside it.
BRAZE_TIMEOUT = 2.0


def flood(urls: list[str], seconds: float, per_second: float, prefix: str) -> list[tuple[int, dict]]:
    """Ask for new users (with ``default=``) round-robin over *urls*, paced, for *seconds*."""
    counter = itertools.count()
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + seconds
    threads = 16
    interval = threads / per_second

    def worker(offset: int) -> None:
        due = started + offset * interval / threads
        with requests.Session() as session:
            while (now := time.monotonic()) < stop_at:
                if due > now:
                    time.sleep(due - now)
                due += interval
                n = next(counter)
                url = f"{urls[n % len(urls)]}/v1/users/{prefix}-{n}/recommendations/rec_home?limit=2&default=d1"
                sent = time.monotonic()
                try:
                    response = session.get(url, headers={"Authorization": f"Bearer {BRAZE_KEY}"}, timeout=5)
                    answer = (response.status_code, {**response.json(), "_s": time.monotonic() - sent})
                except requests.RequestException as exc:
                    failed = {"error": type(exc).__name__, "detail": str(exc)[:200], "n": n}
                    answer = (0, {**failed, "_s": time.monotonic() - sent})
                with lock:
                    answers.append(answer)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(worker, n) for n in range(threads)]:
            future.result()
    return answers


def calls_in_last(sim, seconds: float) -> int:
    """Profile requests the simulator received in the last *seconds* (its monotonic clock)."""
    now = time.monotonic()
    return sum(1 for request in sim.requests if request.time > now - seconds)


def service_durations(service) -> list[float]:
    lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith('{"time"')]
    return [line["total_ms"] for line in lines if line.get("event") == "request" and "/v1/" in line["route"]]


@pytest.mark.slow
def test_one_caller_uses_the_whole_limit_and_never_more(gunicorn_service, sim):
    """One key, 120 a minute, an 80-second flood: at least 118 calls in the last minute.

    The machine's new state file starts as if the limit had been spent evenly over the last
    window, so its slots free at the steady rate from the start: 80 s hold a whole window
    of it."""
    sim.rate_limit_per_minute = 120
    service = gunicorn_service(UPSTREAM_RATE_LIMIT_PER_MINUTE=120)
    answers = flood([service.url], seconds=80, per_second=30, prefix="soak")
    assert sim.count_by_status().get(429, 0) == 0
    assert sim.max_in_window(60.0) <= 120
    assert calls_in_last(sim, 60.0) >= 118
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]  # real or default
    assert max(body["_s"] for _, body in answers) < BRAZE_TIMEOUT
    assert max(service_durations(service)) < 1600  # the service's own account of each answer


@pytest.mark.slow
def test_instances_stay_within_the_limit_while_redis_is_down_and_then_slow(gunicorn_service, sim, own_redis):
    """Two instances x two workers, limit 60: Redis stopped for 60 s, then slower than its timeout."""
    sim.rate_limit_per_minute = 60
    settings = {"UPSTREAM_RATE_LIMIT_PER_MINUTE": 60, "REDIS_URL": own_redis.url, "WEB_CONCURRENCY": 2}
    instances = [gunicorn_service(**settings), gunicorn_service(**settings)]
    urls = [instance.url for instance in instances]
    answers: list[tuple[int, dict]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        flooding = pool.submit(flood, urls, 150, 20, "outage")
        time.sleep(15)  # scenario timing: shared admission first
        own_redis.stop()
        time.sleep(60)
        own_redis.start()
        pauser = redis.Redis(port=own_redis.port, socket_timeout=5)
        pauser.execute_command("CLIENT", "PAUSE", 60_000, "ALL")  # every command waits past the 0.1 s timeout
        pauser.close()
        answers = flooding.result()
    assert sim.count_by_status().get(429, 0) == 0
    assert sim.max_in_window(60.0) <= 60
    assert calls_in_last(sim, 60.0) > 0  # while Redis was slow, each process used its share
    statuses = {status for status, _ in answers}
    assert statuses <= {200, 503}, statuses
    assert all(body["error"] == "rate_limited" for status, body in answers if status == 503)


@pytest.mark.slow
def test_bulk_warming_yields_to_live_messages_and_together_they_use_the_limit(gunicorn_service, sim, tmp_path):
    """A warm-up of 2,000 ids under a bulk key, and one live lookup of a new user a second."""
    limit = 600
    sim.rate_limit_per_minute = limit
    warm_key = "test-key-warm-0003"
    overrides = {
        "UPSTREAM_RATE_LIMIT_PER_MINUTE": limit,
        "PROXY_API_KEYS": f"braze:{BRAZE_KEY},curl:{CURL_KEY},warm:{warm_key}",
        "BULK_CALLERS": "warm",
    }
    settings = load_settings(base_env(sim, **overrides))
    service = gunicorn_service(**overrides)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(f"bulk-{n}" for n in range(2000)))
    live: list[dict] = []

    def ask_live(n: int) -> None:
        url = f"{service.url}/v1/users/live-{n}/recommendations/rec_home?default=d1"
        live.append(requests.get(url, headers={"Authorization": f"Bearer {BRAZE_KEY}"}, timeout=5).json())

    started = time.monotonic()
    ask_live(0)  # live traffic is there first; the warm-up starts into it
    env = {**os.environ, "PROXY_API_KEY": warm_key}
    warm = subprocess.Popen(
        [sys.executable, "-m", "app", "warm", str(ids), "--url", service.url, "--concurrency", "8", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for n in range(1, 80):
            time.sleep(max(0.0, started + n - time.monotonic()))  # one a second
            ask_live(n)
        together = calls_in_last(sim, 60.0)
    finally:
        warm.send_signal(signal.SIGTERM)
        try:
            warm.wait(timeout=20)
        except subprocess.TimeoutExpired:
            warm.kill()
            warm.wait()
    assert [answer["fallback"] for answer in live] == [False] * len(live), [a for a in live if a["fallback"]][:3]
    # The most the design lets through in 60 s here: the limit, counted over the admission
    # window (60 s + the send allowance + the connect timeout), so about 594 of 600. Each
    # slot is taken again a scheduling delay after it frees, so a busy machine gets a few
    # fewer (588 with the whole suite and two CPU hogs beside this test); the bar is
    # 118 of every 120, and wasting whole seconds (every warm worker pausing on a 503)
    # loses far more than that.
    ceiling = limit * 60.0 / settings.admission_window_seconds
    assert together >= ceiling * 118 / 120, (together, ceiling)
    assert sim.count_by_status().get(429, 0) == 0
    assert sim.max_in_window(60.0) <= limit
