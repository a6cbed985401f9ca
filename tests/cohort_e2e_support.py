"""What the end-to-end cohort webhook tests share: the service under gunicorn with webhooks on, a keep-alive
client, and a relay that makes Amplitude's pushes retry.

:func:`cohort_gunicorn` starts the real ``gunicorn.conf.py`` (the gevent worker, one process per core) with
``COHORT_WEBHOOK_SECRETS``, an admin key and ``COHORT_SETTLE_SECONDS=1``, on the tier a test names: Redis, or
(without ``REDIS_URL``) the temporary SQLite file gunicorn gives its workers. :class:`FlakyRelay` stands between
the simulator's pushes and the service and fails first attempts as a network would (refused before the service
saw the batch, or the service's ``200`` lost on the way back), so the simulator retries and the service sees
repeated ``message_id``\\ s.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from simulator import AmplitudeSimulator
from simulator.pushes import CohortPlan, CohortPushes
from testkit import wait_until
from tests.conftest import BRAZE_KEY, GunicornService, base_env

WEBHOOK_SECRET = "cohort-e2e-webhook-secret-0001"
ADMIN_KEY = "test-admin-key-cohorts-0003"
RECEIVER = "/v1/webhooks/amplitude/cohorts"
COHORT = "cohort_vip"
#: The settings every service here runs with, besides the tier's. Redis's production timeout (0.1 s, for a
#: server on the LAN) would read a starved CPU as an outage, and an answer the store missed costs a Profile API
#: call: these tests count those.
COHORT_SETTINGS = {
    "COHORT_WEBHOOK_SECRETS": WEBHOOK_SECRET,
    "ADMIN_API_KEYS": f"ops:{ADMIN_KEY}",
    "COHORT_SETTLE_SECONDS": "1",
    "REDIS_TIMEOUT_SECONDS": "1.0",
    "ACCESS_LOG": "false",
}
#: How long a whole push (a full sync and two rounds of changes, with retries) may take on a busy machine.
PUSH_TIMEOUT = 60.0


@dataclass
class CohortService:
    """A gunicorn service with cohort webhooks on, and what the tests ask of it."""

    process: GunicornService
    session: requests.Session

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port

    def admin(self, path: str, method: str = "GET") -> requests.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return self.session.request(method, self.url + path, headers=headers, timeout=10)

    def open_store(self) -> dict[str, Any]:
        response = self.admin("/v1/admin/cohorts/open", "POST")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def store(self) -> dict[str, Any]:
        response = self.admin("/v1/admin/cohorts")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def cohort(self, cohort_id: str = COHORT) -> dict[str, Any] | None:
        return next((c for c in self.store()["cohorts"] if c["cohort_id"] == cohort_id), None)

    def wait_authoritative(self, cohort_id: str = COHORT, timeout: float = 30.0) -> dict[str, Any]:
        """The cohort's status once it is authoritative (its full sync applied, then a second of quiet) and every
        batch received is applied."""

        def settled() -> dict[str, Any] | None:
            found = self.cohort(cohort_id)
            return found if found is not None and found["authoritative"] and not found["queued"] else None

        message = f"{cohort_id} did not become authoritative with nothing queued"
        return wait_until(settled, timeout=timeout, interval=0.2, message=message)

    def get(self, path: str, key: str | None = BRAZE_KEY) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.session.get(self.url + path, headers=headers, timeout=10)

    def post_batch(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[requests.Response, float]:
        """POST *body* to the receiver as Amplitude does (the secret unless *headers* say otherwise); the answer
        and the seconds the client waited for it."""
        sent = {"Content-Type": "application/json", "User-Agent": "Amplitude/Webhook/1.0"}
        sent.update({"Authorization": f"Bearer {WEBHOOK_SECRET}"} if headers is None else headers)
        started = time.perf_counter()
        response = self.session.post(self.url + RECEIVER, data=body, headers=sent, timeout=10)
        return response, time.perf_counter() - started

    def counted(self, series: str) -> float:
        """The sum of a series' samples on /metrics (every worker's, added up), e.g.
        ``proxy_cohort_batches_total{outcome="refused"}``."""
        name, _, labels = series.partition("{")
        wanted = [label for label in labels.rstrip("}").split(",") if label]
        text = self.admin("/metrics").text
        total = 0.0
        for line in text.splitlines():
            match = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
            if match and match.group(1) == name and all(label in (match.group(2) or "") for label in wanted):
                total += float(match.group(3))
        return total

    def close(self) -> None:
        self.session.close()
        self.process.stop()


@pytest.fixture(name="cohort_gunicorn")
def cohort_gunicorn_fixture(sim: AmplitudeSimulator, tmp_path: Path) -> Iterator[Callable[..., CohortService]]:
    """``cohort_gunicorn(REDIS_URL=...)``: gunicorn with cohort webhooks on; a setting given as None is left out
    (``AMPLITUDE_SECRET_KEY=None`` for EU mode)."""
    started: list[CohortService] = []

    def start(**overrides: Any) -> CohortService:
        env = base_env(sim, **{**COHORT_SETTINGS, **{k: v for k, v in overrides.items() if v is not None}})
        for name in [name for name, value in overrides.items() if value is None]:
            env.pop(name, None)
        process = GunicornService(env, tmp_path / f"gunicorn-cohorts-{len(started)}.log")
        service = CohortService(process, requests.Session())
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


@pytest.fixture(name="tier", params=["redis", "sqlite"])
def tier_fixture(request: pytest.FixtureRequest) -> dict[str, str]:
    """The shared tier's settings: a clean Redis, or none (gunicorn's workers then share a new temporary SQLite
    file, as the shipped configuration does on one machine)."""
    return {"REDIS_URL": request.getfixturevalue("redis_url")} if request.param == "redis" else {}


def push_and_wait(
    sim: AmplitudeSimulator, url: str, cohort_ids: Sequence[str] = (COHORT,), users: int = 5000
) -> CohortPushes:
    """Have the simulator push *cohort_ids* to *url* (a full sync, repeats, a late batch, changes out of order)
    and wait until every batch got its ``200``; returns the pushes (``.plans`` hold the truth)."""
    pushes: CohortPushes = sim.push_cohorts(url, WEBHOOK_SECRET, tuple(cohort_ids), users, 0.0)
    expected = sum(len(plan.deliveries()) for plan in pushes.plans)
    wait_until(lambda: len(pushes.results) >= expected, timeout=PUSH_TIMEOUT, interval=0.1,
               message=f"pushes unfinished: {pushes.report()}")  # fmt: skip
    report = pushes.report()
    assert report["delivered"] == report["batches"] == expected, report
    # Done (no later rounds): its idle keep-alive connection would hold gunicorn's shutdown for its graceful timeout.
    pushes.pusher.close()
    return pushes


def plan_of(pushes: CohortPushes, cohort_id: str = COHORT) -> CohortPlan:
    return next(plan for plan in pushes.plans if plan.cohort_id == cohort_id)


class FlakyRelay:
    """A hop between the simulator's pushes and the receiver that fails the first attempt of some batches.

    Of the distinct batches, in the order they arrive: every fourth from the second is *refused* (``503``, not
    forwarded: the service never saw it), every fourth from the fourth is *lost* (forwarded and queued, then the
    ``200`` lost on the way back: ``504``). Amplitude retries both; the second is the retry that repeats a
    ``message_id`` the service already holds. Every later attempt is forwarded as it is.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.session = requests.Session()
        self.seen: dict[str, int] = {}
        self.refused = 0
        self.lost = 0
        self._lock = threading.Lock()
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, self._application, threaded=True)
        self.server.daemon_threads = True  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_port}{RECEIVER}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _fault(self, body: bytes) -> str | None:
        try:
            message_id = str(orjson.loads(body)["message_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        with self._lock:
            first = message_id not in self.seen
            ordinal = self.seen.setdefault(message_id, len(self.seen))
            if not first:
                return None
            fault = {1: "refused", 3: "lost"}.get(ordinal % 4)
            if fault == "refused":
                self.refused += 1
            elif fault == "lost":
                self.lost += 1
            return fault

    def _application(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        body = request.get_data(cache=False)
        if request.method != "POST":  # the pushes' readiness probe
            response = Response(b"{}", 405, content_type="application/json")
            return response(environ, start_response)
        fault = self._fault(body)
        if fault == "refused":
            response = Response(b'{"error":"relay_refused"}', 503, content_type="application/json")
            return response(environ, start_response)
        forwarded = self.session.post(
            self.target + RECEIVER, data=body, timeout=10,
            headers={name: value for name, value in request.headers.items() if name.lower() in _FORWARDED},
        )  # fmt: skip
        if fault == "lost":
            response = Response(b'{"error":"relay_timeout"}', 504, content_type="application/json")
        else:
            response = Response(forwarded.content, forwarded.status_code, content_type="application/json")
        return response(environ, start_response)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.session.close()


_FORWARDED = {"authorization", "content-type", "user-agent"}


@pytest.fixture(name="flaky_relay")
def flaky_relay_fixture() -> Iterator[Callable[[str], FlakyRelay]]:
    """``flaky_relay(service.url).url``: where the simulator should push to be retried."""
    relays: list[FlakyRelay] = []

    def start(target: str) -> FlakyRelay:
        relay = FlakyRelay(target)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.close()


def ask_keep_alive(port: int, paths: Sequence[str], connections: int = 4) -> list[tuple[int, dict[str, Any]]]:
    """GET every path with the Braze key over a few keep-alive connections; (status, JSON body) in path order.

    A light client for thousands of lookups: ``http.client`` on persistent connections costs a fraction of
    what ``requests`` spends per request, so the service, not the client, is what takes the time.
    """
    headers = {"Authorization": f"Bearer {BRAZE_KEY}", "Host": "127.0.0.1"}
    answers: list[tuple[int, dict[str, Any]]] = [(0, {})] * len(paths)

    def run(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for index in range(offset, len(paths), connections):
                conn.request("GET", paths[index], headers=headers)
                response = conn.getresponse()
                answers[index] = (response.status, json.loads(response.read()))
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=connections) as pool:
        for done in [pool.submit(run, offset) for offset in range(connections)]:
            done.result()
    return answers
