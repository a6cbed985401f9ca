"""Processes, servers behind their front, wrk and small statistics shared by every scenario.

Every process the harness starts goes through :func:`spawn`: it runs in a session (and
process group) of its own, is registered here, and :func:`stop_all` (called from the
CLI's ``finally`` and at exit) terminates each group, then kills what is left; the
fronts' working directories are removed at exit too.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from testkit import processes
from testkit.processes import Proc, free_port, stop_all  # noqa: F401 - stop_all is re-exported for bench.cli

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "wrk" / "paths.lua"
RENDER_FRONT = ROOT / "deploy" / "nginx" / "render.py"
PYTHON = sys.executable

SIM_SECRET = "bench-sim-secret-key"
CALLER_KEY = "bench-key-123"
CALLER_AUTH = f"Bearer {CALLER_KEY}"
SIM_AUTH = f"Api-Key {SIM_SECRET}"
PROFILE_REC_IDS = "rec_home,rec_email"
PROFILE_PREDICTION_IDS = "pred_churn"
#: "Out of the way": the highest value the service's settings accept.
UNLIMITED = 1_000_000_000
#: What a caller gets before Braze gives up on it.
BRAZE_TIMEOUT_S = 2.0

#: The shipped production settings (deploy/k8s/configmap.yaml and scripts/run-prod.sh): the
#: front is the one trusted proxy, and the allowlist names the load generator's range (the
#: configmap names Braze's; here every caller is on 127.0.0.1).
PRODUCTION_SETTINGS = {
    "TRUSTED_PROXY_COUNT": "1",
    "FORWARDED_ALLOW_IPS": "127.0.0.1",
    "ALLOWED_CIDRS": "127.0.0.0/8",
}

#: Variables of the caller's environment that would choose the servers' configuration:
#: never inherited (the service's own settings are added from its schema at run time).
INHERITED_NEVER = (
    "WEB_CONCURRENCY",
    "GUNICORN_CMD_ARGS",
    "GUNICORN_WORKER_CLASS",
    "GUNICORN_THREADS",
    "GUNICORN_WORKER_CONNECTIONS",
    "PROMETHEUS_MULTIPROC_DIR",
    "REDIS_URL",
    "SHARED_STATE_PATH",
    "UPSTREAM_BUDGET_SHARES",
    "BENCH_BARE_BODIES",
)

#: Where subprocess logs go; kept for the run so a failure can be inspected.
LOG_DIR = Path(tempfile.mkdtemp(prefix="bench-logs-"))

#: ``--keep-logs``: keep subprocesses' stdout too (the service's JSON access log: large).
KEEP_LOGS = bool(os.environ.get("BENCH_KEEP_LOGS"))

#: ``--sim-nagle``: run the stock simulator (see :mod:`bench.sim_nodelay`).
SIM_NAGLE = bool(os.environ.get("BENCH_SIM_NAGLE"))


class BenchError(processes.ProcessError):
    """A scenario could not run (a process did not start, wrk failed...)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes (shared with the test suite: testkit.processes) ------------------------------


