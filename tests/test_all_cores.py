"""Every core without a server: gunicorn's default configuration without Redis.

One worker per core, sharing cache, single-flight claims and admission through one SQLite
file in a private temporary directory that lives as long as the master. Integration
tests over real sockets, under the project's gunicorn.conf.py.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from app.settings import SettingsSchema
from testkit import wait_until
from testkit.processes import ROOT, children, free_port, gunicorn_env
from tests.conftest import BRAZE_KEY, base_env
from tests.test_budget_soak import calls_in_last, flood

AUTH = {"Authorization": f"Bearer {BRAZE_KEY}", "Connection": "close"}  # a new connection: any worker


def state_file(service) -> Path:
    """The SQLite file the master named in its log."""
    found = wait_until(lambda: re.search(r"share cache and budget through (\S+)", service.logs()))
    return Path(found.group(1))


def test_one_worker_per_core_and_one_upstream_call_per_user_across_them(gunicorn_service, sim):
    sim.latency_ms = 300
    service = gunicorn_service()
    cores = len(os.sched_getaffinity(0))
    wait_until(lambda: len(children(service.process.pid)) == cores, message=f"not {cores} workers")
    assert f"{cores} gevent worker{'' if cores == 1 else 's'}, up to 4000 connections each" in service.logs()
    path = state_file(service)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600

    def stampede(user: str) -> set[str]:
        """Ten requests at once for one cold user; the workers that answered them."""
        with ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(lambda _: requests.get(f"{service.url}/v1/users/{user}/cohorts", headers=AUTH,
                                                            timeout=5), range(10)))  # fmt: skip
        assert [answer.status_code for answer in answers] == [200] * 10
        return {answer.headers["X-Request-ID"][:16] for answer in answers}  # the per-process prefix

    # The kernel hands connections to workers as it likes: stampede until one spans them all.
    spanned = False
    for round_ in range(1, 6):
        spanned = len(stampede(f"user-cores-{round_}")) == cores
        assert sim.calls == round_  # one upstream call per user, whichever worker took its requests
        if spanned:
            break
    assert spanned, "no stampede reached every worker"
    service.stop()
    assert not path.parent.exists()  # removed with the master


def test_a_process_allowed_one_core_runs_one_worker(sim, tmp_path):
    """The worker count follows the cores this process may use (its CPU affinity, as
    ``taskset`` or a container's cpuset sets it), not the machine's: one core, one worker,
    sharing nothing."""
    chosen = ["WEB_CONCURRENCY", "GUNICORN_WORKER_CLASS", "GUNICORN_THREADS", "UPSTREAM_BUDGET_SHARES",
              "SHARED_STATE_PATH", "REDIS_URL"]  # fmt: skip
    env = gunicorn_env(base_env(sim), free_port(), chosen)
    one_core = {min(os.sched_getaffinity(0))}
    log_path = tmp_path / "one-core.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=log,
                                   preexec_fn=lambda: os.sched_setaffinity(0, one_core))  # fmt: skip
    try:
        started = wait_until(lambda: "Booting worker" in log_path.read_text() and log_path.read_text(), timeout=30)
        assert "1 gevent worker, up to 4000 connections each" in started
        assert "share cache and budget through" not in started
        wait_until(lambda: len(children(process.pid)) == 1, timeout=30)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_one_worker_stays_in_its_own_process(gunicorn_service, sim):
    service = gunicorn_service(WEB_CONCURRENCY=1)
    assert requests.get(f"{service.url}/v1/users/user-solo/cohorts", headers=AUTH, timeout=5).status_code == 200
    assert "share cache and budget through" not in service.logs()


@pytest.mark.parametrize("problem", ["no directory", "not a database"])
def test_a_bad_state_file_stops_the_start_with_one_line(sim, tmp_path, problem):
    path = tmp_path / "missing" / "shared.sqlite3"
    if problem == "not a database":
        path = tmp_path / "shared.sqlite3"
        path.write_bytes(b"something else entirely" * 100)
    env = gunicorn_env(base_env(sim, SHARED_STATE_PATH=path), free_port(), [*SettingsSchema().fields])
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(lines) == 1 and lines[0].startswith("configuration error: SHARED_STATE_PATH")
    assert str(path) not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_several_workers_without_redis_never_exceed_the_limit(gunicorn_service, sim):
    """Three workers on two cores, no Redis, limit 60: a 75-second flood of new users."""
    sim.rate_limit_per_minute = 60
    service = gunicorn_service(UPSTREAM_RATE_LIMIT_PER_MINUTE=60, WEB_CONCURRENCY=3)
    wait_until(lambda: len(children(service.process.pid)) == 3, message="not 3 workers")
    answers = flood([service.url], seconds=75, per_second=20, prefix="cores")
    assert sim.count_by_status().get(429, 0) == 0
    assert sim.max_in_window(60.0) <= 60
    # The master's new log ramps up over its first window; by now each freed slot is reused,
    # whichever worker asks.
    assert calls_in_last(sim, 60.0) >= 50, calls_in_last(sim, 60.0)
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]  # real or default
