"""Gunicorn settings: ``gunicorn -c gunicorn.conf.py`` from the repository root.

Worker model: gunicorn's stock ``gevent`` worker. A request that misses the cache waits on
Amplitude (up to the 1.5 s deadline) or on a budget slot; under gevent it waits as a
greenlet, which holds a few kilobytes and no thread, so every lookup the budget and the
deadline allow gets its answer and a cached answer never waits because misses are
waiting (gunicorn's design notes name async workers for applications that make long
blocking calls to external services). What blocks in C (SQLite, a write to a stalled
stdout) runs on gevent's thread pool (:mod:`app.blocking`). ``GUNICORN_WORKER_CLASS=gthread``
(with ``GUNICORN_THREADS``) runs the threaded worker instead, for comparison in the
benchmark (``make bench``); it is not what the image ships.

Workers: one process per core (``WEB_CONCURRENCY`` overrides it). The processes share
the cache, the single-flight claims and the upstream budget, so "one upstream call per
user" and the limit hold across them: through Redis when ``REDIS_URL`` is set (and across
machines), else through one SQLite file on this machine (``SHARED_STATE_PATH``; when it
is not set, a new file in a private temporary directory that lives as long as this
master). A single worker without Redis keeps everything in its own process.

The master imports only :mod:`app.settings` and :mod:`app.stores.sqlite_schema` (to refuse
bad settings before forking); each worker imports the rest after gevent has patched it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU limit
    (a container's ``--cpus``, a Kubernetes CPU limit), which os.cpu_count() ignores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # cgroup v2 ("QUOTA PERIOD" or "max PERIOD"), else v1 (a quota of -1 is no limit).
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):  # fmt: skip
        try:
            with open(quota_file) as handle:
                quota, *rest = handle.read().split()
            if period_file:
                with open(period_file) as handle:
                    rest = handle.read().split()
            if quota not in ("max", "-1"):
                cores = min(cores, max(1, -(-int(quota) // int(rest[0]))))  # rounded up: 1.5 CPUs -> 2
            break
        except (OSError, ValueError, IndexError):
            continue
    return max(1, cores)


workers = int(os.environ.get("WEB_CONCURRENCY") or available_cores())
worker_class = os.environ.get("GUNICORN_WORKER_CLASS") or "gevent"
# Under gevent, the connections (and so the requests) one worker holds at once; Braze opens
# thousands, and the front keeps a pool of them open to each worker.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS") or 4000)
# gthread only (the comparison): each request in progress holds one of these.
threads = int(os.environ.get("GUNICORN_THREADS") or 256) if worker_class == "gthread" else 1
# No runtime control socket: nothing here uses it, and every master on a host would share
# one default path (~/.gunicorn/gunicorn.ctl). Older gunicorns ignore the setting.
control_socket_disable = True
# The smallest fleet a process assumes before it has counted the fleet in the shared tier,
# and each process's share (limit / shares) while the tier cannot be reached or when there
# is none. Several instances without Redis: set UPSTREAM_BUDGET_SHARES to the total number
# of worker processes across all of them.
os.environ.setdefault("UPSTREAM_BUDGET_SHARES", str(workers))

# prometheus_client's multi-process mode: every worker writes its metrics to files here,
# and a scrape of any worker adds them up. Set before workers import prometheus_client.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), f"amplitude-proxy-metrics-{os.getpid()}")
)

# The private directory of this master's SQLite file, when on_starting made one, as
# "PID:PATH": in the environment, so a configuration reload (HUP) still removes it at exit.
_STATE_DIR = "AMPLITUDE_PROXY_STATE_DIR"

wsgi_app = "app:create_app()"
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
backlog = 2048
keepalive = 75  # longer than common load balancer idle timeouts
timeout = 30
# Every answer is due within 1.5 s of arrival, so in-flight requests are done well within
# this. What is left after it are idle keep-alive connections (the front's pool), which the
# gevent worker holds until this timeout and then closes ("Worker graceful timeout").
graceful_timeout = 5

# Bound what a client can make the server hold (request line, header count and size).
limit_request_line = 8190
limit_request_fields = 50
limit_request_field_size = 8190

accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# The one list of proxies whose forwarded headers count: gunicorn believes their
# X-Forwarded-Proto, the app their X-Forwarded-For (app/http/forwarded.py). Same default
# as app/settings.py, which refuses "*".
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS") or "127.0.0.1,::1"
# No logconfig_dict: with one, gunicorn would format an access-log entry for every
# request even with accesslog off. The app writes its own JSON access log on stdout.


def on_starting(server: object) -> None:
    """Share through SQLite when several workers run without Redis; refuse bad settings in one line."""
    from app.settings import SettingsError, load_settings
    from app.stores.sqlite_schema import initialise

    several = server.cfg.workers > 1  # type: ignore[attr-defined]
    if several and not os.environ.get("REDIS_URL") and not os.environ.get("SHARED_STATE_PATH"):
        # Owner-only (profiles are personal data), and new: this master's log starts with a
        # ramp, as if the master before it had spent the limit evenly over the last window.
        state_dir = tempfile.mkdtemp(prefix="amplitude-proxy-shared-")
        os.environ[_STATE_DIR] = f"{os.getpid()}:{state_dir}"
        os.environ["SHARED_STATE_PATH"] = os.path.join(state_dir, "shared.sqlite3")
        server.log.info(  # type: ignore[attr-defined]
            "no REDIS_URL: the workers share cache and budget through %s", os.environ["SHARED_STATE_PATH"]
        )
    try:
        settings = load_settings(os.environ)
        if settings.shared_state_path:
            initialise(settings.shared_state_path)  # before any worker, so a bad file stops the start
    except (SettingsError, sqlite3.Error) as exc:
        prefix = "" if isinstance(exc, SettingsError) else "SHARED_STATE_PATH: "
        print(f"configuration error: {prefix}{exc}", file=sys.stderr)
        on_exit(server)
        sys.exit(2)
    server.log.info(  # type: ignore[attr-defined]
        "%d %s worker%s, up to %d connections each",
        server.cfg.workers, worker_class,  # type: ignore[attr-defined]
        "" if server.cfg.workers == 1 else "s", server.cfg.worker_connections,  # type: ignore[attr-defined]
    )  # fmt: skip
    # Counts from a previous run must not be added to this one's.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)


class _RefusalDetails:
    """Drop what gunicorn quotes of a request it refused ("Invalid request from ip=...: <the
    offending line>"): the line may hold a caller key. The address and the fact stay."""

    def filter(self, record: object) -> bool:
        message = getattr(record, "msg", "")
        if isinstance(message, str) and message.startswith("Invalid request from ip="):
            record.msg = message.split(": ", 1)[0] + ": refused before the app (details withheld)"  # type: ignore[attr-defined]
            record.args = ()  # type: ignore[attr-defined]
        return True


def post_worker_init(worker: object) -> None:
    """Keep credentials out of gunicorn's own log lines (gunicorn.error, as its docs name it)."""
    import logging

    logging.getLogger("gunicorn.error").addFilter(_RefusalDetails())


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's gauges from the metrics (killed or not; its counts stay).

    Every gauge uses a ``live*`` mode, whose files this removes: an open circuit or a
    stale reading must not outlive the worker that held it.
    """
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    owner, _, state_dir = os.environ.get(_STATE_DIR, "").partition(":")
    if state_dir and owner == str(os.getpid()):
        shutil.rmtree(state_dir, ignore_errors=True)