def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    exact_env: bool = False,
    keep_stdout: bool | None = None,
) -> Proc:
    """Start *argv* in its own process group, stderr to a log file in LOG_DIR.

    stdout carries the service's JSON access log: discarded unless ``--keep-logs``, as a
    log shipper would take it away (its formatting cost is still paid).
    """
    log_path = LOG_DIR / f"{name}-{time.time_ns() // 1000}.log"
    keep = KEEP_LOGS if keep_stdout is None else keep_stdout
    return processes.spawn(name, argv, log_path, env, exact_env=exact_env, keep_stdout=keep)


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Poll *url* until it answers 200, failing early if *proc* died."""
    try:
        processes.wait_http(url, proc, timeout)
    except processes.ProcessError as exc:
        raise BenchError(str(exc)) from None


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards *wanted* (children inherit it); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


# -- the simulator -----------------------------------------------------------------------


@dataclass
class Simulator:
    proc: Proc
    url: str

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(self.url + path, json=payload, timeout=30)
        response.raise_for_status()
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        response = requests.get(self.url + "/_sim/stats", timeout=60)
        response.raise_for_status()
        return dict(response.json())

    def calls(self) -> int:
        return int(self.stats()["calls"])

    def reset(self) -> None:
        """Forget recorded calls and the rate-limit window."""
        self._post("/_sim/reset", {})

    def configure(self, **settings: Any) -> None:
        self._post("/_sim/config", settings)

    @contextmanager
    def latency(self, latency_ms: float) -> Iterator[None]:
        """Answer after *latency_ms* inside the block, then as before."""
        response = requests.get(self.url + "/_sim/config", timeout=30)
        response.raise_for_status()
        before = response.json()["latency_ms"]
        self.configure(latency_ms=latency_ms)
        try:
            yield
        finally:
            self.configure(latency_ms=before)


def start_simulator(rate_limit: int | None = None, latency_ms: float = 0) -> Simulator:
    port = free_port()
    module = "simulator" if SIM_NAGLE else "bench.sim_nodelay"
    argv = [
        PYTHON,
        "-m",
        module,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--secret-key",
        SIM_SECRET,
        "--rate-limit",
        str(rate_limit or 0),
        "--latency-ms",
        str(latency_ms),
    ]
    proc = spawn("simulator", argv)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_sim/stats", proc)
    return Simulator(proc, url)


# -- gunicorn behind its front: the service and the bare app ---------------------------------


@dataclass(frozen=True)
class GunicornConfig:
    """What ``gunicorn.conf.py`` chose for one environment (``gunicorn --print-config``)."""

    worker_class: str
    workers: int
    threads: int
    worker_connections: int

    @property
    def kind(self) -> str:
        """``gevent``, ``gthread`` (a subclass of gthread too) or the class as configured."""
        name = self.worker_class.lower()
        return "gevent" if "gevent" in name else "gthread" if "thread" in name else self.worker_class

    @property
    def shape(self) -> str:
        """E.g. ``gevent, 2 workers`` or ``gthread, 2 workers x 256 threads``."""
        workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        return f"{self.kind}, {workers}" + (f" x {self.threads} threads" if self.kind == "gthread" else "")


def each_worker_class(
    worker_classes: Sequence[str], run_class: Callable[[Simulator, str], dict[str, Any]]
) -> dict[str, Any]:
    """*run_class* for each worker class in turn, on one simulator (unlimited, no delay) they share."""
    sim = start_simulator(rate_limit=None)
    try:
        return {worker_class: run_class(sim, worker_class) for worker_class in worker_classes}
    finally:
        sim.proc.stop()


def gunicorn_config(env: Mapping[str, str], app_uri: str | None = None, flags: Sequence[str] = ()) -> GunicornConfig:
    """The settings ``gunicorn -c gunicorn.conf.py`` takes in *env* (the whole environment)."""
    argv = [
        PYTHON,
        "-m",
        "gunicorn",
        "--print-config",
        "-c",
        "gunicorn.conf.py",
        *flags,
        *([app_uri] if app_uri else []),
    ]
    completed = subprocess.run(argv, cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=60)
    values = dict(re.findall(r"^(\w+)\s+=\s+(.*)$", completed.stdout, re.M))
    try:
        return GunicornConfig(
            values["worker_class"].strip(),
            int(values["workers"]),
            int(values["threads"]),
            int(values["worker_connections"]),
        )
    except (KeyError, ValueError):
        raise BenchError(f"gunicorn --print-config gave no settings:\n{completed.stderr[-2000:]}") from None


@dataclass
class Server:
    """gunicorn (``gunicorn.conf.py``) on loopback, with its own nginx front (``deploy/nginx``)."""

    name: str
    proc: Proc
    front: Proc
    url: str  # the front: what every load generator calls
    backend_url: str
    config: GunicornConfig
    flags: tuple[str, ...]
    front_dir: Path
    env: dict[str, str] = field(repr=False)

    def worker_pids(self) -> list[int]:
        return child_pids(self.proc.pid)

    def stop(self) -> None:
        self.front.stop()
        self.proc.stop()
        shutil.rmtree(self.front_dir, ignore_errors=True)

    def check_alive(self) -> None:
        """Raise :class:`BenchError` if the server or its front died (or was killed) under load."""
        for proc in (self.proc, self.front):
            if not proc.alive():
                raise BenchError(f"{self.name}: {proc.name} exited during the run:\n{proc.log_tail()}")

    def limit_errors(self) -> list[str]:
        """Lines of the front's or gunicorn's log saying one of their own limits was reached."""
        lines = self.front.logs().splitlines() + self.proc.logs().splitlines()
        return [line for line in lines if LIMIT_MESSAGES.search(line)]

    def probe(self, path: str, auth: str = CALLER_AUTH) -> str:
        """One request's status and the start of its body: what a run's errors were."""
        try:
            response = requests.get(self.url + path, headers={"Authorization": auth}, timeout=5)
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"HTTP {response.status_code} {response.text[:200]}"


def settings_names() -> set[str]:
    """Every environment variable the service reads (its settings schema), where it can say."""
    try:
        from app.settings import SettingsSchema

        return {name for name in SettingsSchema().fields if name.isupper()}
    except Exception:  # noqa: BLE001 - a checkout whose app does not import: the fixed list still applies
        return set()


def service_env(
    sim: Simulator,
    upstream_limit: int,
    worker_class: str | None = None,
    threads: int | None = None,
    workers: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The service's environment: production settings, this simulator, the given gunicorn knobs.

    A knob left ``None`` is unset, so ``gunicorn.conf.py`` chooses (workers: one per core).
    *extra* adds or overrides variables; an empty value unsets one.
    """
    env = {
        "AMPLITUDE_SECRET_KEY": SIM_SECRET,
        "AMPLITUDE_API_URL": sim.url,
        "ALLOW_INSECURE_UPSTREAM": "true",
        "PROXY_API_KEYS": f"bench:{CALLER_KEY}",
        "PROFILE_REC_IDS": PROFILE_REC_IDS,
        "PROFILE_PREDICTION_IDS": PROFILE_PREDICTION_IDS,
        "UPSTREAM_RATE_LIMIT_PER_MINUTE": str(upstream_limit),
        **PRODUCTION_SETTINGS,
        "GUNICORN_WORKER_CLASS": worker_class or "",
        "GUNICORN_THREADS": str(threads) if threads else "",
        "WEB_CONCURRENCY": str(workers) if workers else "",
    }
    env.update(extra or {})
    return env


