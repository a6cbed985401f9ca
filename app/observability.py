"""Request ids, one JSON log line per request, and Prometheus metrics.

Metrics use prometheus_client's multi-process mode when ``PROMETHEUS_MULTIPROC_DIR`` is
set (gunicorn.conf.py sets it), so every worker's counts add up in one scrape. Labels
carry route templates and caller key *names*, never user ids or keys.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

ACCESS_LOGGER = "app.access"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(slots=True)
class RequestTrace:
    """What one request did, filled in as it goes, logged when it ends."""

    request_id: str
    started: float
    caller: str | None = None
    cache: str | None = None
    upstream_ms: float = 0.0


def request_id_from(header: str | None) -> str:
    """Honour a sane incoming ``X-Request-ID``; otherwise make one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the record's ``fields`` plus level, logger and message."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str) -> None:
    """Send every log record to stdout as JSON lines (once per process)."""
    root = logging.getLogger()
    if any(getattr(handler, "_profile_proxy", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler._profile_proxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        reg = self.registry
        self.requests = Counter(
            "proxy_requests", "Requests answered, by route template, status and caller key name.",
            ["route", "status", "caller"], registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "proxy_request_duration_seconds", "Time to answer a request, by route template.", ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0), registry=reg,
        )  # fmt: skip
        self.cache = Counter("proxy_cache_lookups", "Cache outcomes: hit, miss, stale, negative.", ["outcome"],
                             registry=reg)  # fmt: skip
        self.upstream = Counter(
            "proxy_upstream_calls", "Amplitude calls by outcome: ok, not_found, throttled, misconfigured, failed.",
            ["outcome"], registry=reg,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "proxy_upstream_duration_seconds", "Amplitude call duration.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), registry=reg,
        )  # fmt: skip
        self.turned_away = Counter("proxy_budget_turned_away", "Requests answered without an upstream call for "
                                   "lack of a budget token (or during a 429 back-off).", registry=reg)  # fmt: skip
        self.budget_tokens = Gauge("proxy_budget_tokens", "Upstream budget tokens available now.",
                                   multiprocess_mode="mostrecent", registry=reg)  # fmt: skip
        self.circuit = Gauge("proxy_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                             multiprocess_mode="max", registry=reg)  # fmt: skip
        self.redis_up = Gauge("proxy_redis_available", "1 when Redis answers, 0 when not, -1 when not configured.",
                              multiprocess_mode="min", registry=reg)  # fmt: skip
        self.auth_failures = Counter("proxy_auth_failures", "Requests refused for missing or wrong credentials.",
                                     ["reason"], registry=reg)  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        """The exposition text for a scrape (all workers' files in multi-process mode)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def log_request(trace: RequestTrace, method: str, route: str, status: int, user: str | None) -> None:
    """Write the access log line for one request."""
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": trace.request_id,
        "method": method,
        "route": route,
        "status": status,
        "cache": trace.cache,
        "upstream_ms": round(trace.upstream_ms, 2),
        "total_ms": round((time.monotonic() - trace.started) * 1000, 2),
        "caller": trace.caller,
    }
    if user is not None:
        fields["user"] = user
    logging.getLogger(ACCESS_LOGGER).info("request", extra={"fields": fields})
