"""Stampede: bursts of 1,000 requests at once, half on cached users and half on cold ones.

For each worker class (``--worker-classes``), the service runs as in *first answers*
(production settings, behind its front, default workers), with the budget out of the
way (``UPSTREAM_RATE_LIMIT_PER_MINUTE`` at its maximum, the simulator without a rate
limit) and the simulator answering after ``--stampede-latency-ms`` (300 ms).

The issue's stampedes are bursts: many requests arriving at once, as a Braze send opens
its connections at its start. Each round (``--stampede-runs``, 5; quick 1) is two
bursts, ``--stampede-pause`` seconds apart (3) so the first is over before the second:

- *baseline*: ``--stampede-hit-connections`` (500) requests alone, each a URL never
  answered before for a user cached beforehand (:class:`bench.traffic.UserPool`);
- *stampede*: as many other such hit requests, interleaved with
  ``--stampede-miss-connections`` (500) requests each naming a user no request has named
  before (one Amplitude call each).

Every request has a connection of its own through the service's front, and all of a
burst's are sent at once by one thread (:func:`testkit.burst.burst`); each latency runs
from its request's sending to the last byte of its answer. Fresh users in every round.
An answer not whole after 10 s counts as a timeout. Before the first round, one burst
of as many hit requests as a stampede's, not measured, leaves the front's connections to
gunicorn open as in a service that has been running.

Targets: no refusals (no answer but a 2XX, no socket error, no timeout), every answer
within 2 s, and the stampede's hit p99 at most 3x the baseline's (median of the rounds'
ratios). The simulator's call count per burst shows one call per cold user.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    BRAZE_TIMEOUT_S,
    CALLER_AUTH,
    Server,
    Simulator,
    each_worker_class,
    listen_overflows,
    log,
    median,
    paired_ratio,
    percentile,
    raise_open_files_limit,
    start_server,
)
from bench.options import Options
from bench.scenarios.first import class_env
from bench.traffic import ROUTES, UserPool
from testkit.burst import TIMEOUT, Answer, NoAnswer, burst

#: How long the client waits for a burst's answers: well past Braze's 2 s, so slow answers are measured.
BURST_TIMEOUT_S = 10.0
SIDES = ("baseline", "hits", "misses")


def measure(outcomes: Sequence[Answer | NoAnswer]) -> dict[str, Any]:
    """One side of one burst: latency percentiles (ms), answers by status and X-Cache, what was refused.

    A request given up at the timeout counts in the latencies at the time it was given up
    (it took at least that); one whose connection failed counts only as refused.
    """
    answers = [o for o in outcomes if isinstance(o, Answer)]
    missing = [o for o in outcomes if isinstance(o, NoAnswer)]
    timeouts = [o for o in missing if o.reason == TIMEOUT]
    latencies = [a.seconds * 1000 for a in answers] + [t.seconds * 1000 for t in timeouts]
    refusals = [a for a in answers if not 200 <= a.status < 300]
    return {
        "requests": len(outcomes),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=math.nan),
        "by_status": dict(sorted(Counter(str(a.status) for a in answers).items())),
        "by_cache": dict(sorted(Counter(a.headers.get("x-cache", "-") for a in answers).items())),
        # What each refusal said: status and the JSON error code (the service's or the front's).
        "refusals": dict(sorted(Counter(f"{a.status} {_error_code(a)}" for a in refusals).items())),
        "non_2xx": len(refusals),
        "timeouts": len(timeouts),
        "socket_errors": len(missing) - len(timeouts),
        "errors": dict(Counter(o.reason for o in missing)),
        "refused": len(refusals) + len(missing),
        "over_2s": sum(a.seconds > BRAZE_TIMEOUT_S for a in answers),
    }


def _error_code(answer: Answer) -> str:
    body = answer.body
    return str(body.get("error", "-")) if isinstance(body, dict) else "-"


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One side over the rounds: median percentiles, the slowest answer, every count summed."""

    def total(key: str) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for r in rounds:
            counts.update(r[key])
        return dict(sorted(counts.items()))

    summary: dict[str, Any] = {key: median([r[key] for r in rounds]) for key in ("p50_ms", "p90_ms", "p99_ms")}
    summary["max_ms"] = max(r["max_ms"] for r in rounds)
    for key in ("requests", "non_2xx", "timeouts", "socket_errors", "refused", "over_2s"):
        summary[key] = sum(r[key] for r in rounds)
    for key in ("by_status", "by_cache", "refusals", "errors"):
        summary[key] = total(key)
    return summary


