"""``python -m app warm``: warming the cache through the running service before a Braze send."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.warm import main
from tests.conftest import BRAZE_KEY, ROOT, free_port

KNOWN = [f"user-{n}" for n in range(1, 7)]
UNKNOWN = ["unknown-1", "unknown-2"]


@pytest.fixture(autouse=True)
def _caller_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_API_KEY", BRAZE_KEY)
    monkeypatch.delenv("PROXY_URL", raising=False)


def warm(capsys: pytest.CaptureFixture[str], service: Any, *args: str) -> tuple[int, str, str]:
    """Run the command in-process against *service*; return (exit code, its stdout, stderr)."""
    code = main([*args, "--url", service.url, "--no-progress"])
    out, err = capsys.readouterr()
    assert BRAZE_KEY not in out + err
    # The in-process service logs to the same streams: keep only the command's own lines.
    out = "".join(line for line in out.splitlines(keepends=True) if '"logger":' not in line)
    return code, out, err


def summary(capsys: pytest.CaptureFixture[str], service: Any, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = warm(capsys, service, *args, "--json")
    return code, json.loads(out)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_file_warms_every_distinct_id_once_then_the_service_answers_from_cache(service, sim, tmp_path, capsys):
    lines = ["", *KNOWN[:3], "  user-1  ", *UNKNOWN, "", *KNOWN[3:], "user-2", "unknown-1", "\t"]
    ids = write(tmp_path, "ids.txt", "\r\n".join(lines) + "\n")
    code, out, err = warm(capsys, service, ids)
    assert code == 0, err
    assert out.startswith("fetched 6, not found 2, failed 0, skipped as fresh 0 (8 ids in ")
    assert sim.calls == len(KNOWN) + len(UNKNOWN)
    # The whole profile answers every route: Braze's lookups are hits and cost no upstream call.
    for path in ("/v1/users/user-4", "/v1/users/user-4/cohorts", "/v1/users/user-1/recommendations/rec_home"):
        assert service.get(path).headers["X-Cache"] == "HIT"
    assert service.get("/v1/users/unknown-2").status_code == 404
    assert sim.calls == 8


def test_second_run_skips_everything_still_fresh(service, sim, tmp_path, capsys):
    ids = write(tmp_path, "ids.txt", "\n".join(KNOWN + UNKNOWN))
    assert summary(capsys, service, ids)[1]["fetched"] == 6
    code, again = summary(capsys, service, ids)
    assert code == 0
    assert again["fetched"] == 0 and again["skipped_fresh"] == 6 and again["not_found"] == 2
    assert again["processed"] == again["total"] == 8
    assert sim.calls == 8  # resuming costs nothing for what is already warm


def test_stale_entries_count_as_skipped_and_the_service_refreshes_them(make_service, sim, clock, tmp_path, capsys):
    service = make_service(clock=clock, CACHE_TTL_SECONDS=60)
    ids = write(tmp_path, "ids.txt", "user-1\nuser-2\n")
    summary(capsys, service, ids)
    clock.advance(61)
    code, result = summary(capsys, service, ids)
    assert code == 0
    assert (result["skipped_fresh"], result["stale"], result["fetched"]) == (2, 2, 0)
    deadline = time.monotonic() + 5
    while sim.calls < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.calls == 4  # one background refresh each


def test_csv_column_with_header(service, sim, tmp_path, capsys):
    text = 'email,external_id,plan\n"a@x.io, Inc",user-7,gold\nb@x.io,unknown-9,\nc@x.io,user-7,free\nd@x.io\n'
    code, result = summary(capsys, service, write(tmp_path, "export.csv", text), "--column", "external_id")
    assert code == 0
    assert (result["fetched"], result["not_found"], result["total"]) == (1, 1, 2)
    assert sorted(dict(r.params).get("user_id") for r in sim.requests) == ["unknown-9", "user-7"]


def test_csv_without_column_reads_the_first_column(service, sim, tmp_path, capsys):
    code, result = summary(capsys, service, write(tmp_path, "ids.csv", "user-1,a\nuser-2,b\n"))
    assert code == 0 and result["fetched"] == 2


def test_csv_missing_column_is_a_usage_error(service, sim, tmp_path, capsys):
    code, _, err = warm(capsys, service, write(tmp_path, "x.csv", "id,plan\nuser-1,a\n"), "--column", "user_id")
    assert code == 2
    assert "column 'user_id' is not in the header row (id, plan)" in err
    assert sim.calls == 0


@pytest.mark.parametrize("source", [[], ["-"]])
def test_ids_from_stdin(service, sim, monkeypatch, capsys, source):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"user-1\nuser-2\nunknown-3\n")))
    code, result = summary(capsys, service, *source)
    assert code == 0
    assert (result["fetched"], result["not_found"]) == (2, 1)


def test_devices_and_ids_that_need_escaping(service, sim, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("dev/1 ?#%é\n".encode())))
    code, result = summary(capsys, service, "--devices")
    assert code == 0 and result["fetched"] == 1
    assert dict(sim.requests[0].params)["device_id"] == "dev/1 ?#%é"


def test_invalid_ids_fail_without_reaching_anyone(service, sim, tmp_path, capsys):
    ids = write(tmp_path, "ids.txt", "user-1\nbad\x01id\n..\nrtl\u202eid\nuser-2\n")
    code, out, err = warm(capsys, service, ids)
    assert code == 1
    assert out.startswith("fetched 2, not found 0, failed 3, skipped as fresh 0 (5 ids in ")
    assert "invalid_id 3" in err
    assert sim.calls == 2


def test_upstream_failure_is_retried_then_counted_as_failed(service, sim, tmp_path, capsys):
    sim.set_fault("status", count=1, status=500)
    code, result = summary(capsys, service, write(tmp_path, "ids.txt", "user-1\n"), "--retries", "0")
    assert code == 1
    assert result["failed"] == 1 and result["failures"] == {"upstream_unavailable": 1}


def test_budget_limited_service_pauses_the_warm_up_and_amplitude_sees_no_more(make_service, sim, tmp_path, capsys):
    sim.rate_limit_per_minute = 60  # Amplitude itself would answer 429 past the limit
    service = make_service(UPSTREAM_RATE_LIMIT_PER_MINUTE=60, BUDGET_MAX_WAIT_SECONDS=0)
    ids = write(tmp_path, "ids.txt", "\n".join(KNOWN[:4]))
    started = time.monotonic()
    code, result = summary(capsys, service, ids)
    assert code == 0, result
    assert result["fetched"] == 4
    assert sim.calls == 4
    assert sim.count_by_status().get(429, 0) == 0
    # The budget starts empty and refills at ~1/s: the service answered 503 + Retry-After and we waited.
    turned_away = re.search(r'proxy_budget_turned_away_total\{class="live"\} (\d+)', service.get("/metrics").text)
    assert turned_away and int(turned_away.group(1)) > 0
    assert time.monotonic() - started > 3


def test_wrong_key_stops_at_once_without_echoing_it(service, sim, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROXY_API_KEY", "wrong-key-5f1d2c")
    code, out, err = warm(capsys, service, write(tmp_path, "ids.txt", "\n".join(KNOWN)))
    assert code == 2
    assert "wants a valid caller key (401)" in err
    assert "wrong-key-5f1d2c" not in out + err
    assert sim.calls == 0


def test_missing_key_and_key_on_the_command_line_are_refused(service, sim, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROXY_API_KEY")
    ids = write(tmp_path, "ids.txt", "user-1\n")
    code, _, err = warm(capsys, service, ids)
    assert code == 2 and "(401)" in err and "PROXY_API_KEY" in err
    code, out, err = warm(capsys, service, ids, "--key", "secret-on-cli-99")
    assert code == 2 and "--key is not accepted" in err
    assert "secret-on-cli-99" not in out + err
    code, out, err = warm(capsys, service, ids, "--key=secret-on-cli-99")
    assert code == 2 and "secret-on-cli-99" not in out + err
    assert sim.calls == 0


def test_key_file(service, sim, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROXY_API_KEY")
    key_file = write(tmp_path, "key", BRAZE_KEY + "\n")
    code, result = summary(capsys, service, write(tmp_path, "ids.txt", "user-1\n"), "--key-file", key_file)
    assert code == 0 and result["fetched"] == 1


def test_connection_refused_stops_with_a_clear_message(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = main([write(tmp_path, "ids.txt", "user-1\nuser-2\n"), "--url", url, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2
    assert f"cannot connect to {url}" in err
    assert BRAZE_KEY not in out + err


def run_cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PROXY_API_KEY": BRAZE_KEY}
    env.pop("PROXY_URL", None)
    command = [sys.executable, "-m", "app", "warm", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)  # fmt: skip


def test_command_line_reads_stdin_and_prints_json(service, sim):
    process = run_cli("--url", service.url, "--json", stdin=subprocess.PIPE)
    out, err = process.communicate("user-1\nuser-2\nunknown-1\n", timeout=30)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert (result["fetched"], result["not_found"], result["total"]) == (2, 1, 3)
    assert BRAZE_KEY not in out + err


def _at_a_terminal() -> None:
    # Ctrl-C at a terminal: a shell without job control starts background commands with
    # SIGINT ignored, and a test run may be one of them; the child must not inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_cleanly_with_the_summary_so_far(service, sim, tmp_path, signum):
    sim.latency_ms = 150
    ids = write(tmp_path, "ids.txt", "\n".join(f"user-{n}" for n in range(300)))
    process = run_cli(ids, "--url", service.url, "--concurrency", "2", preexec_fn=_at_a_terminal)
    try:
        deadline = time.monotonic() + 20
        while sim.calls < 4 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signum)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "of 300 ids in" in out and "interrupted" in out
    assert "Traceback" not in err
    fetched = int(out.split()[1].rstrip(","))
    assert 0 < fetched < 300
    assert fetched <= sim.calls <= fetched + 2  # in-flight requests finished and were counted
