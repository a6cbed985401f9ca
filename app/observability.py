"""Request ids, one JSON log line per request, and Prometheus metrics.

Metrics use prometheus_client's multi-process mode when ``PROMETHEUS_MULTIPROC_DIR`` is
set (gunicorn.conf.py sets it), so every worker's counts add up in one scrape. Labels
carry route templates and caller key *names*, never user ids or keys.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import logging
import logging.handlers
import os
import queue
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

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
from prometheus_client.metrics_core import Metric

ACCESS_LOGGER = "app.access"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
#: Access lines held for a stdout that cannot keep up; past this they are dropped and counted.
#: Under a kilobyte each (the request's fields): a few megabytes at most.
MAX_QUEUED_LINES = 4096
#: Other log records held likewise (larger, and rarely many).
MAX_QUEUED_RECORDS = 1024
#: Requests held for the counting thread; past this a request is counted on its own thread.
MAX_QUEUED_COUNTS = 65536
#: While lines are being dropped, one warning on stderr at most this often.
DROP_WARNING_SECONDS = 5.0
#: How often the bookkeeping threads drain their queues while requests come in, and while
#: none do. A request does not wake them: a wake-up would take the GIL from the request
#: thread just as it writes its answer (and every miss, at 16 at once, paid for two).
DRAIN_SECONDS, IDLE_DRAIN_SECONDS = 0.05, 0.25


@dataclass(slots=True)
class RequestTrace:
    """One request's context (who, about whom, by when) and what it did, logged when it ends.

    Views read it once from ``g``: every ``g``/``request``/``current_app`` access is a
    context-local lookup, and the hit path has little else to spend time on.
    """

    request_id: str
    started: float
    extensions: Any = None
    caller: str | None = None
    cache: str | None = None
    upstream_ms: float = 0.0
    queue_ms: float = 0.0  # from arrival until the service started on it (waiting for a thread)
    deadline: Any = None
    identity: Any = None
    raw_query: str = ""


_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def _new_id_prefix() -> None:
    """A fresh prefix in every forked process: gunicorn's workers import this module in the
    master first, and must not hand out each other's request ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = secrets.token_hex(8)
    _ID_COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)


def request_id_from(header: str | None) -> str:
    """Honour a sane incoming ``X-Request-ID``; otherwise make one.

    A random per-process prefix and a counter: unique across processes and restarts,
    without a system call per request.
    """
    if header and _REQUEST_ID.match(header):
        return header
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


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
        if record.exc_text:
            line["exception"] = record.exc_text
        elif record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class DroppedLines:
    """Log lines stdout could not take: counted, and reported on stderr at most every few seconds.

    The report comes from a thread of its own, started at the first drop: the stdout
    writers are the ones that are stuck, and a stderr stuck as well must hold up nothing else.
    """

    def __init__(self, warn_every: float = DROP_WARNING_SECONDS) -> None:
        self.warn_every = warn_every
        self._lock = threading.Lock()
        self._total = 0
        self._reporter: threading.Thread | None = None

    @property
    def total(self) -> int:
        """Lines dropped by this process since it started."""
        return self._total

    def add(self) -> None:
        with self._lock:
            self._total += 1
            if self._reporter is None:
                self._reporter = threading.Thread(target=self._report, name="log-drops", daemon=True)
                self._reporter.start()

    def _report(self) -> None:
        reported = 0
        while True:
            total = self._total
            if total > reported:
                _warn_on_stderr(
                    f"stdout is not taking log lines (a stalled log reader?): {total - reported} dropped since "
                    f"the last warning, {total} since start; metrics are unaffected",
                    dropped=total - reported,
                    dropped_total=total,
                )
                reported = total
            time.sleep(self.warn_every)


