"""Processes, ports, wrk and small statistics shared by every scenario.

Every process the harness starts goes through :func:`spawn`: it runs in a session (and
process group) of its own, is registered here, and :func:`stop_all` (called from the
CLI's ``finally`` and at exit) terminates each group, then kills what is left.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from testkit import processes
from testkit.processes import Proc, free_port, stop_all  # noqa: F401 - stop_all is re-exported for bench.cli

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "wrk" / "paths.lua"
PYTHON = sys.executable

SIM_SECRET = "bench-sim-secret-key"
CALLER_KEY = "bench-key-123"
CALLER_AUTH = f"Bearer {CALLER_KEY}"
SIM_AUTH = f"Api-Key {SIM_SECRET}"
PROFILE_REC_IDS = "rec_home,rec_email"
PROFILE_PREDICTION_IDS = "pred_churn"
#: "Out of the way": the highest value the service's settings accept.
UNLIMITED = 1_000_000_000

#: Where subprocess logs go; kept for the run so a failure can be inspected.
LOG_DIR = Path(tempfile.mkdtemp(prefix="bench-logs-"))


#: ``--keep-logs``: keep subprocesses' stdout too (the service's JSON access log: large).
KEEP_LOGS = bool(os.environ.get("BENCH_KEEP_LOGS"))


class BenchError(processes.ProcessError):
    """A scenario could not run (a process did not start, wrk failed...)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes (shared with the test suite: testkit.processes) ------------------------------


def spawn(name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, exact_env: bool = False) -> Proc:
    """Start *argv* in its own process group, stderr to a log file in LOG_DIR.

    stdout carries the service's JSON access log: discarded unless ``--keep-logs``, as a
    log shipper would take it away (its formatting cost is still paid).
    """
    log_path = LOG_DIR / f"{name}-{int(time.time() * 1000)}.log"
    return processes.spawn(name, argv, log_path, env, exact_env=exact_env, keep_stdout=KEEP_LOGS)


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Poll *url* until it answers 200, failing early if *proc* died."""
    try:
        processes.wait_http(url, proc, timeout)
    except processes.ProcessError as exc:
        raise BenchError(str(exc)) from None


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


#: ``--sim-nagle``: run the stock simulator (see :mod:`bench.sim_nodelay`).
SIM_NAGLE = bool(os.environ.get("BENCH_SIM_NAGLE"))


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


# -- gunicorn: the service and the bare app ------------------------------------------------


@dataclass
class Server:
    name: str
    proc: Proc
    url: str
    workers: int
    threads: int
    env: dict[str, str] = field(repr=False)

    def worker_pids(self) -> list[int]:
        return child_pids(self.proc.pid)

    def stop(self) -> None:
        self.proc.stop()

    def check_alive(self) -> None:
        """Raise :class:`BenchError` if the server died (or was killed from outside) under load."""
        if not self.proc.alive():
            raise BenchError(f"{self.name} exited during the run:\n{self.proc.log_tail()}")

    def probe(self, path: str, auth: str = CALLER_AUTH) -> str:
        """One request's status and the start of its body: what a run's errors were."""
        try:
            response = requests.get(self.url + path, headers={"Authorization": auth}, timeout=5)
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"HTTP {response.status_code} {response.text[:200]}"


def service_env(sim: Simulator, upstream_limit: int, workers: int, threads: int, **extra: str) -> dict[str, str]:
    """The service's environment as the brief gives it; *extra* adds or overrides."""
    env = {
        "AMPLITUDE_SECRET_KEY": SIM_SECRET,
        "AMPLITUDE_API_URL": sim.url,
        "ALLOW_INSECURE_UPSTREAM": "true",
        "PROXY_API_KEYS": f"bench:{CALLER_KEY}",
        "PROFILE_REC_IDS": PROFILE_REC_IDS,
        "PROFILE_PREDICTION_IDS": PROFILE_PREDICTION_IDS,
        "UPSTREAM_RATE_LIMIT_PER_MINUTE": str(upstream_limit),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
    }
    # Never let the caller's environment choose the tier or the metrics directory.
    for name in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "UPSTREAM_BUDGET_SHARES"):
        env[name] = ""
    env.update(extra)
    return env


