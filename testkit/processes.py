"""Child processes for tests and benchmarks: free ports, process groups, start-up polling.

Every process goes through :func:`spawn`: it runs in a session (and process group) of
its own and is registered here; :func:`stop_all` (also run at exit) terminates each
group, then kills what is left, so no gunicorn worker or redis-server outlives a run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


class ProcessError(RuntimeError):
    """A child process did not start, or died."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left of it."""
        if self.popen.returncode is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Workers can outlive a master killed hard: always sweep the group.
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self in _LIVE:
            _LIVE.remove(self)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_LIVE: list[Proc] = []


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    exact_env: bool = False,
    keep_stdout: bool = True,
) -> Proc:
    """Start *argv* from the repository root in its own process group, logging to *log_path*.

    *env* is added to this process's environment, or is the whole environment with
    *exact_env*. With ``keep_stdout=False`` stdout (the service's access log) is
    discarded, as a log shipper would take it away; stderr is always kept.
    """
    handle = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    full_env = {} if exact_env else dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    popen = subprocess.Popen(
        list(argv),
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=handle if keep_stdout else subprocess.DEVNULL,
        stderr=handle,
        start_new_session=True,
    )
    handle.close()
    proc = Proc(name, popen, log_path)
    _LIVE.append(proc)
    return proc


def stop_all() -> None:
    for proc in list(reversed(_LIVE)):
        proc.stop()


atexit.register(stop_all)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    """The processes whose parent is *pid* (gunicorn's workers, for its master), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Poll *url* until it answers 200, failing early if *proc* died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcessError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise ProcessError(f"{proc.name} did not answer {url} within {timeout:.0f} s:\n{proc.log_tail()}")


def gunicorn_env(env: Mapping[str, str], port: int, unset: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment less *unset*, plus *env*, listening on loopback *port*."""
    base = {key: value for key, value in os.environ.items() if key not in unset}
    base.update(env)
    base.update({"PORT": str(port), "HOST": "127.0.0.1"})
    return base


def start_gunicorn(
    name: str, env: Mapping[str, str], log_path: Path, app_uri: str | None = None, keep_stdout: bool = True,
    extra_flags: Sequence[str] = (), timeout: float = 30.0,
) -> tuple[Proc, str]:  # fmt: skip
    """``gunicorn -c gunicorn.conf.py [APP]`` on a free port; returns the process and its URL.

    *env* is the whole environment (see :func:`gunicorn_env`); ``PORT`` in it is used.
    """
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *extra_flags]
    if app_uri:
        argv.append(app_uri)
    proc = spawn(name, argv, log_path, env, exact_env=True, keep_stdout=keep_stdout)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_http(url + "/healthz", proc, timeout)
    except ProcessError:
        proc.stop()
        raise
    return proc, url


class RedisServer:
    """A real ``redis-server`` on a free port, in *workdir*, that tests may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProcessError("redis-server is not installed: run `make system-deps` (CI installs it)")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]  # fmt: skip
        self.proc = spawn("redis", argv, self.workdir / f"redis-{self.port}.log")
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.proc.alive():
                    raise ProcessError(f"redis-server exited:\n{self.proc.log_tail()}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise ProcessError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None
