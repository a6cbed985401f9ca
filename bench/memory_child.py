"""``python -m bench.memory_child COUNT``: fill one app's cache in-process and report its RSS.

Run in a fresh process by :mod:`bench.scenarios.memory`, so the process is what a
gunicorn worker is: one ``app.create_app`` with its own in-process cache. For each of
COUNT users it builds the simulator's ``userData`` answer for exactly the request the
service makes (its own query planner), turns it into the kept profile with the
service's own client code (``AmplitudeClient._interpret``: JSON parse, schema check,
shaping) and stores it with the service's own ``ProfileCache.put``. Nothing is
fetched over the network, so the cost measured is the cache's alone. Prints one JSON
line.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def flags_for(params: list[tuple[str, str]]) -> dict[str, Any]:
    """The simulator's reading of the service's query parameters (as its handler does)."""
    query = dict(params)
    return {
        **{
            name: query.get(name) == "true"
            for name in ("get_amp_props", "get_cohort_ids", "get_computations", "get_recs", "get_propensity")
        },
        "rec_id": [r for r in query.get("rec_id", "").split(",") if r],
        "comp_id": [c for c in query["comp_id"].split(",") if c] if "comp_id" in query else None,
        "rec_type": query.get("rec_type"),
        "prediction_id": [p for p in query.get("prediction_id", "").split(",") if p],
        "propensity_type": query.get("propensity_type", "score"),
    }


def profile_builder(rec_ids: str, prediction_ids: str) -> Callable[[str], tuple[Any, dict[str, Any], int]]:
    """``user -> (query, kept profile, size of Amplitude's answer)``, with the service's code."""
    from app.core.query import Identity, QueryPlanner
    from app.settings import Settings
    from app.upstream import AmplitudeClient
    from simulator import data

    settings = Settings(
        amplitude_secret_key="bench-memory-not-used",
        profile_rec_ids=tuple(rec_ids.split(",")),
        profile_prediction_ids=tuple(prediction_ids.split(",")),
    )
    planner, client = QueryPlanner(settings), AmplitudeClient(settings)

    def build(user: str) -> tuple[Any, dict[str, Any], int]:
        query = planner.whole(Identity("user_id", user))
        flags = flags_for(query.upstream_params())
        answer = {"userData": data.user_data("user", user, flags, data.DEFAULT_REC_IDS)}
        body = json.dumps(answer, separators=(",", ":")).encode()
        # The client's own reading of an answer: JSON parse, schema check, shaping.
        return query, client._interpret(query, 200, {}, body), len(body)

    return build


def put(cache: Any, query: Any, profile: dict[str, Any]) -> None:
    """Store *profile* the way a finished upstream call does (a local claim, then publish)."""
    from app.stores.profiles import Claim

    cache.publish(Claim(query, "bench", shared=False), profile)


def trace_puts(cache: Any, profile_for: Callable[[str], tuple[Any, dict[str, Any], int]], count: int) -> dict[str, Any]:
    """What Python allocates and keeps per cached profile, by source line (tracemalloc, *count* puts).

    Tells where the resident bytes of a cached profile go, e.g. an encoder's output buffer
    larger than the JSON it holds.
    """
    import tracemalloc

    prepared = [profile_for(f"traced-{n}") for n in range(count)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for query, profile, _ in prepared:
        put(cache, query, profile)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    del prepared
    root = str(Path(__file__).resolve().parent.parent) + "/"
    sites = []
    for stat in after.compare_to(before, "lineno")[:4]:
        frame = stat.traceback[0]
        sites.append({"site": f"{frame.filename.replace(root, '')}:{frame.lineno}", "bytes": stat.size_diff / count})
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
    return {"per_put": total, "sites": sites}


def main(argv: list[str]) -> None:
    count = int(argv[0])
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    import orjson

    from app import create_app

    rec_ids = os.environ.get("BENCH_REC_IDS", "rec_home,rec_email")
    prediction_ids = os.environ.get("BENCH_PREDICTION_IDS", "pred_churn")
    env = {
        "AMPLITUDE_SECRET_KEY": "bench-memory-not-used",
        "AMPLITUDE_API_URL": "http://127.0.0.1:9",  # never called
        "ALLOW_INSECURE_UPSTREAM": "true",
        "PROXY_API_KEYS": "bench:bench-key-123",
        "PROFILE_REC_IDS": rec_ids,
        "PROFILE_PREDICTION_IDS": prediction_ids,
        "CACHE_MAX_ENTRIES": str(max(count, 100_000)),
        "LOG_LEVEL": "WARNING",
    }
    app = create_app(environ=env)
    extensions = app.extensions["profile_proxy"]
    # ``profile_store`` since the serving layer's rework (issue 20), ``cache`` before it.
    cache = extensions.profile_store if hasattr(extensions, "profile_store") else extensions.cache
    profile_for = profile_builder(rec_ids, prediction_ids)

    # Warm every code path once, then drop it, so first-use allocations are not counted.
    for n in range(200):
        query, profile, _ = profile_for(f"warmup-{n}")
    del query, profile
    gc.collect()
    baseline = rss_bytes()
    started = time.monotonic()
    json_bytes = upstream_bytes = 0
    for n in range(count):
        query, profile, raw = profile_for(f"user-{n}")
        # The compact JSON of the profile as kept: what a cache entry should cost.
        json_bytes += len(orjson.dumps(profile))
        upstream_bytes += raw
        put(cache, query, profile)
    fill_seconds = time.monotonic() - started
    gc.collect()
    filled = rss_bytes()
    entries = len(cache)
    allocations = trace_puts(cache, profile_for, 500)
    print(
        json.dumps(
            {
                "count": count,
                "entries": entries,
                "rss_baseline": baseline,
                "rss_filled": filled,
                "json_bytes": json_bytes,
                "upstream_bytes": upstream_bytes,
                "fill_seconds": fill_seconds,
                "allocations": allocations,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
