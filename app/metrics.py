"""Prometheus metrics: one registry per app, every worker's counts added up in one scrape.

Metrics use prometheus_client's multi-process mode when ``PROMETHEUS_MULTIPROC_DIR`` is
set (gunicorn.conf.py sets it), so every worker's counts add up in one scrape. Labels
carry route templates and caller key *names*, never user ids or keys.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """The service's Prometheus metrics, in a registry of their own per app.

    With several workers a scrape reads every live worker's last gauge values, and each
    gauge's ``multiprocess_mode`` says how they add up. All are ``live*`` modes, so a dead
    worker's values leave with it (gunicorn.conf.py's ``child_exit``), and every worker keeps
    its own values current (:mod:`app.gauges`). The budget's gauges depend on *shared_budget*:
    with a shared budget (Redis) every worker sees the one window, and the freshest view
    wins; without one each worker holds its share, and the shares add up.
    """

    def __init__(self, shared_budget: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        self._dropped_counted = 0
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        budget_mode: Any = "livemostrecent" if shared_budget else "livesum"
        reg = self.registry
        self.requests = Counter(
            "proxy_requests", "Requests answered, by route template, status and caller key name.",
            ["route", "status", "caller"], registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "proxy_request_duration_seconds", "Time to answer a request from its arrival (queue time included), "
            "by route template.", ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0), registry=reg,
        )  # fmt: skip
        self.queue = Histogram(
            "proxy_request_queue_seconds",
            "Time a request waited, from its arrival (the front's stamp), until the app started on it.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0), registry=reg,
        )  # fmt: skip
        self.cache = Counter("proxy_cache_lookups", "Cache outcomes: hit, miss, stale, negative, never_stored.",
                             ["outcome"],
                             registry=reg)  # fmt: skip
        self.upstream = Counter(
            "proxy_upstream_calls",
            "Amplitude calls by outcome: ok, not_found, throttled, misconfigured, failed, late, not_sent.",
            ["outcome"], registry=reg,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "proxy_upstream_duration_seconds", "Amplitude call duration.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), registry=reg,
        )  # fmt: skip
        self.turned_away = Counter("proxy_budget_turned_away", "Requests answered without an upstream call for "
                                   "lack of a budget slot (or during a 429 back-off), by caller class: live, bulk.",
                                   ["class"], registry=reg)  # fmt: skip
        self.budget_granted = Counter("proxy_budget_granted", "Upstream calls admitted, by caller class: live, "
                                      "bulk (BULK_CALLERS and background refreshes).", ["class"],
                                      registry=reg)  # fmt: skip
        self.budget_wait = Histogram("proxy_budget_wait_seconds", "Time an admitted call waited for its slot.",
                                     buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0), registry=reg)  # fmt: skip
        self.budget_tokens = Gauge("proxy_budget_tokens", "Upstream calls still free in the trailing window.",
                                   multiprocess_mode=budget_mode, registry=reg)  # fmt: skip
        self.budget_utilization = Gauge("proxy_budget_utilization", "Share of UPSTREAM_RATE_LIMIT_PER_MINUTE used "
                                        "in the trailing window (0 to 1).", multiprocess_mode=budget_mode,
                                        registry=reg)  # fmt: skip
        self.circuit = Gauge("proxy_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open (the worst "
                             "worker).", multiprocess_mode="livemax", registry=reg)  # fmt: skip
        # Redis is one place: the worker answering the scrape pings it, and the newest answer wins.
        self.redis_up = Gauge("proxy_redis_available", "1 when Redis answers, 0 when not, -1 when not configured.",
                              multiprocess_mode="livemostrecent", registry=reg)  # fmt: skip
        # The SQLite file is one per machine, but each worker has its own connections to it.
        self.shared_file_up = Gauge("proxy_shared_file_available", "1 when every live worker's last write to the "
                                    "machine's shared state file (SHARED_STATE_PATH) went through, 0 when one failed, "
                                    "-1 when not in use.", multiprocess_mode="livemin", registry=reg)  # fmt: skip
        # Summed over live workers: how many admit each way (they change mode one by one).
        self.admission_mode = Gauge("proxy_admission_mode", "Live workers by how their budget admits calls now: "
                                    "shared (the shared log: Redis, or the SQLite file without it), machine (the "
                                    "machine's file while Redis is away), own_share (cut off: the worker's share), "
                                    "stopped (cut off: no calls), process (no shared tier).", ["mode"],
                                    multiprocess_mode="livesum", registry=reg)  # fmt: skip
        self.braze_answers = Gauge("proxy_braze_answers_last_minute", "Answers in the trailing minute.",
                                   multiprocess_mode="livesum", registry=reg)  # fmt: skip
        self.braze_failures = Gauge("proxy_braze_failures_last_minute", "Answers in the trailing minute that Braze "
                                    "counts as failures (408, 429, 502, 503, 504, 529).",
                                    multiprocess_mode="livesum", registry=reg)  # fmt: skip
        self.braze_failure_share = Gauge("proxy_braze_failure_share", "Share of the trailing minute's answers Braze "
                                         "counts as failures (the worst worker; Braze acts past 3,000 and 0.9).",
                                         multiprocess_mode="livemax", registry=reg)  # fmt: skip
        self.auth_failures = Counter("proxy_auth_failures", "Requests refused for missing or wrong credentials.",
                                     ["reason"], registry=reg)  # fmt: skip
        self.log_lines_dropped = Counter("proxy_log_lines_dropped", "Log lines dropped because stdout did not "
                                         "take them in time (a stalled log reader).", registry=reg)  # fmt: skip
        # Cohort webhooks. The store is one place for every worker: the freshest reading wins.
        self.cohort_batches = Counter("proxy_cohort_batches", "Cohort Webhooks batches by outcome: received, "
                                      "queued, duplicate, refused (as received); applied, superseded, discarded, "
                                      "lease_lost (as applied).", ["outcome"], registry=reg)  # fmt: skip
        self.cohort_members = Gauge("proxy_cohort_members", "Members of each cohort kept by Cohort Webhooks.",
                                    ["cohort"], multiprocess_mode="livemostrecent", registry=reg)  # fmt: skip
        self.cohort_last_batch_age = Gauge("proxy_cohort_last_batch_age_seconds", "Seconds since each cohort's last "
                                           "batch arrived (-1: none yet).", ["cohort"],
                                           multiprocess_mode="livemostrecent", registry=reg)  # fmt: skip
        self.cohort_authoritative = Gauge("proxy_cohort_authoritative", "1 when a cohort's membership is answered "
                                          "from Cohort Webhooks alone, 0 when not (yet).", ["cohort"],
                                          multiprocess_mode="livemostrecent", registry=reg)  # fmt: skip
        self.cohort_silent = Gauge("proxy_cohort_silent", "1 when a cohort declared real-time (COHORT_REALTIME_IDS) "
                                   "has had no batch for longer than COHORT_REALTIME_MAX_SILENCE_SECONDS.",
                                   ["cohort"], multiprocess_mode="livemostrecent", registry=reg)  # fmt: skip

    def count_request(self, route: str, status: int, caller: str, seconds: float) -> None:
        """Count one answered request; label children are cached (``labels()`` takes a lock)."""
        key = (route, status, caller)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(route, str(status), caller), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_dropped_lines(self, total: int) -> None:
        """Bring ``proxy_log_lines_dropped_total`` up to this process's *total* (one thread calls this)."""
        if total > self._dropped_counted:
            self.log_lines_dropped.inc(total - self._dropped_counted)
            self._dropped_counted = total

    def render(self) -> tuple[bytes, str]:
        """The exposition text for a scrape (all workers' files in multi-process mode)."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if self.multiprocess and directory:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(WorkerFiles(directory))
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class WorkerFiles:
    """Every worker's metric files in *directory*, less those a worker has created but not yet sized.

    A booting worker creates its files empty and sizes them a moment later; reading one in
    between fails the whole scrape (prometheus/client_python#1199), and a worker killed in
    that moment would leave the file empty for good. Files never shrink, so one found
    non-empty here stays readable. The files are read by prometheus_client's own
    ``MultiProcessCollector.merge``.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:
                pass  # a dead worker's gauges, removed meanwhile
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)
