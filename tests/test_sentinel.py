"""Redis that fails over rather than fails: the service follows a Sentinel failover.

Real processes on loopback: a Redis primary, a replica, three sentinels (Debian's
``redis-server --sentinel``, quorum 2, ``down-after-milliseconds`` 1000), two instances of
the service (two machines: each its own master, worker and file) reaching Redis only
through the sentinels, and the simulator as Amplitude with the limit enforced. The
primary is killed mid-traffic; the sentinels promote the replica.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from testkit import wait_until
from testkit.processes import Proc, free_port, spawn
from tests.conftest import BRAZE_KEY

SERVICE = "mymaster"
LIMIT = 40
AUTH = {"Authorization": f"Bearer {BRAZE_KEY}"}


@dataclass
class SentinelSet:
    """A primary, its replica and three sentinels watching them, on loopback."""

    primary: Proc
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                _, found = client.sentinel_get_master_addr_by_name(SERVICE)
                return int(found)
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        return None

    @property
    def setting(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)


def _redis(args: list[str], workdir: Path, name: str) -> Proc:
    return spawn(name, ["redis-server", *args], workdir / f"{name}.log")


def _in_sync(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    primary_port, replica_port = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
              "--repl-diskless-sync-delay", "0"]  # fmt: skip
    started = [_redis(["--port", str(primary_port), *common], tmp_path, "primary")]
    started.append(_redis(["--port", str(replica_port), *common, "--replicaof", "127.0.0.1", str(primary_port)],
                          tmp_path, "replica"))  # fmt: skip
    wait_until(lambda: _in_sync(replica_port), timeout=10, message="replica not in sync")
    ports = [free_port() for _ in range(3)]
    for n, port in enumerate(ports):
        config = tmp_path / f"sentinel-{n}.conf"  # a sentinel rewrites its own file
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 4000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        started.append(_redis([str(config), "--sentinel"], tmp_path, f"sentinel-{n}"))

    def each_knows_the_others_and_the_replica() -> bool:
        for port in ports:
            client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                state = client.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    wait_until(each_knows_the_others_and_the_replica, timeout=15, interval=0.2, message="sentinels not ready")
    yield SentinelSet(started[0], primary_port, replica_port, ports)
    for proc in reversed(started):
        proc.stop()


@dataclass
class Traffic:
    """Requests to the instances from one thread, each recorded as (time, kind, status, X-Cache)."""

    urls: list[str]
    cached: list[str]
    answers: list[tuple[float, str, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        counter = itertools.count()
        with requests.Session() as session:
            while not self._stop.is_set():
                n = next(counter)
                for kind, user in (("cached", self.cached[n % len(self.cached)]), ("new", f"user-new-{n}")):
                    url = f"{self.urls[n % len(self.urls)]}/v1/users/{user}/cohorts"
                    try:
                        answer = session.get(url, headers=AUTH, timeout=5)
                        self.answers.append((time.monotonic(), kind, answer.status_code, answer.headers["X-Cache"]
                                             if "X-Cache" in answer.headers else ""))  # fmt: skip
                    except requests.RequestException:
                        self.answers.append((time.monotonic(), kind, 0, ""))
                self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()


def test_a_failover_is_followed_without_a_429_or_more_than_the_limit(gunicorn_service, sim, sentinels):
    started = time.monotonic()
    sim.rate_limit_per_minute = LIMIT
    settings = {"REDIS_SENTINELS": sentinels.setting, "REDIS_SENTINEL_SERVICE": SERVICE, "WEB_CONCURRENCY": 1,
                "UPSTREAM_RATE_LIMIT_PER_MINUTE": LIMIT, "REDIS_TIMEOUT_SECONDS": 0.5}  # fmt: skip
    services = [gunicorn_service(**settings), gunicorn_service(**settings)]
    urls = [service.url for service in services]
    cached = [f"user-cached-{n}" for n in range(4)]
    for user in cached:  # fetched once, then held by both instances (one worker each)
        for url in urls:
            assert requests.get(f"{url}/v1/users/{user}/cohorts", headers=AUTH, timeout=5).status_code == 200
    assert sim.calls == len(cached)
    for n in range(10):
        assert requests.get(f"{urls[n % 2]}/v1/users/user-before-{n}/cohorts", headers=AUTH, timeout=5).ok

    traffic = Traffic(urls, cached)
    sender = threading.Thread(target=traffic.run, daemon=True)
    sender.start()
    try:
        wait_until(lambda: len(traffic.answers) >= 4, timeout=10, message="no traffic")
        os.kill(sentinels.primary.pid, signal.SIGKILL)
        wait_until(lambda: sentinels.master_port() == sentinels.replica_port, timeout=20, interval=0.1,
                   message="no failover")  # fmt: skip
        failed_over = time.monotonic()

        def new_user_served() -> float | None:
            served = [at for at, kind, status, cache in traffic.answers
                      if kind == "new" and status == 200 and cache == "MISS" and at > failed_over]  # fmt: skip
            return served[0] if served else None

        served_at = wait_until(new_user_served, timeout=15, interval=0.1, message="no new user served after failover")
        # New users keep coming until the budget is spent, and some more: none gets past it.
        wait_until(lambda: sim.calls >= LIMIT - 1, timeout=20, interval=0.1, message="the budget was never spent")
        spent = len(traffic.answers)
        wait_until(lambda: len(traffic.answers) >= spent + 10, timeout=10, message="no traffic after the limit")
    finally:
        traffic.stop()
        sender.join(timeout=10)
    assert served_at - failed_over < 15
    cached_answers = [(status, cache) for _, kind, status, cache in traffic.answers if kind == "cached"]
    assert cached_answers and all(status == 200 for status, _ in cached_answers), cached_answers
    assert sim.count_by_status().get(429, 0) == 0
    assert sim.max_in_window(60.0) <= LIMIT and sim.calls <= LIMIT  # all within one window
    for service in services:  # both back on the new primary (at the latest by their next heartbeat)

        def on_redis(url: str = service.url) -> bool:
            ready = requests.get(f"{url}/readyz", timeout=5).json()["checks"]
            return ready["redis"] == "ok" and ready["admission"] == "shared"

        wait_until(on_redis, timeout=10, interval=0.2, message="an instance not back on Redis")
    assert time.monotonic() - started < 60
