"""Stampede: 1,000 connections at once, half on cached users and half on cold ones.

For each worker class (``--worker-classes``), the service runs as in *first answers*
(production settings, behind its front, default workers), with the budget out of the
way (``UPSTREAM_RATE_LIMIT_PER_MINUTE`` at its maximum, the simulator without a rate
limit) and the simulator answering after ``--stampede-latency-ms`` (300 ms). Two wrk
processes run at the same time, each counting answers by status:

- *hits*: ``--stampede-hit-connections`` (500), each request a URL never answered
  before for a user cached beforehand (:class:`bench.traffic.UserPool`);
- *misses*: ``--stampede-miss-connections`` (500), each request a user no request has
  named before (wrk counts them up), so each is one Amplitude call.

Each run measures the hits twice, back to back: alone (*baseline*), then beside the
misses (*stampede*). wrk's own timeout is 10 s, so an answer slower than Braze's 2 s
is still seen (and counted) rather than cut off. Targets: no refusals (no answer but a
2XX, no socket error, no timeout), every answer within 2 s, and the stampede's hit p99
at most 3x the baseline's (median of the runs' ratios).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import (
    BRAZE_TIMEOUT_S,
    Simulator,
    WrkResult,
    WrkRun,
    listen_overflows,
    log,
    median,
    paired_ratio,
    raise_open_files_limit,
    start_server,
    start_simulator,
    write_paths,
)
from bench.options import Options
from bench.scenarios.first import FLOOR_RPS, class_env
from bench.traffic import ROUTES, UserPool, urls_needed

#: wrk's per-request timeout here: well past Braze's 2 s, so slow answers are measured.
WRK_TIMEOUT_S = 10.0
#: After the misses stop: the ones still in flight finish (the service's deadline is 1.5 s).
SETTLE_S = 2.0


def _entry(result: WrkResult) -> dict[str, Any]:
    return asdict(result) | {"rps": result.rps, "by_status": result.by_status()}


def _log(label: str, result: WrkResult) -> None:
    log(
        f"stampede: {label:<22} {result.rps:7.0f} req/s p50 {result.ms('p50'):7.1f} ms p99 {result.ms('p99'):7.1f} ms "
        f"max {result.ms('max'):7.1f} ms statuses {result.by_status()} errors {result.errors} "
        f"over 2 s {result.slow}"
    )


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs: medians, the worst answer, and every answer counted by status."""
    by_status: dict[str, int] = {}
    for r in results:
        for status, n in r["by_status"].items():
            by_status[status] = by_status.get(status, 0) + n
    answered = sum(by_status.values())
    ok = sum(n for status, n in by_status.items() if status.startswith("2"))
    return {
        "rps": median([r["rps"] for r in results]),
        "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in results]),
        "p90_ms": median([r["latency_us"]["p90"] / 1000 for r in results]),
        "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in results]),
        "max_ms": max(r["latency_us"]["max"] / 1000 for r in results),
        "requests": sum(r["requests"] for r in results),
        "by_status": by_status,
        "refused": answered - ok,
        "socket_errors": sum(r["errors"]["connect"] + r["errors"]["read"] + r["errors"]["write"] for r in results),
        "timeouts": sum(r["errors"]["timeout"] for r in results),
        "over_2s": sum(r["slow"] for r in results),
        "repeated": sum(r.get("repeated", 0) for r in results),
    }


