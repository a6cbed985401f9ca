"""Request ids and one JSON log line per request (and per log record), on stdout.

Every line, access line or log record, goes through one bounded queue to one writer
thread (a greenlet under the gevent worker), whose writes to stdout run where a stalled
log reader can block nothing else (:func:`app.blocking.offload`). Counting a request in
the metrics (:mod:`app.metrics`) happens off the request path too.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from app.blocking import offload

if TYPE_CHECKING:
    from app.http.trace import RequestTrace
    from app.metrics import Metrics

ACCESS_LOGGER = "app.access"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: Lines (access lines and log records) held for a stdout that cannot keep up; past this
#: they are dropped and counted. Under a kilobyte each: a few megabytes at most.
MAX_QUEUED_LINES = 4096
#: Requests held for the counting thread; past this a request is counted on its own thread.
MAX_QUEUED_COUNTS = 65536
#: While lines are being dropped, one warning on stderr at most this often.
DROP_WARNING_SECONDS = 5.0
#: How often the bookkeeping threads drain their queues while requests come in, and while
#: none do. A request does not wake them: a wake-up per request would cost every request
#: a switch to another thread (or greenlet) just as it writes its answer.
DRAIN_SECONDS, IDLE_DRAIN_SECONDS = 0.05, 0.25


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
    if header and _REQUEST_ID.fullmatch(header):
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
    _write(sys.stderr, orjson.dumps(line).decode() + "\n")


def _write(stream: TextIO, text: str) -> None:
    """Write *text* and flush, where a reader that stopped reading blocks nothing else."""

    def write() -> None:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # closed: nobody to tell

    offload(write)


class _LineHandler(logging.Handler):
    """Format each record as a JSON line and queue it for the writer, like an access line."""

    def __init__(self, access_log: AccessLog) -> None:
        super().__init__()
        self.access_log = access_log
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot be formatted must not fail the caller
            self.handleError(record)
            return
        self.access_log.write_line(line + "\n")


def configure_logging(level: str, log_user_ids: bool = False) -> None:
    """Send every log record to stdout as JSON lines, through the access log's one writer.

    A handler lock and a write per record would make requests queue behind each other's
    writes, and a stdout nobody reads would stall them; a bounded queue keeps the request
    path to an append, and shares the access log's count of dropped lines.
    """
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # urllib3's debug lines carry the upstream URL, user id included.
    logging.getLogger("urllib3").setLevel(logging.DEBUG if log_user_ids else logging.WARNING)
    if not any(isinstance(handler, _LineHandler) for handler in root.handlers):
        root.addHandler(_LineHandler(ACCESS_LOG))


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
        # An access line's fields, or a log record already formatted (a str), or a flush mark.
        self._lines: queue.SimpleQueue[dict[str, Any] | str | threading.Event] = queue.SimpleQueue()
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
            self._queue_line(fields)
        if metrics is not None:
            queued = self._counts.qsize()
            if queued < self.max_counts:
                self._counts.put((metrics, fields))
                if queued == self.max_counts // 2:
                    self._counts_due.set()
            else:
                # The counting thread is starved of CPU: count here, rather than lose it or queue without end.
                _count(metrics, fields)

    def write_line(self, line: str) -> None:
        """Queue one formatted line (a log record); never blocks."""
        if not self._started:
            self._start()
        self._queue_line(line)

    def _queue_line(self, line: dict[str, Any] | str) -> None:
        queued = self._lines.qsize()
        if queued < self.max_lines:
            self._lines.put(line)
            if queued == self.max_lines // 2:
                self._lines_due.set()
        else:
            self.dropped.add()

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
            lines = [item if isinstance(item, str) else _access_line(item) for item in items]
            if lines:
                _write(self.stream or sys.stdout, "".join(lines))
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