def _whole_env(env: Mapping[str, str], port: int) -> dict[str, str]:
    """This process's environment without anything that would configure the server, plus *env*."""
    dropped = set(INHERITED_NEVER) | settings_names()
    whole = {key: value for key, value in os.environ.items() if key not in dropped}
    whole.update({key: value for key, value in env.items() if value != ""})
    whole.update({"HOST": "127.0.0.1", "PORT": str(port)})
    return whole


_FRONT_ROOT: Path | None = None


def _front_root() -> Path:
    """One directory for every front's prefix, readable by nginx's workers (another user under root)."""
    global _FRONT_ROOT
    if _FRONT_ROOT is None:
        _FRONT_ROOT = Path(tempfile.mkdtemp(prefix="bench-front-"))
        _FRONT_ROOT.chmod(0o755)
        atexit.register(shutil.rmtree, _FRONT_ROOT, True)
    return _FRONT_ROOT


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def start_front(name: str, backend_port: int) -> tuple[Proc, str, Path]:
    """nginx rendered by ``deploy/nginx/render.py`` as ``scripts/run-prod.sh`` does it, before *backend_port*."""
    nginx = nginx_binary()
    if nginx is None:
        raise BenchError("nginx is not installed (make system-deps: nginx-light)")
    prefix = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_front_root()))
    prefix.chmod(0o755)
    port = free_port()
    render = [
        PYTHON,
        str(RENDER_FRONT),
        "--prefix",
        str(prefix),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{backend_port}",
        "--error-log",
        "/dev/stderr",
    ]
    front_env = {key: value for key, value in os.environ.items() if not key.startswith("FRONT_")}
    completed = subprocess.run(render, cwd=ROOT, env=front_env, capture_output=True, text=True, timeout=30)
    if completed.returncode != 0:
        raise BenchError(f"deploy/nginx/render.py failed:\n{completed.stderr[-2000:]}")
    proc = spawn(f"{name}-front", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "/dev/stderr"])
    url = f"http://127.0.0.1:{port}"
    return proc, url, prefix