def run_class(opts: Options, sim: Simulator, worker_class: str) -> dict[str, Any]:
    started = time.monotonic()
    hit_conns, miss_conns = opts.stampede_hit_connections, opts.stampede_miss_connections
    total = hit_conns + miss_conns
    # wrk, nginx and gunicorn each hold a descriptor per connection (nginx two): not what is measured.
    open_files = raise_open_files_limit(8 * total + 1024)
    env = class_env(opts, sim, worker_class, CACHE_TTL_SECONDS="3600")
    sim.configure(latency_ms=0)
    service = start_server(f"stampede-{worker_class}", env, min_worker_connections=2 * total)
    log(
        f"stampede: {worker_class}: the service runs {service.config.shape}, "
        f"{service.config.worker_connections} connections per worker ({service.config.worker_class})"
    )
    templates = write_paths(ROUTES.values(), "stampede-templates.txt")
    baseline: list[dict[str, Any]] = []
    stampede: list[dict[str, Any]] = []
    misses: list[dict[str, Any]] = []
    upstream_calls: list[int] = []
    overflows = 0
    try:
        fallback = FLOOR_RPS
        pool = UserPool(
            service,
            sim,
            f"st-{worker_class}",
            block=max(500, int(fallback * opts.stampede_duration)),
            wrk_threads=opts.wrk_threads,
        )
        # Not measured: the hits' connections opened, and how fast they go (the URL lists' size).
        warmup = WrkRun(
            service.url,
            write_paths(pool.take(int(fallback * 2)), f"stampede-warmup-{worker_class}.txt"),
            hit_conns,
            1,
            mode="sequential",
            threads=opts.wrk_threads,
        ).result()
        fallback = max(fallback, warmup.rps)
        sim.configure(latency_ms=opts.stampede_latency_ms)

        def counted(paths: Path, conns: int, mode: str, name: str, prefix: str | None = None) -> WrkRun:
            """wrk for the stampede: every answer counted by status, and those slower than Braze's 2 s."""
            return WrkRun(service.url, paths, conns, opts.stampede_duration, mode=mode, threads=opts.wrk_threads,
                          timeout_s=WRK_TIMEOUT_S, statuses=True, slow_ms=BRAZE_TIMEOUT_S * 1000, prefix=prefix,
                          name=name)  # fmt: skip

        for attempt in range(opts.stampede_runs):
            wanted = urls_needed(baseline, fallback, opts.stampede_duration)
            alone_file = write_paths(pool.take(wanted), f"stampede-alone-{worker_class}-r{attempt}.txt")
            alone = counted(alone_file, hit_conns, "sequential", "wrk-hits").result()
            service.check_alive()
            baseline.append(_entry(alone))
            _log(f"{worker_class} hits alone", alone)

            hits_file = write_paths(pool.take(wanted), f"stampede-hits-{worker_class}-r{attempt}.txt")
            calls_before, overflows_before = sim.calls(), listen_overflows()
            # Both at once: the misses first, so the hits meet them from their first request.
            cold = counted(templates, miss_conns, "fresh", "wrk-misses", prefix=f"cold-{worker_class}-r{attempt}-")
            hot = counted(hits_file, hit_conns, "sequential", "wrk-hits")
            hits, cold_result = hot.result(), cold.result()
            time.sleep(SETTLE_S)
            upstream_calls.append(sim.calls() - calls_before)
            overflows += listen_overflows() - overflows_before
            service.check_alive()
            stampede.append(_entry(hits))
            misses.append(_entry(cold_result))
            _log(f"{worker_class} hits in stampede", hits)
            _log(f"{worker_class} misses in stampede", cold_result)
        limit_errors = service.limit_errors()
    finally:
        service.stop()
        sim.configure(latency_ms=0)
    return {
        "worker_class": service.config.worker_class,
        "kind": service.config.kind,
        "requested": worker_class,
        "shape": service.config.shape,
        "config": asdict(service.config),
        "gunicorn_flags": list(service.flags),
        "open_files_limit": open_files,
        # Limits that must not be what is measured: any count here says one of them was reached.
        "listen_overflows": overflows,
        "limit_errors": limit_errors[:5],
        "baseline": summarise(baseline),
        "hits": summarise(stampede),
        "misses": summarise(misses),
        "hit_p99_ratio": paired_ratio(
            [r["latency_us"]["p99"] for r in stampede], [r["latency_us"]["p99"] for r in baseline]
        ),
        "upstream_calls": sum(upstream_calls),
        "runs": {"baseline": baseline, "hits": stampede, "misses": misses},
        "seconds": time.monotonic() - started,
    }


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    sim = start_simulator(rate_limit=None)
    classes: dict[str, Any] = {}
    try:
        for worker_class in opts.worker_classes:
            classes[worker_class] = run_class(opts, sim, worker_class)
    finally:
        sim.proc.stop()
    return {
        "classes": classes,
        "hit_connections": opts.stampede_hit_connections,
        "miss_connections": opts.stampede_miss_connections,
        "latency_ms": opts.stampede_latency_ms,
        "duration": opts.stampede_duration,
        "run_count": opts.stampede_runs,
        "seconds": time.monotonic() - started,
    }