def start_gunicorn(name: str, env: Mapping[str, str], app_uri: str | None = None, workers: int | None = None) -> Server:
    """``gunicorn -c gunicorn.conf.py [APP]`` from the repository root, on a free port.

    With *app_uri* (the bare app) the service's own gunicorn.conf.py is still used, so
    worker class, keep-alive, backlog and limits are identical; only the WSGI app differs.
    """
    port = free_port()
    full_env = dict(env)
    full_env["PORT"] = str(port)
    # Empty values mean "unset" for these (gunicorn.conf.py uses os.environ.get / setdefault).
    unset = [key for key, value in full_env.items() if value == ""]
    argv = [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", *_gunicorn_extra_flags()]
    if app_uri:
        argv.append(app_uri)
    base = {key: value for key, value in os.environ.items() if key not in unset}
    base.update({key: value for key, value in full_env.items() if value != ""})
    proc = spawn(name, argv, base, exact_env=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    # What gunicorn.conf.py chose, as its master logs it at start (the defaults depend on the cores).
    chosen = re.search(r"(\d+) workers? x (\d+) threads", proc.logs())
    if chosen:
        workers, threads = int(chosen.group(1)), int(chosen.group(2))
    else:
        workers = workers or int(full_env.get("WEB_CONCURRENCY") or 1)
        threads = int(full_env.get("GUNICORN_THREADS") or 32)
    # Every worker must be up before load starts (the first /healthz proves only one).
    deadline = time.monotonic() + 20
    while len(child_pids(proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    return Server(name, proc, url, workers, threads, full_env)


_EXTRA_FLAGS: list[str] | None = None


def _gunicorn_extra_flags() -> list[str]:
    """``--no-control-socket`` where gunicorn has one (23+): several masters must not share
    one control socket path, and the user's own socket must not be clobbered."""
    global _EXTRA_FLAGS
    if _EXTRA_FLAGS is None:
        help_text = subprocess.run(
            [PYTHON, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT
        ).stdout
        _EXTRA_FLAGS = ["--no-control-socket"] if "--no-control-socket" in help_text else []
    return _EXTRA_FLAGS


def child_pids(pid: int) -> list[int]:
    """Direct children of *pid* (gunicorn's workers), from /proc."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(x) for x in handle.read().split()]
        return sorted(set(children))
    except OSError:
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return sorted(children)


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

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        """Socket errors and timeouts plus non-2XX/3XX answers."""
        return sum(self.errors.values())

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


def run_wrk(
    base_url: str,
    paths_file: Path,
    connections: int,
    duration: float,
    *,
    mode: str = "random",
    header: tuple[str, str] = ("Authorization", CALLER_AUTH),
    threads: int = 2,
    timeout_s: float = 2.0,
) -> WrkResult:
    """Drive *base_url* with wrk over the paths in *paths_file* (``random`` or ``sequential``).

    ``timeout_s`` is wrk's per-request timeout: 2 s, what Braze gives an endpoint.
    """
    if not wrk_available():
        raise BenchError("wrk is not installed (apt-get install wrk)")
    threads = max(1, min(threads, connections))
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
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
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, cwd=ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON ") :])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                bytes=int(data["bytes"]),
                errors={k: int(v) for k, v in data["errors"].items()},
                latency_us={k: float(v) for k, v in data["latency"].items()},
            )
    raise BenchError(f"wrk gave no result (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


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
    try:
        wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
        wrk_version = re.sub(r"\s+Copyright.*", "", wrk_version).strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        wrk_version = "not installed"
    try:
        from importlib.metadata import version

        libs = {name: version(name) for name in ("gunicorn", "flask", "werkzeug", "requests")}
    except Exception:  # pragma: no cover - metadata is always there in the venv
        libs = {}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wrk": wrk_version,
        "libs": libs,
    }
