"""First answers: URLs the service has never answered, for cached users; against bare Flask.

For each worker class (``--worker-classes``), two servers run side by side, each from
the repository's ``gunicorn.conf.py`` with the same environment (so the same worker
class, workers and threads) and each behind its own nginx front (``deploy/nginx``):

- ``service``: the service with the shipped production settings (the front trusted,
  the allowlist naming 127.0.0.0/8, no Redis: several workers share through SQLite);
- ``bare``: :mod:`bench.bare_app`, a constant JSON body per route of the size the
  service answers.

*First answers* (the headline): every request a URL no request has named before, over
users whose profiles were cached beforehand (one request each, on a route outside the
mix): :class:`bench.traffic.UserPool`. *Repeated URLs* (the old hit path): wrk picks at
random among every route of ``--users`` cached users, so URLs repeat; measured beside
it for comparison with earlier figures.

Runs are interleaved, service and bare back to back (which goes first alternates by
round), and each ratio is the median of the run pairs' ratios.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from bench.common import (
    LOG_DIR,
    UNLIMITED,
    BenchError,
    Server,
    Simulator,
    WrkResult,
    cpu_seconds,
    each_worker_class,
    log,
    median,
    paired_ratio,
    rss_bytes,
    run_once,
    run_wrk,
    service_env,
    start_server,
    write_paths,
)
from bench.options import Options
from bench.traffic import ROUTES, UserPool, mix_paths, sample_bodies, urls_needed, warm

TARGETS = ("service", "bare")
#: Until a run has been seen: what the repeated-URL warm-up run measured, at least this.
FLOOR_RPS = 1000.0


def class_env(opts: Options, sim: Simulator, worker_class: str, **extra: str) -> dict[str, str]:
    """The service's environment for one worker class (the bare app gets the same)."""
    threads = opts.gthread_threads if worker_class == "gthread" else None
    chosen = None if worker_class == "default" else worker_class
    return service_env(sim, UNLIMITED, chosen, threads, opts.workers, {**opts.service_env, **extra})


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and the spread) of one server's runs at one point."""
    rps = [r["rps"] for r in results]
    p99 = [r["latency_us"]["p99"] / 1000 for r in results]
    return {
        "rps": median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in results]),
        "p90_ms": median([r["latency_us"]["p90"] / 1000 for r in results]),
        "p99_ms": median(p99),
        "p99_min": min(p99),
        "p99_max": max(p99),
        "max_ms": max(r["latency_us"]["max"] / 1000 for r in results),
        "errors": sum(sum(r["errors"].values()) for r in results),
        "non_2xx": sum(r["errors"]["status"] for r in results),
        "timeouts": sum(r["errors"]["timeout"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "repeated": sum(r.get("repeated", 0) for r in results),
        "cpu_us": median([r["cpu_us"] for r in results]),
    }


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """The service against bare Flask, run pair by run pair: req/s and p99 ratios (medians)."""
    service, bare = runs["service"], runs["bare"]
    return {
        "rps": paired_ratio([r["rps"] for r in service], [r["rps"] for r in bare]),
        "p99": paired_ratio([r["latency_us"]["p99"] for r in service], [r["latency_us"]["p99"] for r in bare]),
    }


def _measure(server: Server, paths_file: Any, conns: int, opts: Options, mode: str) -> dict[str, Any]:
    pids = server.worker_pids()
    cpu_before = cpu_seconds(pids)
    result: WrkResult = run_wrk(server.url, paths_file, conns, opts.duration, mode=mode, threads=opts.wrk_threads)
    cpu_us = (cpu_seconds(pids) - cpu_before) * 1e6 / max(1, result.requests)
    server.check_alive()
    if result.error_count:
        log(f"{server.name}: {result.error_count} errors {result.errors}")
    return asdict(result) | {"rps": result.rps, "cpu_us": cpu_us}


def _worker_rss(server: Server) -> list[int]:
    return [rss_bytes(pid) for pid in server.worker_pids()]


def run_class(opts: Options, sim: Simulator, worker_class: str) -> dict[str, Any]:
    started = time.monotonic()
    servers: list[Server] = []
    # Nothing turns stale during the scenario (a stale profile would be refreshed upstream).
    env = class_env(opts, sim, worker_class, CACHE_TTL_SECONDS="3600")
    try:
        service = start_server(f"service-{worker_class}", env)
        servers.append(service)
        log(f"first: {worker_class}: the service runs {service.config.shape} ({service.config.worker_class})")
        rss_start = _worker_rss(service)

        # The repeated-URL mix: its users cached, the bare app's bodies sampled from them.
        repeat_users = [f"rep-{worker_class}-{n}" for n in range(opts.users)]
        warm(service, sim, repeat_users, opts.wrk_threads)
        bodies = sample_bodies(service, repeat_users[0])
        bodies_file = LOG_DIR / f"bare-bodies-{worker_class}.json"
        bodies_file.write_text(json.dumps(bodies))
        bare = start_server(f"bare-{worker_class}", dict(env, BENCH_BARE_BODIES=str(bodies_file)), "bench.bare_app:app")
        servers.append(bare)
        if bare.config != service.config:
            raise BenchError(f"the bare app runs {bare.config}, the service {service.config}")
        targets = {"service": service, "bare": bare}

        repeat_paths = mix_paths(repeat_users)
        repeat_file = write_paths(repeat_paths, f"repeat-{worker_class}.txt")
        # The steady state of a long run: every URL of the mix answered once per worker on average.
        steady = repeat_paths * service.config.workers
        run_once(
            service.url,
            write_paths(steady, f"repeat-steady-{worker_class}.txt"),
            16,
            30 + len(steady) / 100,
            threads=opts.wrk_threads,
        )
        warmup = {}  # not measured: connections, caches, branch predictors
        for name, server in targets.items():
            warmup[name] = run_wrk(server.url, repeat_file, max(opts.connections), 1, threads=opts.wrk_threads)
        fallback = max(FLOOR_RPS, *(result.rps for result in warmup.values()))

        pool = UserPool(
            service,
            sim,
            f"fa-{worker_class}",
            block=max(500, int(fallback * opts.duration / 2)),
            wrk_threads=opts.wrk_threads,
        )
        first: dict[int, dict[str, list[dict[str, Any]]]] = {
            c: {name: [] for name in targets} for c in opts.connections
        }
        repeat: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        upstream_during_load = 0
        for attempt in range(opts.runs):
            order = list(targets) if attempt % 2 == 0 else list(reversed(targets))
            for conns in opts.connections:
                # Enough for the faster server: the bare app gets the same list.
                wanted = urls_needed(first[conns]["service"] + first[conns]["bare"], fallback, opts.duration)
                paths_file = write_paths(pool.take(wanted), f"first-{worker_class}-c{conns}-r{attempt}.txt")
                for name in order:
                    calls_before = sim.calls()
                    entry = _measure(targets[name], paths_file, conns, opts, "sequential")
                    if name == "service":
                        upstream_during_load += sim.calls() - calls_before
                    first[conns][name].append(entry | {"urls": wanted})
                    log(
                        f"first: {worker_class} {name:<7} c={conns:<4} run {attempt + 1}/{opts.runs}: "
                        f"{entry['rps']:8.0f} req/s p50 {entry['latency_us']['p50'] / 1000:6.2f} ms "
                        f"p99 {entry['latency_us']['p99'] / 1000:7.2f} ms errors {sum(entry['errors'].values())} "
                        f"repeated URLs {entry['repeated']}"
                    )
            rss_after_first = _worker_rss(service)
            for name in order:
                entry = _measure(targets[name], repeat_file, opts.repeat_connections, opts, "random")
                repeat[name].append(entry)
                log(
                    f"repeat: {worker_class} {name:<7} c={opts.repeat_connections:<4} run {attempt + 1}/{opts.runs}: "
                    f"{entry['rps']:8.0f} req/s p99 {entry['latency_us']['p99'] / 1000:7.2f} ms"
                )
        bare_rss = _worker_rss(bare)
    finally:
        for server in reversed(servers):
            server.stop()

    return {
        "worker_class": service.config.worker_class,
        "kind": service.config.kind,
        "requested": worker_class,
        "shape": service.config.shape,
        "config": asdict(service.config),
        "gunicorn_flags": list(service.flags),
        "first": {
            str(conns): {
                "summary": {name: summarise(runs) for name, runs in by_target.items()},
                "ratios": compare(by_target),
                "runs": by_target,
            }
            for conns, by_target in first.items()
        },
        "repeat": {
            "connections": opts.repeat_connections,
            "summary": {name: summarise(runs) for name, runs in repeat.items()},
            "ratios": compare(repeat),
            "runs": repeat,
        },
        "upstream_calls_during_load": upstream_during_load,
        "first_answer_users": pool.users,
        "warm_seconds": pool.warm_seconds,
        "repeat_users": len(repeat_users),
        "repeat_paths": len(repeat_paths),
        "body_bytes": {kind: len(body.encode()) for kind, body in bodies.items()},
        "service_worker_rss": {"start": rss_start, "after_first_answers": rss_after_first},
        "bare_worker_rss": bare_rss,
        "seconds": time.monotonic() - started,
    }


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    classes = each_worker_class(opts.worker_classes, lambda sim, worker_class: run_class(opts, sim, worker_class))
    return {
        "classes": classes,
        "routes": list(ROUTES.values()),
        "connections": list(opts.connections),
        "duration": opts.duration,
        "run_count": opts.runs,
        "seconds": time.monotonic() - started,
    }