def start_server(
    name: str, env: Mapping[str, str], app_uri: str | None = None, min_worker_connections: int = 0
) -> Server:
    """``gunicorn -c gunicorn.conf.py [APP]`` on loopback, then its front; both answering.

    The bare app runs under the same gunicorn.conf.py, so worker class, workers, threads,
    keep-alive and limits are the service's. With *min_worker_connections*, gunicorn's
    ``worker_connections`` is raised to at least that (the same flag for every server of
    a scenario), so gunicorn's own cap is not what a scenario measures.
    """
    port = free_port()
    whole = _whole_env(env, port)
    config = gunicorn_config(whole, app_uri)
    flags: tuple[str, ...] = ()
    if config.worker_connections < min_worker_connections:
        flags = ("--worker-connections", str(min_worker_connections))
        config = gunicorn_config(whole, app_uri, flags)
    argv = [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", *flags, *([app_uri] if app_uri else [])]
    proc = spawn(name, argv, whole, exact_env=True)
    backend_url = f"http://127.0.0.1:{port}"
    front = None
    try:
        wait_http(backend_url + "/healthz", proc)
        # Every worker must be up before load starts (the first /healthz proves only one).
        deadline = time.monotonic() + 30
        while len(child_pids(proc.pid)) < config.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        front, url, front_dir = start_front(name, port)
        wait_http(url + "/healthz", front)
    except BaseException:
        if front is not None:
            front.stop()
        proc.stop()
        raise
    return Server(name, proc, front, url, backend_url, config, flags, front_dir, dict(env))


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (machine-wide)."""
    try:
        with open("/proc/net/netstat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(counters.get("ListenOverflows", 0)) + int(counters.get("ListenDrops", 0))
    return 0


#: What nginx (or gunicorn) logs when one of its own limits, not the service, refused a connection.
LIMIT_MESSAGES = re.compile(r"worker_connections are not enough|Too many open files|accept4?\(\) failed")


def child_pids(pid: int) -> list[int]:
    """Direct children of *pid* (gunicorn's workers), from /proc."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(x) for x in handle.read().split()]
        return sorted(set(children))
    except OSError:
        return sorted(processes.children(pid))


def rss_bytes(pid: int) -> int:
    """Resident set size of *pid* from /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds *pids* have used so far (/proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


# -- wrk ----------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    #: "STATUS X-CACHE" -> answers, when counted (``statuses=True``, and in ``once`` mode).
    statuses: dict[str, int] = field(default_factory=dict)
    #: Requests sent after a ``sequential`` list wrapped: URLs sent a second time.
    repeated: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        """Socket errors and timeouts plus non-2XX/3XX answers."""
        return sum(self.errors.values())

    def by_status(self) -> dict[str, int]:
        """Answers by HTTP status alone."""
        counts: dict[str, int] = {}
        for key, n in self.statuses.items():
            status = key.split(" ", 1)[0]
            counts[status] = counts.get(status, 0) + n
        return counts

    def ms(self, name: str) -> float:
        return self.latency_us[name] / 1000.0


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def write_paths(lines: Iterable[str], name: str) -> Path:
    path = LOG_DIR / name
    with open(path, "w") as handle:
        for line in lines:
            handle.write(line + "\n")
    return path


class WrkRun:
    """One wrk process (registered like every child), started now and read by :meth:`result`."""

    def __init__(
        self,
        base_url: str,
        paths_file: Path,
        connections: int,
        duration: float,
        *,
        mode: str = "random",
        header: tuple[str, str] = ("Authorization", CALLER_AUTH),
        threads: int = 2,
        timeout_s: float = BRAZE_TIMEOUT_S,
        statuses: bool = False,
        name: str = "wrk",
    ) -> None:
        """``timeout_s`` is wrk's per-request timeout (an answer slower counts as a timeout, not
        a latency): 2 s by default, what Braze gives an endpoint."""
        if not wrk_available():
            raise BenchError("wrk is not installed (apt-get install wrk)")
        threads = max(1, min(threads, connections))
        self.duration = max(1, round(duration))
        self.done_dir: Path | None = None
        env = {"BENCH_WRK_STATUSES": "1" if statuses else "0"}
        if mode == "once":
            self.done_dir = Path(tempfile.mkdtemp(prefix="once-", dir=LOG_DIR))
            env["BENCH_WRK_DONE_DIR"] = str(self.done_dir)
        self.threads = threads
        argv = [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{self.duration}s",
            "--timeout",
            f"{max(1, round(timeout_s))}s",
            "-s",
            str(WRK_SCRIPT),
            base_url,
            "--",
            str(paths_file),
            mode,
            str(threads),
            header[0],
            header[1],
        ]
        self.proc = spawn(name, argv, env, keep_stdout=True)

    def finished_lines(self) -> bool:
        """``once`` mode: every thread has had all its lines answered."""
        return self.done_dir is not None and len(os.listdir(self.done_dir)) >= self.threads

    def result(self, until: Callable[[], bool] | None = None) -> WrkResult:
        """Wait for wrk (its duration, plus a margin); with *until*, stop it (SIGINT: it still
        reports) as soon as that is true. ``once`` mode stops when every line is answered."""
        if until is None and self.done_dir is not None:
            until = self.finished_lines
        deadline = time.monotonic() + self.duration + 30
        stopped = False
        while self.proc.alive() and time.monotonic() < deadline:
            if until is not None and not stopped and until():
                self.proc.popen.send_signal(signal.SIGINT)
                stopped = True
            time.sleep(0.05)
        if self.proc.alive():
            self.proc.popen.send_signal(signal.SIGINT)
            try:
                self.proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.proc.stop()
        output = self.proc.logs()
        for line in output.splitlines():
            if line.startswith("BENCH_JSON "):
                data = json.loads(line[len("BENCH_JSON ") :])
                return WrkResult(
                    requests=int(data["requests"]),
                    duration_s=data["duration_us"] / 1e6,
                    bytes=int(data["bytes"]),
                    errors={k: int(v) for k, v in data["errors"].items()},
                    latency_us={k: float(v) for k, v in data["latency"].items()},
                    statuses={k: int(v) for k, v in data.get("statuses", {}).items()},
                    repeated=int(data.get("repeated", 0)),
                )
        raise BenchError(f"wrk gave no result (exit {self.proc.popen.returncode}):\n{output[-3000:]}")


def run_wrk(base_url: str, paths_file: Path, connections: int, duration: float, **options: Any) -> WrkResult:
    """Drive *base_url* with wrk over the paths in *paths_file*; see :class:`WrkRun`."""
    return WrkRun(base_url, paths_file, connections, duration, **options).result()


def run_once(base_url: str, paths_file: Path, connections: int, time_limit: float, **options: Any) -> WrkResult:
    """Send every line of *paths_file* exactly once (bounded by *time_limit*); counts by status."""
    return WrkRun(base_url, paths_file, connections, time_limit, mode="once", **options).result()


# -- statistics and the machine -------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of *values* (``nan`` when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(pct / 100.0 * len(ordered) + 0.5)) - 1))
    return float(ordered[rank])


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median of run *i*'s ratio ours / theirs over the runs.

    The runs of one round go back to back, so a drift of the machine between rounds (a
    shared or virtual machine speeds up and slows down by tens of percent) cancels out
    in each ratio; a ratio of two medians could set one round's run against another's.
    """
    pairs = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    return median(pairs) if pairs else float("nan")


def _first_line(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    lines = (completed.stdout + completed.stderr).splitlines()
    return lines[0] if lines else "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    wrk_version = re.sub(r"\s+Copyright.*", "", _first_line(["wrk", "-v"])).strip()
    nginx = nginx_binary()
    nginx_version = _first_line([nginx, "-v"]).replace("nginx version: ", "") if nginx else "not installed"
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in ("gunicorn", "gevent", "flask", "werkzeug", "requests"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = "not installed"
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = float("nan")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "load_at_start": load,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wrk": wrk_version,
        "nginx": nginx_version,
        "libs": libs,
    }
