"""Hit path: every profile cached, wrk over a mix of routes; the service against bare Flask.

Four gunicorn servers run side by side, each from the service's own gunicorn.conf.py:

- ``service``: the service, ``--service-workers`` x ``--service-threads`` (1 x 32);
- ``bare``: :mod:`bench.bare_app` under exactly the same settings;
- ``bare_2x16``: the bare app under gthread with 2 workers x 16 threads;
- ``service_default`` (not in ``--quick``): the service in its default configuration
  without Redis (what gunicorn.conf.py picks: one process per core, sharing the cache
  through the machine's shared tier): compared with ``bare_2x16``.

Before the runs, every path of the mix is answered once by every worker of each service
(:func:`warm_every_worker`), so the measured runs see the steady state of a long run:
every profile in every worker's own cache, every path's shaped answer kept.

Runs are interleaved (service, bare, bare 2x16, then again) so slow drift of the machine
hits every target alike; the figures are medians over ``--runs`` runs.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import requests

from bench.common import (
    CALLER_AUTH,
    LOG_DIR,
    UNLIMITED,
    BenchError,
    Server,
    cpu_seconds,
    log,
    median,
    rss_bytes,
    run_wrk,
    service_env,
    start_gunicorn,
    start_simulator,
    write_paths,
)
from bench.options import Options

#: The route mix, one path per route kind for a user id (already URL-safe).
ROUTES = {
    "recommendations": "/v1/users/{u}/recommendations/rec_home?limit=3",
    "properties": "/v1/users/{u}/properties?keys=first_name,plan",
    "cohorts": "/v1/users/{u}/cohorts/cohort_vip",
    "predictions": "/v1/users/{u}/predictions/pred_churn",
    "profile": "/v1/users/{u}",
}

TARGET_LABELS = {
    "service": "service",
    "bare": "bare Flask, same settings",
    "bare_2x16": "bare Flask, gthread 2 x 16",
    "service_default": "service, default configuration (one process per core, every cache warmed)",
}


def spread(results: list[dict[str, Any]]) -> dict[str, float]:
    """Lowest and highest req/s and p99 of a point's runs, shown beside the medians."""
    rps = [r["rps"] for r in results]
    p99 = [r["latency_us"]["p99"] / 1000 for r in results]
    return {"rps_min": min(rps), "rps_max": max(rps), "p99_min": min(p99), "p99_max": max(p99)}


def paired_ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> float:
    """The median of the runs' req/s ratios, run *i* of one server against run *i* of the other.

    The runs of one round go back to back, so a drift of the machine between rounds (a
    shared or virtual machine speeds up and slows down by tens of percent) cancels out
    in each ratio; a ratio of the two medians could set one round's run against another's.
    """
    pairs = [a["rps"] / b["rps"] for a, b in zip(ours, theirs, strict=True) if b["rps"]]
    return median(pairs) if pairs else 0.0


def mix_paths(users: list[str]) -> list[str]:
    """Every route for every user, shuffled (wrk then picks lines at random)."""
    paths = [template.format(u=user) for user in users for template in ROUTES.values()]
    random.Random(7).shuffle(paths)
    return paths


