"""Memory: resident memory per worker with N cached profiles, against their compact JSON size.

``in-process`` (always): :mod:`bench.memory_child` builds one app in a fresh process and
fills its cache with ``--memory-profiles`` (100,000) realistic profiles through the
service's own client and cache code; RSS from /proc before and after.

``http`` (``--memory-http-profiles N``, off in ``--quick``): one gunicorn worker
(``WEB_CONCURRENCY=1``, the default worker class, production settings, behind its
front) filled through the service's routes (each request a new user, the simulator
unlimited); the worker's RSS before and after.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import requests

from bench.common import (
    CALLER_AUTH,
    PROFILE_PREDICTION_IDS,
    PROFILE_REC_IDS,
    PYTHON,
    ROOT,
    UNLIMITED,
    BenchError,
    log,
    rss_bytes,
    run_wrk,
    service_env,
    start_server,
    start_simulator,
    write_paths,
)
from bench.options import Options

#: Connections filling the worker over HTTP, and the fresh profiles asked for at that
#: concurrency before the baseline is read.
FILL_CONNECTIONS, WARM_PROFILES = 32, 500


def in_process(count: int) -> dict[str, Any]:
    env = {"BENCH_REC_IDS": PROFILE_REC_IDS, "BENCH_PREDICTION_IDS": PROFILE_PREDICTION_IDS}
    completed = subprocess.run(
        [PYTHON, "-m", "bench.memory_child", str(count)],
        cwd=ROOT,
        env={**_clean_env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise BenchError(f"memory child failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["mode"] = "in-process"
    return _derive(result)


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}


def _derive(result: dict[str, Any]) -> dict[str, Any]:
    entries = max(1, result["entries"])
    result["rss_per_profile"] = (result["rss_filled"] - result["rss_baseline"]) / entries
    result["json_per_profile"] = result["json_bytes"] / max(1, result["count"])
    result["upstream_per_profile"] = result["upstream_bytes"] / max(1, result["count"])
    result["ratio"] = result["rss_per_profile"] / result["json_per_profile"] if result["json_per_profile"] else 0.0
    return result


def over_http(count: int, opts: Options) -> dict[str, Any]:
    """Fill a gunicorn worker through ``/v1/users/{id}``, fresh ids in rounds of wrk."""
    sim = start_simulator(rate_limit=None)
    server = None
    try:
        env = service_env(
            sim,
            UNLIMITED,
            workers=1,
            extra={**opts.service_env, "CACHE_MAX_ENTRIES": str(max(count, 100_000)), "CACHE_TTL_SECONDS": "3600"},
        )
        server = start_server("service-memory", env)
        (worker,) = server.worker_pids()
        # Every code path once (and connections opened) before the baseline, and every
        # request thread used, at the fill's concurrency: what a thread costs once (its
        # stack, its malloc arena) is not what a cached profile costs.
        with requests.Session() as session:
            session.headers["Authorization"] = CALLER_AUTH
            for n in range(200):
                session.get(f"{server.url}/v1/users/memwarm-{n}", timeout=5).raise_for_status()
        warm_ids = [f"/v1/users/memwarm-c-{n}" for n in range(WARM_PROFILES)]
        run_wrk(server.url, write_paths(warm_ids, "memory-warm.txt"), FILL_CONNECTIONS, 2.0, mode="sequential",
                threads=opts.wrk_threads)  # fmt: skip
        baseline = rss_bytes(worker)
        calls_start = sim.calls()
        started = time.monotonic()
        filled_ids: list[str] = []
        for round_number in range(50):  # bounded: rounds of a few seconds each
            done = sim.calls() - calls_start
            if done >= count or time.monotonic() - started > 600:
                break
            remaining = count - done
            ids = [f"mem-r{round_number}-{n}" for n in range(remaining)]
            filled_ids += ids
            lines = [f"/v1/users/{user}" for user in ids]
            paths = write_paths(lines, f"memory-r{round_number}.txt")
            # Sequential wrk stops sending fresh ids when the list ends (it wraps to
            # already-cached ids, which cost nothing); a short round keeps it honest.
            run_wrk(
                server.url,
                paths,
                FILL_CONNECTIONS,
                min(20.0, max(2.0, remaining / 300)),
                mode="sequential",
                threads=opts.wrk_threads,
            )
            log(f"memory: http fill round {round_number}: {sim.calls() - calls_start} profiles")
        entries = sim.calls() - calls_start
        time.sleep(0.5)
        filled = rss_bytes(worker)
    finally:
        if server is not None:
            server.stop()
        sim.proc.stop()
    # The kept profiles' compact JSON, from the service's own code on a sample of the ids
    # sent (some of the last round's ids may not have been reached: sizes barely vary).
    import orjson

    from bench.memory_child import profile_builder

    build = profile_builder(PROFILE_REC_IDS, PROFILE_PREDICTION_IDS)
    sample = filled_ids[:: max(1, len(filled_ids) // 1000)]
    json_bytes = sum(len(orjson.dumps(build(user)[1])) for user in sample) / max(1, len(sample)) * entries
    return _derive(
        {
            "mode": "http",
            "count": entries,
            "entries": entries,
            "rss_baseline": baseline,
            "rss_filled": filled,
            "json_bytes": json_bytes,
            "upstream_bytes": 0,
            "fill_seconds": time.monotonic() - started,
            "note": "compact JSON size: mean of a sample of the ids, times the profiles cached",
        }
    )


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    log(f"memory: filling {opts.memory_profiles} profiles in-process")
    results = [in_process(opts.memory_profiles)]
    if opts.memory_http_profiles:
        log(f"memory: filling {opts.memory_http_profiles} profiles through a gunicorn worker")
        results.append(over_http(opts.memory_http_profiles, opts))
    for result in results:
        log(
            f"memory: {result['mode']}: {result['entries']} profiles, "
            f"{result['rss_per_profile']:.0f} B RSS each vs {result['json_per_profile']:.0f} B compact JSON "
            f"({result['ratio']:.2f}x)"
        )
    allocations = results[0].get("allocations")
    if allocations:
        sites = ", ".join(f"{site['site']} {site['bytes']:.0f} B" for site in allocations["sites"])
        log(f"memory: Python allocations kept per cache.put: {allocations['per_put']:.0f} B ({sites})")
    return {"results": results, "seconds": time.monotonic() - started}
