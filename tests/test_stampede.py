"""Stampedes on the shipped configuration: every lookup the budget and the deadline allow is answered.

Real gunicorn with the repository's gunicorn.conf.py (the gevent worker, one process per
core, the processes sharing through their SQLite file or Redis), the simulator as
Amplitude, and dozens of concurrent client connections. A lookup waiting on Amplitude
holds nothing a cached answer needs, so there is no cap on waiting lookups and no refusal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from testkit import wait_until
from testkit.burst import Answer, burst
from testkit.processes import Proc, free_port, spawn, wait_http
from tests.conftest import BRAZE_KEY, SIM_SECRET

HEADERS = {"Authorization": f"Bearer {BRAZE_KEY}"}
#: Braze gives each call 2 s.
BRAZE_TIMEOUT = 2.0


class SimulatorProcess:
    """The Amplitude simulator in a process of its own, driven through its ``/_sim`` routes.

    These tests send hundreds of cold users at once. The suite's shared simulator runs in
    the test's own process, where its thread-per-connection server competes for the GIL
    with the burst client: on a loaded machine it was then slower to answer the burst than
    the service was to ask (py-spy: several times the service's CPU per call), and the
    misses ran out of the deadline waiting for the stand-in, not for the service.
    """

    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url

    @property
    def calls(self) -> int:
        response = requests.get(self.url + "/_sim/stats", timeout=10)
        response.raise_for_status()
        return int(response.json()["calls"])

    @property
    def latency_ms(self) -> float:
        response = requests.get(self.url + "/_sim/config", timeout=10)
        response.raise_for_status()
        return float(response.json()["latency_ms"])

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        requests.post(self.url + "/_sim/config", json={"latency_ms": value}, timeout=10).raise_for_status()

    def reset(self) -> None:
        requests.post(self.url + "/_sim/reset", json={}, timeout=10).raise_for_status()
        requests.post(self.url + "/_sim/config", json={"latency_ms": 0, "rate_limit_per_minute": None},
                      timeout=10).raise_for_status()  # fmt: skip


@pytest.fixture(scope="module")
def simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port),
            "--secret-key", SIM_SECRET, "--rate-limit", "0"]  # fmt: skip
    proc = spawn("simulator", argv, tmp_path_factory.mktemp("simulator") / "simulator.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/_sim/stats", proc)
        yield SimulatorProcess(proc, url)
    finally:
        proc.stop()


@pytest.fixture
def sim(simulator_process: SimulatorProcess) -> SimulatorProcess:
    """This module's stand-in for Amplitude (the services started here are pointed at it)."""
    simulator_process.reset()
    return simulator_process


def ask(base_urls: Sequence[str], paths: Sequence[str]) -> list[Answer]:
    """GET every path at once, one connection each, spreading them over *base_urls* (one client thread)."""
    ports = [urlsplit(url).port or 80 for url in base_urls]
    return burst([(ports[n % len(ports)], path) for n, path in enumerate(paths)], HEADERS)


def assert_all_have_data(answers: list[Answer]) -> None:
    refused = [
        (a.status, a.body.get("error"), a.body.get("message"), round(a.seconds, 3)) for a in answers if a.status != 200
    ]
    assert not refused, f"{len(refused)} of {len(answers)} refused: {refused[:5]}"
    assert all("cohort_ids" in a.body for a in answers)
    assert max(a.seconds for a in answers) < BRAZE_TIMEOUT


@pytest.mark.serial
@pytest.mark.parametrize(
    ("users", "times"), [(20, 10), (200, 1)], ids=["20 cold users x 10 at once", "200 distinct cold users at once"]
)
def test_a_stampede_of_cold_users_costs_one_call_per_user_and_refuses_nothing(gunicorn_service, sim, users, times):
    service = gunicorn_service()
    sim.latency_ms = 300
    answers = ask([service.url], [f"/v1/users/stampede-{n % users}/cohorts" for n in range(users * times)])
    assert_all_have_data(answers)
    assert sim.calls == users


@pytest.mark.serial
def test_two_instances_sharing_redis_refuse_nothing_and_call_once_per_user(gunicorn_service, sim, redis_url):
    first, second = gunicorn_service(REDIS_URL=redis_url), gunicorn_service(REDIS_URL=redis_url)
    sim.latency_ms = 300
    # 60 cold users, each asked four times at once, alternately through the two instances.
    answers = ask([first.url, second.url], [f"/v1/users/fleet-{n % 60}/cohorts" for n in range(240)])
    assert_all_have_data(answers)
    assert sim.calls == 60


@pytest.mark.serial
def test_cached_answers_stay_quick_while_150_misses_wait_on_a_slow_upstream(gunicorn_service, sim):
    # Amplitude answering in 1.2 s: past the default read timeout (1 s), so allow it (the
    # most the settings accept) and the misses wait for their data rather than time out.
    service = gunicorn_service(UPSTREAM_READ_TIMEOUT="1.4")
    cached = [f"/v1/users/hot-{n}/cohorts" for n in range(5)]
    assert_all_have_data(ask([service.url], cached))
    sim.latency_ms = 1200
    calls_before = sim.calls
    misses: list[Answer] = []
    with ThreadPoolExecutor(max_workers=1) as background:
        waiting = background.submit(ask, [service.url], [f"/v1/users/slow-{n}/cohorts" for n in range(150)])
        # Every miss has reached Amplitude and is waiting on it.
        wait_until(lambda: sim.calls - calls_before >= 150, timeout=10, message="the misses did not all start")
        hits = timed_hits(service.url, cached * 4, still_waiting=lambda: not waiting.done())
        misses = waiting.result()
    assert all(hit.status == 200 and "cohort_ids" in hit.body for hit in hits)
    assert max(hit.seconds for hit in hits) < 0.3, sorted(hit.seconds for hit in hits)[-5:]
    # Every miss is answered within Braze's timeout: with data, or, when the 1.5 s deadline
    # from arrival ran out first (1.2 s upstream on a busy machine), a retryable 503 of that
    # deadline. None is turned away for the number of requests waiting.
    assert max(miss.seconds for miss in misses) < BRAZE_TIMEOUT
    late = [miss.body for miss in misses if miss.status != 200]
    assert all(body["error"] == "upstream_unavailable" and body["retry_after"] >= 1 for body in late), late[:3]
    assert not [body for body in late if "waiting" in body["message"]]
    assert all("cohort_ids" in miss.body for miss in misses if miss.status == 200)


def timed_hits(base_url: str, paths: Sequence[str], still_waiting: Callable[[], bool]) -> list[Answer]:
    """Ask *paths* one after another on one connection while the misses are still waiting."""
    answers = []
    with requests.Session() as session:
        for path in paths:
            started = time.monotonic()
            response = session.get(base_url + path, headers=HEADERS, timeout=10)
            answers.append(
                Answer(response.status_code, dict(response.headers), response.json(), time.monotonic() - started)
            )
    assert still_waiting(), "the hits were not measured while the misses waited: the upstream is too fast"
    return answers
