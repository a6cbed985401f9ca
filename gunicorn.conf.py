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
user" and the limit hold across them: through Redis when ``REDIS_URL`` (or
``REDIS_SENTINELS``) is set (and across machines), else through one SQLite file on this
machine (``SHARED_STATE_PATH``). With Redis the machine's file is there too: the
workers keep a copy of their grants in it and go on through it when Redis goes away
while this machine was the whole fleet (:mod:`app.machine`). When ``SHARED_STATE_PATH``
is not set and a file is needed (several workers, or Redis), the master makes one in a
private temporary directory named after this user and the addresses it listens on: the
new master of a ``USR2`` upgrade listens on the same ones, so it shares the old master's
file, and the last master to exit removes the directory. A single worker without Redis
keeps everything in its own process.

Each worker leaves the fleet as it exits (``worker_exit``): the others no longer hold its
share back.

The master imports only :mod:`app.settings` and :mod:`app.stores.sqlite_schema` (to refuse
bad settings before forking); each worker imports the rest after gevent has patched it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sqlite3
import stat
import sys
import tempfile


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU limit
    (a container's ``--cpus``, a Kubernetes CPU limit), which os.cpu_count() ignores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # cgroup v2 ("QUOTA PERIOD" or "max PERIOD"), else v1 (a quota of -1 is no limit).
    cgroup_limits = (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    )
    for quota_file, period_file in cgroup_limits:
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

# The private directory of the machine's SQLite file, when on_starting made one, as
# "PID:FD:PATH" (this master, and the descriptor holding its share of the directory's lock):
# in the environment, so a configuration reload (HUP) still finds it at exit. A USR2 child
# is started with the environment gunicorn began with, without it.
_STATE_DIR = "AMPLITUDE_PROXY_STATE_DIR"
_MASTERS_LOCK = "masters.lock"

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


def _state_directory(bind: list[str]) -> tuple[str, int]:
    """The private directory for the machine's file, and a descriptor holding a shared lock on it.

    Named after this user and the addresses gunicorn listens on (*bind*): the new master of a
    ``USR2`` upgrade listens on the same sockets, finds the old master's directory, and shares
    its file; each master holds a shared ``flock`` on the directory's lock file as long as it
    runs, so the last to exit removes the directory (``on_exit``). A directory no master holds
    was left by one that died: it is emptied, and its file starts afresh as a new one would.
    A name taken by anything but a directory of this user's, closed to others, is not used: a
    new directory of this master's own is made instead (not shared across an upgrade).
    """
    digest = hashlib.sha256("\n".join(sorted(bind)).encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"amplitude-proxy-shared-{os.getuid()}-{digest}")
    try:
        os.mkdir(path, 0o700)  # owner-only: profiles are personal data
    except FileExistsError:
        pass
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or stat.S_IMODE(found.st_mode) & 0o077:
        return tempfile.mkdtemp(prefix="amplitude-proxy-shared-"), -1
    lock = os.open(os.path.join(path, _MASTERS_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # the master this one upgrades holds it: share its file
        fcntl.flock(lock, fcntl.LOCK_SH)
        return path, lock
    for name in os.listdir(path):  # left by a master that died: what was spent is unknown
        if name != _MASTERS_LOCK:
            os.unlink(os.path.join(path, name))
    fcntl.flock(lock, fcntl.LOCK_SH)
    return path, lock


def on_starting(server: object) -> None:
    """Give the workers the machine's SQLite file (several workers, or Redis); refuse bad settings in one line."""
    from app.settings import SettingsError, load_settings
    from app.stores.sqlite_schema import initialise

    try:
        settings = load_settings(os.environ)
        redis = bool(settings.redis_url or settings.redis_sentinels)
        if not settings.shared_state_path and (server.cfg.workers > 1 or redis):  # type: ignore[attr-defined]
            # New unless an upgrade shares it: its log then starts with a ramp, as if the master
            # before it had spent the limit evenly over the last window (with Redis, it learns
            # what Redis holds instead).
            state_dir, lock = _state_directory(list(server.cfg.bind))  # type: ignore[attr-defined]
            os.environ[_STATE_DIR] = f"{os.getpid()}:{lock}:{state_dir}"
            os.environ["SHARED_STATE_PATH"] = os.path.join(state_dir, "shared.sqlite3")
            settings = load_settings(os.environ)
            server.log.info(  # type: ignore[attr-defined]
                "the workers %s through %s",
                "keep the machine's copy of their grants" if redis else "share cache and budget",
                settings.shared_state_path,
            )
        if settings.shared_state_path:
            initialise(settings.shared_state_path)  # before any worker, so a bad file stops the start
    except (SettingsError, sqlite3.Error, OSError) as exc:
        prefix = "" if isinstance(exc, SettingsError) else "SHARED_STATE_PATH: "
        detail = f"{exc.strerror} (the state directory)" if isinstance(exc, OSError) else exc
        print(f"configuration error: {prefix}{detail}", file=sys.stderr)
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


def worker_exit(server: object, worker: object) -> None:
    """Leave the fleet as the worker exits, so the others need not hold its share back.

    Called in the worker process, where ``worker.wsgi`` is the app gunicorn loaded for it
    (the base worker's, set when it loaded the app; gunicorn also calls this hook in the
    master for a worker that died unseen, where there is no app to close). The app's
    ``extensions`` registry holds what it built; the budget goes first: its heartbeat and
    share are what the other processes count.
    """
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", {}).get("profile_proxy")
    if extensions is not None:
        extensions.budget.close()
        extensions.close()


def on_exit(server: object) -> None:
    """Remove the metrics directory, and the machine's file's directory unless another master uses it."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    owner, _, rest = os.environ.get(_STATE_DIR, "").partition(":")
    lock, _, state_dir = rest.partition(":")
    if not state_dir or owner != str(os.getpid()):
        return
    if int(lock) >= 0:
        try:
            fcntl.flock(int(lock), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # the new master of a USR2 upgrade shares it: it is the one to remove it
        except OSError:
            pass
    shutil.rmtree(state_dir, ignore_errors=True)