def interleave(hits: Sequence[str], misses: Sequence[str]) -> list[tuple[str, str]]:
    """Both lists as one, ``(side, path)``, each side spread evenly over it (hit, miss, hit...)."""
    placed = [((n + 0.5) / len(paths), side, path) for side, paths in (("hits", hits), ("misses", misses))
              for n, path in enumerate(paths)]  # fmt: skip
    return [(side, path) for _, side, path in sorted(placed, key=lambda entry: entry[0])]


def cold_paths(prefix: str, count: int) -> list[str]:
    """*count* requests, each naming a user no request has named before, over the route mix in turn."""
    templates = list(ROUTES.values())
    return [templates[n % len(templates)].format(u=f"{prefix}{n}") for n in range(count)]


def _send(service: Server, paths: Sequence[str]) -> tuple[list[Answer | NoAnswer], dict[str, float]]:
    """One burst through the front: every outcome in order; how long the connecting, the writing and all took."""
    port = urlsplit(service.url).port or 80
    started = time.monotonic()
    outcomes = burst(
        [(port, path) for path in paths], {"Authorization": CALLER_AUTH}, BURST_TIMEOUT_S, missing="report"
    )
    sent = [o.sent_at for o in outcomes if o.sent_at]
    return outcomes, {
        "seconds": time.monotonic() - started,
        # From the start to the first request written: opening every connection.
        "connect_ms": ((min(sent) if sent else started) - started) * 1000,
        # From the first request written to the last: how "at once" the burst was.
        "send_spread_ms": (max(sent) - min(sent)) * 1000 if sent else math.nan,
    }


def _log(label: str, side: dict[str, Any]) -> None:
    log(
        f"stampede: {label:<28} {side['requests']:5} requests p50 {side['p50_ms']:7.1f} ms "
        f"p99 {side['p99_ms']:7.1f} ms max {side['max_ms']:7.1f} ms statuses {side['by_status']} "
        f"cache {side['by_cache']} refusals {side['refusals']} no answer {side['errors']} over 2 s {side['over_2s']}"
    )