def warm(url: str, users: list[str], concurrency: int = 16, time_limit: float = 300.0) -> dict[str, int]:
    """GET every user's whole profile once (bounded: one request per user, a time limit)."""
    deadline = time.monotonic() + time_limit
    statuses: dict[str, int] = {}

    def one(chunk: list[str]) -> dict[str, int]:
        seen: dict[str, int] = {}
        with requests.Session() as session:
            session.headers["Authorization"] = CALLER_AUTH
            for user in chunk:
                if time.monotonic() > deadline:
                    seen["deadline"] = seen.get("deadline", 0) + 1
                    continue
                response = session.get(f"{url}/v1/users/{user}", timeout=5)
                key = f"{response.status_code} {response.headers.get('X-Cache', '-')}"
                seen[key] = seen.get(key, 0) + 1
        return seen

    chunks = [users[i::concurrency] for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        for seen in pool.map(one, chunks):
            for key, value in seen.items():
                statuses[key] = statuses.get(key, 0) + value
    return statuses


def worker_sessions(server: Server, path: str, per_worker: int, attempts: int = 400) -> dict[str, list[Any]]:
    """Keep-alive sessions pinned to each worker of *server*: {worker's id prefix: sessions}.

    A keep-alive connection stays with the worker that accepted it, and every answer's
    ``X-Request-ID`` starts with a prefix of that worker's own; so new connections are
    opened (the kernel spreads the accepts) until every worker holds *per_worker* of them.
    """
    found: dict[str, list[Any]] = {}
    for _ in range(attempts):
        if len(found) == server.workers and all(len(held) >= per_worker for held in found.values()):
            return found
        session = requests.Session()
        session.headers["Authorization"] = CALLER_AUTH
        response = session.get(server.url + path, timeout=5)
        held = found.setdefault(response.headers["X-Request-ID"][:16], [])
        if len(held) < per_worker:
            held.append(session)
        else:
            session.close()
    raise BenchError(f"{server.name}: no {per_worker} connections to each of {server.workers} workers "
                     f"in {attempts} attempts ({ {k: len(v) for k, v in found.items()} })")  # fmt: skip


def warm_every_worker(server: Server, sim: Any, paths: list[str], per_worker: int = 4) -> tuple[int, int]:
    """Answer every path of the mix once in every worker: (requests, upstream calls).

    Each worker then holds every profile in its own cache (not only in the shared tier)
    and the shaped answer of every path, as after a long run. Misses, if any profile is
    not cached yet, go to Amplitude once and are read back by the other workers.
    """
    start = sim.calls()
    pinned = worker_sessions(server, paths[0], per_worker)
    jobs = [(prefix, session, paths[i::per_worker]) for prefix, sessions in pinned.items()
            for i, session in enumerate(sessions)]  # fmt: skip

    def one(job: tuple[str, Any, list[str]]) -> int:
        prefix, session, chunk = job
        for path in chunk:
            response = session.get(server.url + path, timeout=5)
            if response.status_code != 200 or not response.headers["X-Request-ID"].startswith(prefix):
                worker = response.headers.get("X-Request-ID", "?")[:16]
                raise BenchError(f"warming {server.name}: {path} gave HTTP {response.status_code} "
                                 f"from worker {worker}, not {prefix}")  # fmt: skip
        session.close()
        return len(chunk)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answered = sum(pool.map(one, jobs))
    return answered, sim.calls() - start


def sample_bodies(url: str, user: str) -> dict[str, str]:
    """The service's answer for each route kind, for the bare app to mirror in size."""
    bodies = {}
    with requests.Session() as session:
        session.headers["Authorization"] = CALLER_AUTH
        for kind, template in ROUTES.items():
            response = session.get(url + template.format(u=user), timeout=5)
            if response.status_code != 200 or response.headers.get("X-Cache") != "HIT":
                raise BenchError(f"sampling {kind}: HTTP {response.status_code} {response.headers.get('X-Cache')}")
            bodies[kind] = response.text
    return bodies


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    users = [f"user-{100_000 + i}" for i in range(opts.users)]
    servers: list[Server] = []
    sim = start_simulator(rate_limit=None)
    try:
        workers, threads = opts.service_workers, opts.service_threads
        # The limit is raised out of the way for warming; a long TTL keeps every
        # profile fresh for the whole scenario (a stale one would trigger a refresh).
        env = service_env(sim, UNLIMITED, workers, threads, CACHE_TTL_SECONDS="3600")
        service = start_gunicorn("service", env)
        servers.append(service)
        log(f"hit: warming {len(users)} profiles through {service.url}")
        rss_before = {pid: rss_bytes(pid) for pid in service.worker_pids()}
        warm_started = time.monotonic()
        statuses = warm(service.url, users)
        warm_seconds = time.monotonic() - warm_started
        warmed_calls = sim.calls()
        if statuses.get("200 MISS", 0) != len(users) or warmed_calls != len(users):
            raise BenchError(f"warming did not cache every profile: {statuses}, {warmed_calls} upstream calls")
        rss_after = {pid: rss_bytes(pid) for pid in service.worker_pids()}

        bodies = sample_bodies(service.url, users[0])
        bodies_file = LOG_DIR / "bare-bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        paths = mix_paths(users)
        paths_file = write_paths(paths, "hit-paths.txt")
        mean_body = sum(len(b.encode()) for b in bodies.values()) / len(bodies)
        # Every path once, as a long run would have done: each answer's shaped body is kept.
        warm_every_worker(service, sim, paths)

        targets: dict[str, Server] = {"service": service}
        bare_env = dict(env, BENCH_BARE_BODIES=str(bodies_file))
        if "bare" in opts.hit_targets:
            targets["bare"] = start_gunicorn("bare", bare_env, "bench.bare_app:app")
            servers.append(targets["bare"])
        if "bare_2x16" in opts.hit_targets:
            env_2x16 = dict(bare_env, WEB_CONCURRENCY="2", GUNICORN_THREADS="16")
            targets["bare_2x16"] = start_gunicorn("bare-2x16", env_2x16, "bench.bare_app:app")
            servers.append(targets["bare_2x16"])
        if "service_default" in opts.hit_targets:
            default_env = dict(env, WEB_CONCURRENCY="", GUNICORN_THREADS="")  # "" is unset: gunicorn.conf.py chooses
            service_default = start_gunicorn("service-default", default_env, workers=os.cpu_count() or 1)
            servers.append(service_default)
            answered, warmed = warm_every_worker(service_default, sim, paths)
            log(f"hit: default configuration ({service_default.workers} workers): every path answered in every "
                f"worker ({answered} requests, {warmed} upstream calls for {len(users)} users)")  # fmt: skip
            targets["service_default"] = service_default

        runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
        upstream_during_load = upstream_during_load_2x16 = 0
        for conns in opts.connections:
            runs[conns] = {name: [] for name in targets}
            for server in targets.values():  # not measured: connections, caches, branch predictors
                run_wrk(server.url, paths_file, conns, 1, threads=opts.wrk_threads)
            for attempt in range(opts.runs):
                for name, server in targets.items():
                    calls_before = sim.calls()
                    pids = server.worker_pids()
                    cpu_before = cpu_seconds(pids)
                    result = run_wrk(server.url, paths_file, conns, opts.duration, threads=opts.wrk_threads)
                    cpu_us = (cpu_seconds(pids) - cpu_before) * 1e6 / max(1, result.requests)
                    if name == "service":
                        upstream_during_load += sim.calls() - calls_before
                    elif name == "service_default":
                        upstream_during_load_2x16 += sim.calls() - calls_before
                    server.check_alive()
                    if result.error_count:
                        log(f"hit: {name} answered errors; one of its paths now gives: {server.probe(paths[0])}")
                    runs[conns][name].append(asdict(result) | {"rps": result.rps, "cpu_us": cpu_us})
                    log(
                        f"hit: {name:<9} c={conns:<4} run {attempt + 1}/{opts.runs}: {result.rps:8.0f} req/s "
                        f"p50 {result.ms('p50'):6.2f} ms p99 {result.ms('p99'):7.2f} ms errors {result.error_count} "
                        f"CPU {cpu_us:5.0f} us/answer"
                    )
        rss_loaded = {pid: rss_bytes(pid) for pid in service.worker_pids()}
    finally:
        for server in reversed(servers):
            server.stop()
        sim.proc.stop()

    summary: dict[int, dict[str, dict[str, float]]] = {}
    ratios: dict[int, dict[str, float]] = {}
    for conns, by_target in runs.items():
        summary[conns] = {}
        for name, results in by_target.items():
            summary[conns][name] = {
                **spread(results),
                "rps": median([r["rps"] for r in results]),
                "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in results]),
                "p90_ms": median([r["latency_us"]["p90"] / 1000 for r in results]),
                "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in results]),
                "errors": sum(sum(r["errors"].values()) for r in results),
                "non_2xx": sum(r["errors"]["status"] for r in results),
                "timeouts": sum(r["errors"]["timeout"] for r in results),
                "requests": sum(r["requests"] for r in results),
                "cpu_us": median([r["cpu_us"] for r in results]) if all("cpu_us" in r for r in results) else None,
            }
        ratios[conns] = {
            name: paired_ratio(by_target["service"], by_target[name])
            for name in ("bare", "bare_2x16", "service_default")
            if name in by_target
        }
        if {"service_default", "bare_2x16"} <= set(by_target):
            ratios[conns]["default_vs_bare_2x16"] = paired_ratio(by_target["service_default"], by_target["bare_2x16"])
    return {
        "users": len(users),
        "paths": len(paths),
        "routes": list(ROUTES.values()),
        "mean_body_bytes": mean_body,
        "body_bytes": {kind: len(body.encode()) for kind, body in bodies.items()},
        "warm_seconds": warm_seconds,
        "warm_statuses": statuses,
        "upstream_calls_during_load": upstream_during_load,
        "upstream_calls_during_load_2x16": upstream_during_load_2x16,
        "targets": {
            name: {"label": TARGET_LABELS[name], "workers": server.workers, "threads": server.threads}
            for name, server in targets.items()
        },
        "runs": {str(k): v for k, v in runs.items()},
        "summary": summary,
        "ratios": ratios,
        "service_worker_rss": {
            "before_warm": sum(rss_before.values()),
            "after_warm": sum(rss_after.values()),
            "after_load": sum(rss_loaded.values()),
        },
        "duration": opts.duration,
        "run_count": opts.runs,
        "seconds": time.monotonic() - started,
    }
