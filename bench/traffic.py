"""What the load generators send: the route mix, warming, and URLs no request has named before.

Braze caches each Connected Content URL for five minutes, so the service mostly sees a
URL once: the headline load (*first answers*) is URLs the service has never answered,
for users whose profiles it has cached. :class:`UserPool` provides them: it warms users
in blocks (one request each, on a route outside the measured mix), and hands out each
(user, route) pair of the mix once, so no URL is ever sent twice to one server.
"""

from __future__ import annotations

import random
import time
from typing import Any

import requests

from bench.common import CALLER_AUTH, BenchError, Server, Simulator, log, run_once, write_paths

#: The route mix (the old hit path's), one template per route kind; ``{u}`` is a URL-safe user id.
ROUTES = {
    "recommendations": "/v1/users/{u}/recommendations/rec_home?limit=3",
    "properties": "/v1/users/{u}/properties?keys=first_name,plan",
    "cohorts": "/v1/users/{u}/cohorts/cohort_vip",
    "predictions": "/v1/users/{u}/predictions/pred_churn",
    "profile": "/v1/users/{u}",
}
#: The one request that caches a user's whole profile: a route outside the mix, so no
#: measured URL has been answered before.
WARM_ROUTE = "/v1/users/{u}/properties/first_name"
#: Connections warming a server (misses, each one Amplitude call).
WARM_CONNECTIONS = 8


def mix_paths(users: list[str], seed: int = 7) -> list[str]:
    """Every route of the mix for every user, shuffled."""
    paths = [template.format(u=user) for user in users for template in ROUTES.values()]
    random.Random(seed).shuffle(paths)
    return paths


def warm(server: Server, sim: Simulator, users: list[str], wrk_threads: int = 2) -> dict[str, int]:
    """Cache every user's profile with one request each (wrk, each line once, bounded in time).

    :raises BenchError: unless every answer was a 200 miss and each made one upstream call.
    """
    calls_before = sim.calls()
    paths = write_paths([WARM_ROUTE.format(u=user) for user in users], f"warm-{server.name}-{users[0]}.txt")
    with sim.latency(0):  # a scenario may have slowed the simulator down: warming is not measured
        # At least 100 misses a second, or the server is not working.
        result = run_once(server.url, paths, WARM_CONNECTIONS, 30 + len(users) / 100, threads=wrk_threads)
    calls = sim.calls() - calls_before
    if result.statuses != {"200 MISS": len(users)} or calls != len(users):
        raise BenchError(
            f"warming {len(users)} users on {server.name}: answers {result.statuses}, "
            f"{calls} upstream calls; one now gives: {server.probe(WARM_ROUTE.format(u=users[0]))}"
        )
    return result.statuses


class UserPool:
    """Cached users of one server, handed out as first answers: each (user, route) once.

    Users are warmed in blocks of *block* when more are needed. Pass *k* over a block
    gives user *i* the route ``(i + k) % 5``, so every pass is the same even mix, and a
    block serves five passes before the next block is warmed.
    """

    def __init__(self, server: Server, sim: Simulator, prefix: str, block: int, wrk_threads: int = 2) -> None:
        self.server, self.sim, self.prefix, self.block, self.wrk_threads = server, sim, prefix, block, wrk_threads
        self.blocks = 0  # warmed
        self.cursor = 0  # paths handed out so far
        self.warm_seconds = 0.0

    @property
    def users(self) -> int:
        return self.blocks * self.block

    def _user(self, block: int, index: int) -> str:
        return f"{self.prefix}-{block}-{index}"

    def _warm_block(self) -> None:
        started = time.monotonic()
        users = [self._user(self.blocks, i) for i in range(self.block)]
        warm(self.server, self.sim, users, self.wrk_threads)
        self.blocks += 1
        self.warm_seconds += time.monotonic() - started
        log(
            f"{self.server.name}: {self.users:,} users cached for first answers "
            f"({self.block / (time.monotonic() - started):,.0f} warmed a second)"
        )

    def take(self, count: int) -> list[str]:
        """*count* URLs no request has named, warming more users first if needed."""
        templates = list(ROUTES.values())
        per_block = self.block * len(templates)
        paths = []
        for n in range(self.cursor, self.cursor + count):
            block, rest = divmod(n, per_block)
            offset, index = divmod(rest, self.block)
            while block >= self.blocks:
                self._warm_block()
            paths.append(templates[(index + offset) % len(templates)].format(u=self._user(block, index)))
        self.cursor += count
        return paths


def sample_bodies(server: Server, user: str) -> dict[str, str]:
    """The service's answer for each route kind (a cached user), for the bare app to mirror in size."""
    bodies = {}
    with requests.Session() as session:
        session.headers["Authorization"] = CALLER_AUTH
        for kind, template in ROUTES.items():
            response = session.get(server.url + template.format(u=user), timeout=5)
            if response.status_code != 200 or response.headers.get("X-Cache") != "HIT":
                raise BenchError(
                    f"sampling {kind}: HTTP {response.status_code} {response.headers.get('X-Cache')} "
                    f"{response.text[:200]}"
                )
            bodies[kind] = response.text
    return bodies


def urls_needed(runs: list[dict[str, Any]], fallback_rps: float, duration: float) -> int:
    """URLs enough for a run of *duration*: the fastest run seen so far with a margin, or more
    over *fallback_rps* (a short warm-up's rate) before any. A run that outruns its list
    sends some URLs twice, and says how many (``repeated``)."""
    rps = max((run["rps"] for run in runs), default=0.0) or 1.5 * fallback_rps
    return int(rps * duration * 1.3) + 100