def run_class(opts: Options, sim: Simulator, worker_class: str) -> dict[str, Any]:
    started = time.monotonic()
    hit_count, miss_count = opts.stampede_hit_connections, opts.stampede_miss_connections
    total = hit_count + miss_count
    # This client, nginx and gunicorn each hold a descriptor per connection (nginx two): not what is measured.
    open_files = raise_open_files_limit(8 * total + 1024)
    env = class_env(opts, sim, worker_class, CACHE_TTL_SECONDS="3600")
    sim.configure(latency_ms=0)
    service = start_server(f"stampede-{worker_class}", env, min_worker_connections=2 * total)
    log(
        f"stampede: {worker_class}: the service runs {service.config.shape}, "
        f"{service.config.worker_connections} connections per worker ({service.config.worker_class})"
    )
    rounds: list[dict[str, Any]] = []
    overflows = 0
    try:
        # Every hit URL of the scenario, its users warmed now (one block): the warm-up burst's, then each round's two.
        wanted = total + 2 * hit_count * opts.stampede_runs
        pool = UserPool(
            service, sim, f"st-{worker_class}", block=math.ceil(wanted / len(ROUTES)), wrk_threads=opts.wrk_threads
        )
        warmup_paths = pool.take(total)
        round_paths = [(pool.take(hit_count), pool.take(hit_count)) for _ in range(opts.stampede_runs)]
        # Not measured: the front's connections to gunicorn opened, the code paths run once.
        warmup, _ = _send(service, warmup_paths)
        _log(f"{worker_class} warm-up burst", measure(warmup))
        time.sleep(opts.stampede_pause)
        service.check_alive()
        sim.configure(latency_ms=opts.stampede_latency_ms)

        def measured(paths: Sequence[str]) -> tuple[list[Answer | NoAnswer], dict[str, Any]]:
            """One burst, then the pause: its outcomes, its timing and the upstream calls it made."""
            nonlocal overflows
            calls_before, overflows_before = sim.calls(), listen_overflows()
            outcomes, timing = _send(service, paths)
            time.sleep(opts.stampede_pause)  # the burst's last upstream calls and writes are over
            overflows += listen_overflows() - overflows_before
            service.check_alive()
            return outcomes, timing | {"upstream_calls": sim.calls() - calls_before}

        for attempt, (alone_paths, hit_paths) in enumerate(round_paths):
            outcomes, baseline_burst = measured(alone_paths)
            entry: dict[str, Any] = {"baseline": measure(outcomes)}
            _log(f"{worker_class} r{attempt + 1} hits alone", entry["baseline"])

            misses = cold_paths(f"cold-{worker_class}-r{attempt}-", miss_count)
            mixed = interleave(hit_paths, misses)
            outcomes, stampede_burst = measured([path for _, path in mixed])
            for side in ("hits", "misses"):
                entry[side] = measure([o for (s, _), o in zip(mixed, outcomes, strict=True) if s == side])
                _log(f"{worker_class} r{attempt + 1} {side} in stampede", entry[side])
            log(
                f"stampede: {worker_class} r{attempt + 1}: {stampede_burst['upstream_calls']} upstream calls for "
                f"{miss_count} cold users ({baseline_burst['upstream_calls']} in the baseline burst); connections "
                f"opened in {stampede_burst['connect_ms']:.0f} ms, requests written within "
                f"{stampede_burst['send_spread_ms']:.0f} ms"
            )
            rounds.append(entry | {"baseline_burst": baseline_burst, "stampede_burst": stampede_burst})
        limit_errors = service.limit_errors()
    finally:
        service.stop()
        sim.configure(latency_ms=0)
    bursts = [r[name] for r in rounds for name in ("baseline_burst", "stampede_burst")]
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
        **{side: summarise([r[side] for r in rounds]) for side in SIDES},
        "hit_p99_ratio": paired_ratio([r["hits"]["p99_ms"] for r in rounds], [r["baseline"]["p99_ms"] for r in rounds]),
        "hit_p99_ratios": [
            r["hits"]["p99_ms"] / r["baseline"]["p99_ms"] if r["baseline"]["p99_ms"] else math.nan for r in rounds
        ],  # fmt: skip
        # Per stampede burst: one call per cold user is the promise; the baseline bursts' should be none.
        "upstream_calls_per_burst": [r["stampede_burst"]["upstream_calls"] for r in rounds],
        "baseline_upstream_calls": sum(r["baseline_burst"]["upstream_calls"] for r in rounds),
        "cached_users": pool.users,
        # The client's side, its slowest burst: opening every connection, then writing every request.
        "connect_ms": max(b["connect_ms"] for b in bursts),
        "send_spread_ms": max(b["send_spread_ms"] for b in bursts),
        "runs": rounds,
        "seconds": time.monotonic() - started,
    }


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    classes = each_worker_class(opts.worker_classes, lambda sim, worker_class: run_class(opts, sim, worker_class))
    return {
        "shape": "burst",
        "classes": classes,
        "hit_connections": opts.stampede_hit_connections,
        "miss_connections": opts.stampede_miss_connections,
        "latency_ms": opts.stampede_latency_ms,
        "pause_s": opts.stampede_pause,
        "timeout_s": BURST_TIMEOUT_S,
        "run_count": opts.stampede_runs,
        "seconds": time.monotonic() - started,
    }
