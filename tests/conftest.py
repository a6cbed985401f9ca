"""Fixtures mirroring the factory: a running simulator, services over real HTTP, Redis."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from werkzeug.serving import BaseWSGIServer, make_server

from app import create_app
from app.clock import SYSTEM_CLOCK, Clock
from app.observability import ACCESS_LOG
from app.settings import SettingsSchema
from app.stores.sqlite_schema import initialise
from simulator import AmplitudeSimulator
from testkit.clock import FakeClock
from testkit.processes import RedisServer, free_port, gunicorn_env, start_gunicorn

ROOT = Path(__file__).resolve().parent.parent
SIM_SECRET = "sim-secret-key-for-tests"
BRAZE_KEY = "test-key-braze-0001"
CURL_KEY = "test-key-curl-0002"


def base_env(sim: AmplitudeSimulator, **overrides: Any) -> dict[str, str]:
    """Settings for a service pointed at *sim*; tests override what they exercise."""
    env = {
        "AMPLITUDE_SECRET_KEY": SIM_SECRET,
        "AMPLITUDE_API_URL": sim.url,
        "ALLOW_INSECURE_UPSTREAM": "true",
        "PROXY_API_KEYS": f"braze:{BRAZE_KEY},curl:{CURL_KEY}",
        "PROFILE_REC_IDS": "rec_home,rec_email",
        "PROFILE_PREDICTION_IDS": "pred_churn,pred_purchase",
        # Functional tests are not about the budget: keep it out of their way.
        "UPSTREAM_RATE_LIMIT_PER_MINUTE": "1000000",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


@pytest.fixture(autouse=True)
def _access_lines_stay_with_their_test() -> Iterator[None]:
    """Access lines are written in rounds, not per request: write a test's own before it ends,
    so they land in its captured output and not in the next test's."""
    yield
    ACCESS_LOG.flush()


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[AmplitudeSimulator]:
    sim = AmplitudeSimulator(secret_key=SIM_SECRET, port=0, rate_limit_per_minute=None)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def sim(simulator_server: AmplitudeSimulator) -> Iterator[AmplitudeSimulator]:
    """The shared simulator, clean for each test."""
    simulator_server.reset()
    simulator_server.latency_ms = 0
    simulator_server.rate_limit_per_minute = None
    simulator_server.unknown_user_status = 200
    yield simulator_server
    simulator_server.set_fault("none")


@dataclass
class RunningService:
    """One service instance served over real HTTP on loopback."""

    url: str
    app: Any
    server: BaseWSGIServer
    session: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str, *, key: str | None = BRAZE_KEY, **kwargs: Any) -> requests.Response:
        """GET *path* with the Braze caller key as a Bearer token (``key=None``: no credentials)."""
        headers = dict(kwargs.pop("headers", {}) or {})
        if key is not None and "Authorization" not in headers and "X-API-Key" not in headers:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", 5)
        return self.session.get(self.url + path, headers=headers, **kwargs)

    @property
    def extensions(self) -> Any:
        return self.app.extensions["profile_proxy"]


@pytest.fixture
def make_service(sim: AmplitudeSimulator) -> Iterator[Callable[..., RunningService]]:
    """Build and serve an app with settings overrides: ``make_service(CACHE_TTL_SECONDS=5)``."""
    running: list[RunningService] = []

    def build(clock: Clock = SYSTEM_CLOCK, **overrides: Any) -> RunningService:
        # werkzeug's test server gives every connection a thread of its own. Redis shares this
        # busy machine with the whole suite: its production timeout (0.1 s, for a server on
        # the LAN) would read CPU starvation as an outage; tests of slow or absent Redis set
        # their own (or kill it, which fails at once).
        defaults = {"REDIS_TIMEOUT_SECONDS": 1.0}
        app = create_app(environ=base_env(sim, **{**defaults, **overrides}), clock=clock)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        server.daemon_threads = True  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        service = RunningService(f"http://127.0.0.1:{server.server_port}", app, server)
        running.append(service)
        return service

    yield build
    for service in running:
        service.server.shutdown()
        service.server.server_close()
        service.session.close()
        service.extensions.close()


@pytest.fixture
def service(make_service: Callable[..., RunningService]) -> RunningService:
    return make_service()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_session: RedisServer | str) -> str:
    """A clean Redis for each test."""
    url = redis_session if isinstance(redis_session, str) else redis_session.url
    if isinstance(redis_session, RedisServer) and not redis_session.running:
        redis_session.start()
    flush_redis(url)
    return url


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """Settings for services sharing one new SQLite file: two services on it are two processes
    of one machine. Like a clean Redis, the file knows nothing was spent before it."""
    path = str(tmp_path / "shared.sqlite3")
    initialise(path, history_known=True)
    return {"SHARED_STATE_PATH": path}


@pytest.fixture(params=["redis", "sqlite"])
def shared_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings for services that share cache, claims and budget: a clean Redis, or a new SQLite file."""
    return (
        {"REDIS_URL": request.getfixturevalue("redis_url")}
        if request.param == "redis"
        else request.getfixturevalue("sqlite_env")
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test alone owns, to kill and restart."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class GunicornService:
    """The service under its real ``gunicorn.conf.py``, as a subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, extra_flags: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log_path = log_path
        # Only the settings this test chose: nothing leaks in from the caller's environment.
        unset = [*SettingsSchema().fields, "WEB_CONCURRENCY", "GUNICORN_WORKER_CLASS", "GUNICORN_THREADS"]
        self.proc, self.url = start_gunicorn(
            "gunicorn", gunicorn_env(env, self.port, unset), log_path, extra_flags=extra_flags
        )

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.proc.popen

    def logs(self) -> str:
        return self.proc.logs()

    def stop(self) -> None:
        self.proc.stop(timeout=25)


@pytest.fixture
def gunicorn_service(sim: AmplitudeSimulator, tmp_path: Path) -> Iterator[Callable[..., GunicornService]]:
    started: list[GunicornService] = []

    def start(*extra_flags: str, **overrides: Any) -> GunicornService:
        """gunicorn with these settings (and command-line flags, e.g. ``--proxy-protocol``)."""
        service = GunicornService(
            base_env(sim, **overrides), tmp_path / f"gunicorn-{len(started)}.log", tuple(extra_flags)
        )
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