def _warn_on_stderr(message: str, **fields: Any) -> None:
    """One JSON warning line on stderr, bypassing ``logging`` (whose writer may be the one stuck)."""
    now = time.time()
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "level": "warning",
        "logger": __name__,
        "message": message,
        **fields,
    }
    try:
        sys.stderr.write(orjson.dumps(line).decode() + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed as well: nobody to tell


class _EnqueueHandler(logging.handlers.QueueHandler):
    """Hand records to the writer thread as they are (formatting happens there), up to a bound."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], dropped: DroppedLines) -> None:
        super().__init__(records)
        self.records = records
        self.dropped = dropped

    def emit(self, record: logging.LogRecord) -> None:
        if self.records.qsize() >= MAX_QUEUED_RECORDS:
            self.dropped.add()  # stdout is not keeping up: never hold records without end
            return
        super().emit(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info and not record.exc_text:
            # Tracebacks must be rendered while the frames still exist.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        return record


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str, log_user_ids: bool = False) -> None:
    """Send every log record to stdout as JSON lines, written by one background thread.

    With dozens of request threads, a handler lock per line made threads queue behind
    each other's writes; a queue keeps the request path to an append. The queue is bounded
    like the access log's, and shares its count of dropped lines.
    """
    global _listener
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # urllib3's debug lines carry the upstream URL, user id included.
    logging.getLogger("urllib3").setLevel(logging.DEBUG if log_user_ids else logging.WARNING)
    if _listener is not None:
        return
    writer = logging.StreamHandler(sys.stdout)
    writer.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root.addHandler(_EnqueueHandler(records, ACCESS_LOG.dropped))
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    _listener.start()
    atexit.register(_stop_listener, _listener)


def _stop_listener(listener: logging.handlers.QueueListener, timeout: float = 1.0) -> None:
    """At exit, write what is queued, waiting at most *timeout* for a stdout that may be stuck.

    ``QueueListener.stop`` waits without end, which would keep a worker from exiting.
    """
    listener.enqueue_sentinel()
    thread = listener._thread
    if thread is not None:
        thread.join(timeout)


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
            "proxy_request_queue_seconds", "Time a request waited, from its arrival, for a thread to start on it.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0), registry=reg,
        )  # fmt: skip
        self.cache = Counter("proxy_cache_lookups", "Cache outcomes: hit, miss, stale, negative, never_stored.",
                             ["outcome"],
                             registry=reg)  # fmt: skip
        self.upstream = Counter(
            "proxy_upstream_calls",
            "Amplitude calls by outcome: ok, not_found, throttled, misconfigured, failed, not_sent.",
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
        if self.multiprocess:
            registry = CollectorRegistry()
            _WorkerFiles(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _WorkerFiles(multiprocess.MultiProcessCollector):
    """Every worker's metric files, less those a worker has created but not yet sized.

    A booting worker creates its files empty and sizes them a moment later; reading one in
    between fails the whole scrape (prometheus/client_python#1199), and a worker killed in
    that moment would leave the file empty for good. Files never shrink, so one found
    non-empty here stays readable.
    """

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:
                pass  # a dead worker's gauges, removed meanwhile
        return self.merge(files, accumulate=True)


class AccessLog:
    """Per-request bookkeeping off the request thread: counts on one thread, JSON lines on another.

    The request path only appends to queues. Going through ``logging`` (a record object,
    a handler lock, a write and flush per line) cost a quarter of the hit path's
    throughput, and prometheus_client's multi-process counters (a lock and an mmap write
    per update) another sixth. Each thread drains whatever has queued up: one counts it,
    the other writes the lines in one call.

    The two are apart so that a stdout nobody reads (a stalled log shipper) holds up the
    lines and nothing else: the counting thread only writes memory-mapped files, and
    ``/metrics`` waits on it alone. Lines wait in a bounded queue; past it they are
    dropped and counted (``proxy_log_lines_dropped_total``, a warning on stderr).

    Neither thread is woken per request: each drains its queue every ``DRAIN_SECONDS``
    (``IDLE_DRAIN_SECONDS`` after a round with nothing to do), or at once when a flush asks
    or its queue is half full.
    """

    def __init__(
        self,
        max_lines: int = MAX_QUEUED_LINES,
        max_counts: int = MAX_QUEUED_COUNTS,
        stream: TextIO | None = None,
        warn_every: float = DROP_WARNING_SECONDS,
    ) -> None:
        self.max_lines = max_lines
        self.max_counts = max_counts
        self.stream = stream  # None: whatever sys.stdout is at the time of writing
        self.dropped = DroppedLines(warn_every)
        self._lines: queue.SimpleQueue[dict[str, Any] | threading.Event] = queue.SimpleQueue()
        self._counts: queue.SimpleQueue[tuple[Metrics, dict[str, Any]] | threading.Event] = queue.SimpleQueue()
        # The apps counted for, to bring their dropped-lines counters up to date.
        self._counted_for: weakref.WeakSet[Metrics] = weakref.WeakSet()
        self._lines_due = threading.Event()
        self._counts_due = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def write(self, fields: dict[str, Any], metrics: Metrics | None = None, log: bool = True) -> None:
        """Queue one request's counts (with *metrics*) and its line (when *log*); never blocks."""
        if not self._started:
            self._start()
        if log:
            queued = self._lines.qsize()
            if queued < self.max_lines:
                self._lines.put(fields)
                if queued == self.max_lines // 2:
                    self._lines_due.set()
            else:
                self.dropped.add()
        if metrics is not None:
            queued = self._counts.qsize()
            if queued < self.max_counts:
                self._counts.put((metrics, fields))
                if queued == self.max_counts // 2:
                    self._counts_due.set()
            else:
                # The counting thread is starved of CPU: count here, rather than lose it or queue without end.
                _count(metrics, fields)

    def flush(self, timeout: float = 1.0) -> None:
        """Wait (up to *timeout* in all) until what was queued before this call is counted and written."""
        if self._started:
            deadline = time.monotonic() + timeout
            marks = [self._mark(self._counts, self._counts_due), self._mark(self._lines, self._lines_due)]
            for reached in marks:
                reached.wait(max(0.0, deadline - time.monotonic()))

    def flush_counts(self, timeout: float = 0.5) -> None:
        """Wait until what was queued before this call is counted; never waits on stdout."""
        if self._started:
            self._mark(self._counts, self._counts_due).wait(timeout)

    @staticmethod
    def _mark(target: queue.SimpleQueue[Any], due: threading.Event) -> threading.Event:
        reached = threading.Event()
        target.put(reached)
        due.set()
        return reached

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._count_forever, name="request-metrics", daemon=True).start()
                threading.Thread(target=self._write_forever, name="access-log", daemon=True).start()
                self._started = True
                atexit.register(self.flush)

    def _count_forever(self) -> None:
        # Also publishes, at least every IDLE_DRAIN_SECONDS, drops of lines that were not requests'.
        for items, reached in _rounds(self._counts_due, self._counts):
            counted_for: set[Metrics] = set()
            for metrics, fields in items:
                _count(metrics, fields)
                counted_for.add(metrics)
            self._counted_for.update(counted_for)
            dropped = self.dropped.total
            for metrics in list(self._counted_for):
                metrics.count_dropped_lines(dropped)
            for event in reached:
                event.set()

    def _write_forever(self) -> None:
        for items, reached in _rounds(self._lines_due, self._lines):
            lines = [_access_line(fields) for fields in items]
            if lines:
                stream = self.stream or sys.stdout
                try:
                    stream.write("".join(lines))
                    stream.flush()
                except (OSError, ValueError):
                    pass  # stdout closed: nothing useful to do with a log line
            for event in reached:
                event.set()


