"""Issue 21's live-before-bulk scenario, with real processes in real time (about four minutes).

``.venv/bin/python scripts/priority_scenario.py`` from the repository root. One instance
(gunicorn with the shipped ``gunicorn.conf.py`` and its default workers, which share the
machine's SQLite file) at ``UPSTREAM_RATE_LIMIT_PER_MINUTE=120`` and ``BULK_CALLERS=warm``,
in front of the simulator (``python -m simulator --rate-limit 120``):

1. a live key floods new users, 30 a second, for 130 s;
2. then ``python -m app warm`` runs with the bulk key over 2,000 ids (8 at a time);
3. a second later the live key asks for one new user a second, 65 times.

It prints the live answers of step 3 that carried data, the calls granted to each class in
the last minute (the service's ``proxy_budget_granted_total``) and received by the
simulator in it, the most calls in any 60 s at the simulator, and its 429s. Not a test:
figures for a closing note.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.settings import SettingsSchema  # noqa: E402
from testkit.processes import free_port, gunicorn_env, spawn, start_gunicorn, stop_all, wait_http  # noqa: E402

LIMIT = 120
SECRET = "scenario-secret-key"
LIVE_KEY, WARM_KEY = "scenario-live-key-0001", "scenario-warm-key-0002"
FLOOD_SECONDS, FLOOD_PER_SECOND = 130, 30
LIVE_REQUESTS = 65
WARM_IDS = 2000


def get(session: requests.Session, url: str, key: str) -> requests.Response:
    return session.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=5)


def flood(service: str) -> dict[int, int]:
    """New users from the live key, paced at FLOOD_PER_SECOND for FLOOD_SECONDS: statuses counted."""
    counter = itertools.count()
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    threads = 16
    started = time.monotonic()
    interval = threads / FLOOD_PER_SECOND

    def worker(offset: int) -> None:
        due = started + offset * interval / threads
        with requests.Session() as session:
            while (now := time.monotonic()) < started + FLOOD_SECONDS:
                if due > now:
                    time.sleep(due - now)
                due += interval
                try:
                    status = get(session, f"{service}/v1/users/flood-{next(counter)}", LIVE_KEY).status_code
                except requests.RequestException:
                    status = 0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(worker, n) for n in range(threads)]:
            future.result()
    return statuses


def granted_by_class(service: str) -> dict[str, float]:
    """``proxy_budget_granted_total`` by class, as the service's metrics say now."""
    text = get(requests.Session(), f"{service}/metrics", LIVE_KEY).text
    found = re.findall(r'^proxy_budget_granted_total\{class="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {cls: float(value) for cls, value in found}


def simulator_stats(simulator: str) -> dict:
    return requests.get(f"{simulator}/_sim/stats", timeout=5).json()


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="priority-scenario-"))
    sim_port = free_port()
    simulator = f"http://127.0.0.1:{sim_port}"
    sim_proc = spawn("simulator", [sys.executable, "-m", "simulator", "--port", str(sim_port), "--rate-limit",
                                   str(LIMIT), "--secret-key", SECRET], workdir / "simulator.log")  # fmt: skip
    try:
        wait_http(f"{simulator}/_sim/stats", sim_proc)
        settings = {
            "AMPLITUDE_SECRET_KEY": SECRET, "AMPLITUDE_API_URL": simulator, "ALLOW_INSECURE_UPSTREAM": "true",
            "PROXY_API_KEYS": f"braze:{LIVE_KEY},warm:{WARM_KEY}", "BULK_CALLERS": "warm",
            "UPSTREAM_RATE_LIMIT_PER_MINUTE": str(LIMIT), "ACCESS_LOG": "false",
        }  # fmt: skip
        env = gunicorn_env(settings, free_port(), unset=[*SettingsSchema().fields, "WEB_CONCURRENCY"])
        _, service = start_gunicorn("gunicorn", env, workdir / "gunicorn.log")
        print(f"service {service}, simulator {simulator}, logs in {workdir}", flush=True)

        print(f"1. flood: {FLOOD_PER_SECOND} new users a second for {FLOOD_SECONDS} s ...", flush=True)
        flood_statuses = flood(service)
        print(f"   flood answers by status: {dict(sorted(flood_statuses.items()))}", flush=True)

        ids = workdir / "ids.txt"
        ids.write_text("\n".join(f"bulk-{n}" for n in range(WARM_IDS)) + "\n")
        warm_out = open(workdir / "warm.json", "wb")  # noqa: SIM115 - the child writes it
        warm = subprocess.Popen(
            [sys.executable, "-m", "app", "warm", str(ids), "--url", service, "--concurrency", "8", "--no-progress",
             "--json"],
            cwd=ROOT, env={**os.environ, "PROXY_API_KEY": WARM_KEY}, stdout=warm_out, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        print(f"2. warm-up over {WARM_IDS} ids started (bulk key, 8 at a time)", flush=True)
        time.sleep(1.0)

        print(f"3. live: one new user a second, {LIVE_REQUESTS} times ...", flush=True)
        answers: list[tuple[int, str]] = []
        started = time.monotonic()
        window_start: tuple[dict[str, float], int] | None = None
        with requests.Session() as session:
            for n in range(LIVE_REQUESTS):
                time.sleep(max(0.0, started + n - time.monotonic()))
                if n == LIVE_REQUESTS - 60:  # the last minute starts here
                    window_start = (granted_by_class(service), simulator_stats(simulator)["calls"])
                try:
                    response = get(session, f"{service}/v1/users/live-{n}", LIVE_KEY)
                    answers.append((response.status_code, response.json().get("error", "data")))
                except requests.RequestException as exc:
                    answers.append((0, type(exc).__name__))
        granted_end, sim_end = granted_by_class(service), simulator_stats(simulator)
        warm.send_signal(signal.SIGTERM)
        try:
            warm.wait(timeout=30)
        except subprocess.TimeoutExpired:
            warm.kill()
            warm.wait()
        warm_out.close()

        assert window_start is not None
        granted_start, sim_calls_start = window_start
        with_data = sum(1 for status, what in answers if status == 200 and what == "data")
        others: dict[str, int] = {}
        for status, what in answers:
            if (status, what) != (200, "data"):
                others[f"{status} {what}"] = others.get(f"{status} {what}", 0) + 1
        live_minute = granted_end.get("live", 0) - granted_start.get("live", 0)
        bulk_minute = granted_end.get("bulk", 0) - granted_start.get("bulk", 0)
        print()
        print(f"live answers with data: {with_data} / {len(answers)}" + (f"  (others: {others})" if others else ""))
        print(f"calls granted in the last minute: live {live_minute:.0f}, bulk {bulk_minute:.0f}, "
              f"together {live_minute + bulk_minute:.0f} of {LIMIT}")  # fmt: skip
        print(f"calls the simulator received in the last minute: {sim_end['calls'] - sim_calls_start}")
        print(f"most calls in any 60 s at the simulator: {sim_end['max_in_60s']} (limit {LIMIT})")
        print(f"simulator answers by status: {sim_end['by_status']}; 429s: {sim_end['by_status'].get('429', 0)}")
        try:
            warm_summary = json.loads((workdir / "warm.json").read_text() or "{}")
        except json.JSONDecodeError:
            warm_summary = {}
        shown = {key: warm_summary[key] for key in ("fetched", "failed", "processed", "total") if key in warm_summary}
        print(f"warm-up when stopped: {shown}")
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
