"""Miss path: every request a cold user; the service's latency over a direct simulator call.

The simulator answers after ``--miss-latency-ms`` (100 ms); both limits are out of the way.
wrk sends, at a modest concurrency, the same cold-user workload two ways, interleaved
run by run:

- ``direct``: straight to the simulator, exactly the request the service would make
  (same query parameters and ``Authorization: Api-Key`` header);
- ``service``: through the service's front (production settings, the default worker
  class and workers), a mix of its routes, each request for a user no request has named
  before (wrk walks a list of fresh ids without repeating).

Added latency = service percentile - direct percentile (medians over runs). The
upstream call count during each service run must equal its requests (all cold).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict
from typing import Any

from bench.common import (
    PROFILE_PREDICTION_IDS,
    PROFILE_REC_IDS,
    SIM_AUTH,
    SIM_SECRET,
    UNLIMITED,
    log,
    median,
    run_wrk,
    service_env,
    start_server,
    start_simulator,
    write_paths,
)
from bench.options import Options
from bench.traffic import ROUTES


@functools.cache
def _planner() -> Any:
    from app.core.query import QueryPlanner
    from app.settings import Settings

    settings = Settings(
        amplitude_secret_key=SIM_SECRET,
        profile_rec_ids=tuple(PROFILE_REC_IDS.split(",")),
        profile_prediction_ids=tuple(PROFILE_PREDICTION_IDS.split(",")),
    )
    return QueryPlanner(settings)


def upstream_path(user: str) -> str:
    """The Amplitude request the service makes for *user*'s whole profile (its own planner)."""
    from app.core.query import Identity

    query = _planner().whole(Identity("user_id", user))
    return "/v1/userprofile?" + query.upstream_query()


def cold_lines(prefix: str, count: int, direct: bool) -> list[str]:
    templates = list(ROUTES.values())
    lines = []
    for n in range(count):
        user = f"{prefix}-{n}"
        lines.append(upstream_path(user) if direct else templates[n % len(templates)].format(u=user))
    return lines


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    sim = start_simulator(rate_limit=None, latency_ms=opts.miss_latency_ms)
    service = None
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
    try:
        # Everything but the limit as shipped: gunicorn.conf.py's worker class and workers.
        env = service_env(sim, UNLIMITED, workers=opts.workers, extra=opts.service_env)
        service = start_server("service-miss", env)
        log(f"miss: the service runs {service.config.shape}")
        # Not measured: the first requests open the service's upstream connections.
        run_wrk(
            service.url,
            write_paths(cold_lines("miss-warmup", 2000, False), "miss-warmup.txt"),
            8,
            1,
            mode="sequential",
            threads=opts.wrk_threads,
        )
        for conns in opts.miss_connections:
            runs[conns] = {"direct": [], "service": []}
            # Each connection completes at most one request per simulator latency; 50 % head room.
            per_run = int(conns * opts.duration / (opts.miss_latency_ms / 1000.0) * 1.5) + 100
            for attempt in range(opts.runs):
                for name in ("direct", "service"):
                    prefix = f"miss-{name}-c{conns}-r{attempt}"
                    paths = write_paths(cold_lines(prefix, per_run, name == "direct"), f"{prefix}.txt")
                    calls_before = sim.calls()
                    if name == "direct":
                        result = run_wrk(
                            sim.url,
                            paths,
                            conns,
                            opts.duration,
                            mode="sequential",
                            header=("Authorization", SIM_AUTH),
                            threads=opts.wrk_threads,
                        )
                    else:
                        result = run_wrk(
                            service.url, paths, conns, opts.duration, mode="sequential", threads=opts.wrk_threads
                        )
                    service.check_alive()
                    if result.error_count:
                        probe = service.probe("/v1/users/miss-probe") if name == "service" else "(direct)"
                        log(f"miss: {name} had {result.error_count} errors; a fresh miss now gives: {probe}")
                    # wrk counts only completed requests; calls may include ones in flight at the end.
                    calls = sim.calls() - calls_before
                    entry = asdict(result) | {"rps": result.rps, "upstream_calls": calls, "lines": per_run}
                    runs[conns][name].append(entry)
                    log(
                        f"miss: {name:<7} c={conns:<3} run {attempt + 1}/{opts.runs}: {result.rps:7.0f} req/s "
                        f"p50 {result.ms('p50'):7.2f} ms p99 {result.ms('p99'):7.2f} ms "
                        f"errors {result.error_count} upstream calls {calls}"
                    )
    finally:
        if service is not None:
            service.stop()
        sim.proc.stop()

    summary: dict[int, dict[str, Any]] = {}
    for conns, by_name in runs.items():
        row: dict[str, Any] = {}
        for name, results in by_name.items():
            row[name] = {
                "rps": median([r["rps"] for r in results]),
                "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in results]),
                "p90_ms": median([r["latency_us"]["p90"] / 1000 for r in results]),
                "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in results]),
                "errors": sum(sum(r["errors"].values()) for r in results),
                "requests": sum(r["requests"] for r in results),
                "upstream_calls": sum(r["upstream_calls"] for r in results),
            }
        service_row, direct_row = row["service"], row["direct"]
        row["added_p50_ms"] = service_row["p50_ms"] - direct_row["p50_ms"]
        row["added_p99_ms"] = service_row["p99_ms"] - direct_row["p99_ms"]
        # Calls per answered request: 1.0 means every request was a cold miss (a little
        # above: calls still in flight when wrk stopped; below: a request served warm).
        requests_done = service_row["requests"]
        row["calls_per_request"] = service_row["upstream_calls"] / requests_done if requests_done else 0.0
        summary[conns] = row
    return {
        "shape": service.config.shape if service else "?",
        "latency_ms": opts.miss_latency_ms,
        "summary": summary,
        "runs": {str(k): v for k, v in runs.items()},
        "duration": opts.duration,
        "run_count": opts.runs,
        "seconds": time.monotonic() - started,
    }