#: Items taken from a queue in one round; a full round starts the next one at once.
ROUND_ITEMS = 1024


def _rounds(due: threading.Event, source: queue.SimpleQueue[Any]) -> Iterator[tuple[list[Any], list[threading.Event]]]:
    """Forever: what was queued since the last round, and the flush marks among it.

    The next round comes at once after a full one (``ROUND_ITEMS``), else when it is due
    (``DRAIN_SECONDS`` after a round with something in it, ``IDLE_DRAIN_SECONDS`` after an
    empty one) or asked for (*due* set).
    """
    taken = 0
    while True:
        if taken < ROUND_ITEMS:
            due.wait(DRAIN_SECONDS if taken else IDLE_DRAIN_SECONDS)
        due.clear()
        items: list[Any] = []
        reached: list[threading.Event] = []
        taken = 0
        while taken < ROUND_ITEMS:
            try:
                item = source.get_nowait()
            except queue.Empty:
                break
            taken += 1
            (reached if isinstance(item, threading.Event) else items).append(item)
        yield items, reached


def _count(metrics: Metrics, fields: dict[str, Any]) -> None:
    try:
        metrics.count_request(fields["route"], fields["status"], fields["caller"] or "-", fields["total_ms"] / 1000)
        metrics.queue.observe(fields["queue_ms"] / 1000)
        if fields["cache"]:
            metrics.cache.labels(fields["cache"]).inc()
    except Exception:  # a metrics fault must not stop the log
        logging.getLogger(__name__).exception("could not count a request")


def _access_line(fields: dict[str, Any]) -> str:
    stamp = fields["at"]
    head = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z",
        "level": "info",
        "logger": ACCESS_LOGGER,
    }
    body = {key: value for key, value in fields.items() if key != "at"}
    return orjson.dumps({**head, **body}).decode() + "\n"


ACCESS_LOG = AccessLog()


def log_request(
    trace: RequestTrace,
    method: str,
    route: str,
    status: int,
    user: str | None,
    metrics: Metrics,
    log: bool,
    *,
    at: float,
    now: float,
) -> None:
    """Queue one request's metrics and (when *log*) its access log line; *at* is wall time, *now* monotonic."""
    fields: dict[str, Any] = {
        "at": at,
        "event": "request",
        "request_id": trace.request_id,
        "method": method,
        "route": route,
        "status": status,
        "cache": trace.cache,
        "upstream_ms": round(trace.upstream_ms, 2),
        "queue_ms": round(trace.queue_ms, 2),
        "total_ms": round((now - trace.started) * 1000, 2),
        "caller": trace.caller,
    }
    if user is not None:
        fields["user"] = user
    ACCESS_LOG.write(fields, metrics, log)
