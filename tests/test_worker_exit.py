"""Workers leave cleanly: an exiting worker releases its heartbeat and share at once, and a
``USR2`` upgrade keeps one state directory between the two masters.

The hook is called as gunicorn calls it (``worker_exit(server, worker)``, the worker
holding the app it loaded), then seen from outside: gunicorn told to run one worker
fewer (``TTOU``), and a binary upgrade (``USR2`` to the master, then ``TERM`` to the old
one), as gunicorn's documentation describes it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest import mock

import pytest
import redis
import requests

from app import create_app
from app.settings import SettingsSchema
from testkit import wait_until
from testkit.processes import ROOT, Proc, children, free_port, gunicorn_env, spawn, wait_http
from tests.conftest import BRAZE_KEY, base_env

AUTH = {"Authorization": f"Bearer {BRAZE_KEY}", "Connection": "close"}  # a new connection: any worker


def gunicorn_conf() -> ModuleType:
    """gunicorn.conf.py as gunicorn loads it, without letting it set this process's environment."""
    spec = importlib.util.spec_from_file_location("gunicorn_conf_under_test", ROOT / "gunicorn.conf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # it sets PROMETHEUS_MULTIPROC_DIR and UPSTREAM_BUDGET_SHARES
        spec.loader.exec_module(module)
    return module


def fleet_in_redis(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.zcard("ampproxy:fleet"))
    finally:
        client.close()


def fleet_in_file(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM fleet").fetchone()[0])
    finally:
        db.close()


def state_file(service, count: int = 1) -> Path:
    """The machine's SQLite file the master named in its log (waiting for *count* such lines)."""
    found = wait_until(lambda: len(paths := re.findall(r" through (\S+\.sqlite3)", service.logs())) >= count and paths)
    assert len(set(found)) == 1, found
    return Path(found[0])


def test_the_hook_releases_the_workers_heartbeat_and_share(sim, redis_url, tmp_path):
    conf = gunicorn_conf()
    path = tmp_path / "machine.sqlite3"
    app = create_app(environ=base_env(sim, REDIS_URL=redis_url, SHARED_STATE_PATH=str(path), REDIS_TIMEOUT_SECONDS=1))
    budget = app.extensions["profile_proxy"].budget
    budget.heartbeat()  # counted in the fleet (its heartbeat thread would, in 1.7 s)
    assert fleet_in_redis(redis_url) == 1 and fleet_in_file(path) == 1
    conf.worker_exit(None, SimpleNamespace(wsgi=app))
    assert fleet_in_redis(redis_url) == 0 and fleet_in_file(path) == 0
    # gunicorn also calls it in the master, for a worker that died unseen: no app there.
    conf.worker_exit(None, SimpleNamespace(pid=12345))


@pytest.mark.parametrize("tier", ["redis", "sqlite"])
def test_a_worker_told_to_leave_leaves_the_fleet_at_once(gunicorn_service, sim, redis_url, tier):
    settings = {"REDIS_URL": redis_url} if tier == "redis" else {}
    service = gunicorn_service(WEB_CONCURRENCY=2, REDIS_TIMEOUT_SECONDS=0.5, **settings)
    wait_until(lambda: len(children(service.process.pid)) == 2, timeout=30, message="not 2 workers")
    path = state_file(service)

    def fleet() -> int:
        return fleet_in_redis(redis_url) if tier == "redis" else fleet_in_file(path)

    wait_until(lambda: fleet() == 2, timeout=15, message="both workers heard from")
    os.kill(service.process.pid, signal.SIGTTOU)  # one worker fewer: gunicorn stops one gracefully
    # Without the hook the member stays for the fleet horizon (5 minutes), its share held back.
    wait_until(lambda: fleet() == 1, timeout=15, message="the worker that exited still counted")
    assert requests.get(f"{service.url}/v1/users/user-left/cohorts", headers=AUTH, timeout=5).status_code == 200


def _gone(pid: int) -> bool:
    """Whether *pid* has exited (a zombie waiting for its new parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@dataclass
class Upgradable:
    proc: Proc
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.proc.logs()


@pytest.fixture
def upgradable_service(sim, tmp_path) -> Iterator[Upgradable]:
    """gunicorn started as the image starts it, by its ``gunicorn`` script: a ``USR2`` re-executes
    the master's command line, and ``python -m gunicorn``'s (gunicorn/__main__.py run as a
    script) would put gunicorn's own package first on the new master's path."""
    unset = [*SettingsSchema().fields, "WEB_CONCURRENCY", "GUNICORN_WORKER_CLASS", "GUNICORN_THREADS"]
    port = free_port()
    env = gunicorn_env(base_env(sim, WEB_CONCURRENCY=2), port, unset)
    script = str(Path(sys.executable).parent / "gunicorn")
    proc = spawn("gunicorn", [script, "-c", "gunicorn.conf.py"], tmp_path / "gunicorn.log", env, exact_env=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield Upgradable(proc, f"http://127.0.0.1:{port}")
    finally:
        proc.stop(timeout=25)  # the process group: a new master still running is in it


def test_a_usr2_upgrade_keeps_one_state_directory_between_the_masters(upgradable_service, sim):
    service = upgradable_service
    old = service.pid
    wait_until(lambda: len(children(old)) == 2, timeout=30, message="not 2 workers")
    path = state_file(service)
    user = f"{service.url}/v1/users/user-upgraded/cohorts"
    assert requests.get(user, headers=AUTH, timeout=5).headers["X-Cache"] == "MISS"

    os.kill(old, signal.SIGUSR2)  # the new master is the old one's child, with workers of its own

    def new_master() -> int | None:
        return next((pid for pid in children(old) if len(children(pid)) == 2), None)

    new = wait_until(new_master, timeout=40, message="no new master with its workers")
    assert state_file(service, count=2) == path  # the new master named the same file
    service.proc.popen.send_signal(signal.SIGTERM)  # the old master and its workers stop
    service.proc.popen.wait(timeout=30)
    assert path.exists(), "the old master removed the directory the new master uses"
    deadline = time.monotonic() + 15
    answer = None
    while time.monotonic() < deadline:  # the listening socket is the new master's alone now
        answer = requests.get(user, headers=AUTH, timeout=5)
        if answer.status_code == 200:
            break
    assert answer is not None and answer.status_code == 200
    # Its workers never saw this user: the answer comes from the file the old master's made.
    assert answer.headers["X-Cache"] == "HIT" and sim.calls == 1
    wait_until(lambda: fleet_in_file(path) == 2, timeout=15, message="the old workers still counted")

    os.kill(new, signal.SIGTERM)  # the last master out removes the directory
    wait_until(lambda: _gone(new), timeout=30, message="the new master did not stop")
    assert not path.parent.exists()
