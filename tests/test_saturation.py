"""Saturation: a slow upstream, misses flooding in, and the cached answers still quick.

Real gunicorn (one gevent worker), upstream slowed to 1.3 s, 56 clients asking for
new users and 8 asking for 5 cached users, for 30 s. Bounded in time; loopback only.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time

import pytest
import requests

from tests.conftest import BRAZE_KEY

BRAZE_TIMEOUT = 2.0
HEADERS = {"Authorization": f"Bearer {BRAZE_KEY}"}


@pytest.mark.slow
@pytest.mark.serial
def test_every_answer_stays_inside_brazes_timeout_and_hits_stay_quick(gunicorn_service, sim):
    # One worker, as above: the default is one per core, and this is about one worker's
    # greenlets; a second would also take the core the 64 client threads here measure with.
    service = gunicorn_service(WEB_CONCURRENCY=1)
    cached = [f"user-hot{n}" for n in range(5)]
    for user in cached:
        assert requests.get(f"{service.url}/v1/users/{user}/cohorts", headers=HEADERS, timeout=5).ok
    sim.latency_ms = 1300
    stop_at = time.monotonic() + 30
    counter = itertools.count()
    answers: list[tuple[str, float, int, str]] = []  # kind, seconds, status, request id
    lock = threading.Lock()

    def client(kind: str, n: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                user = cached[n % 5] if kind == "hit" else f"user-new{next(counter)}"
                started = time.monotonic()
                response = session.get(f"{service.url}/v1/users/{user}/cohorts", headers=HEADERS, timeout=10)
                elapsed = time.monotonic() - started
                with lock:
                    answers.append((kind, elapsed, response.status_code, response.headers["X-Request-ID"]))
                if response.status_code != 200:
                    time.sleep(0.1)  # Braze backs off too

    threads = [threading.Thread(target=client, args=("miss", n)) for n in range(56)]
    threads += [threading.Thread(target=client, args=("hit", n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert max(seconds for _, seconds, _, _ in answers) < BRAZE_TIMEOUT
    assert all(status == 200 for kind, _, status, _ in answers if kind == "hit")
    # The service's own durations, from arrival (queue included): what it promises. The
    # client's 64 threads share this interpreter and, in the suite, two cores with other
    # tests, so its clock adds its own scheduling; it must agree within 100 ms below.
    logged = {}
    for line in service.logs().splitlines():
        if line.startswith('{"time"') and '"event":"request"' in line:
            record = json.loads(line)
            logged[record["request_id"]] = record["total_ms"] / 1000
    hits = sorted(logged[rid] for kind, _, _, rid in answers if kind == "hit" and rid in logged)
    assert len(hits) > 100 and hits[int(len(hits) * 0.99)] < 0.25, hits[-5:]
    gaps = sorted(seconds - logged[rid] for _, seconds, _, rid in answers if rid in logged)
    assert len(gaps) >= 0.99 * len(answers)
    # The queueing the log did not see (the old fault) was about a second per request.
    # Idle, the median gap is a few ms and 95% are within 100 ms; with two CPU hogs and the
    # rest of the suite beside it, the test client's own 64 threads add tens of ms.
    assert statistics.median(gaps) < 0.1 and gaps[int(len(gaps) * 0.95)] < 0.25, gaps[-5:]
