"""The benchmark harness still works: its quickest first-answers run and stampede round, end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_NGINX = shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
@pytest.mark.skipif(not HAS_NGINX, reason="nginx is not installed (make system-deps)")
def test_quick_first_answers_and_stampede_run_and_report(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"
    argv = [
        sys.executable, "-m", "bench", "--quick", "--only", "first,stampede", "--worker-classes", "gevent",
        "--runs", "1", "--duration", "1", "--users", "60", "--connections", "16", "--repeat-connections", "16",
        "--stampede-hit-connections", "16", "--stampede-miss-connections", "16", "--stampede-pause", "1",
        "--stampede-latency-ms", "50", "--out-dir", str(tmp_path), "--json", str(results_file),
    ]  # fmt: skip
    completed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads(results_file.read_text())
    assert results["errors"] == {}
    first = results["scenarios"]["first"]["classes"]["gevent"]
    # Every first answer came from the cache: the users were warmed, and no run called upstream...
    assert first["upstream_calls_during_load"] == 0
    # ...and the service and the bare app ran under the same gunicorn settings, both answering.
    for target in ("service", "bare"):
        row = first["first"]["16"]["summary"][target]
        assert row["requests"] > 0 and row["rps"] > 0
        assert row["errors"] == 0 and row["non_2xx"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert first["repeat"]["summary"][target]["requests"] > 0
    assert first["first"]["16"]["ratios"]["rps"] > 0
    assert first["service_worker_rss"]["after_first_answers"]

    stampede = results["scenarios"]["stampede"]["classes"]["gevent"]
    # One round: a burst of 16 hits alone, then 16 other hits and 16 misses at once, every request accounted for...
    for side in ("baseline", "hits", "misses"):
        row = stampede[side]
        assert row["requests"] == 16
        assert sum(row["by_status"].values()) + row["timeouts"] + row["socket_errors"] == 16
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    # ...and the simulator's count per burst: at most one call per cold user, none for the cached users.
    assert len(stampede["upstream_calls_per_burst"]) == 1
    assert 0 < stampede["upstream_calls_per_burst"][0] <= 16
    assert stampede["baseline_upstream_calls"] == 0

    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "## First answers" in markdown and "## Stampede" in markdown and "## Worker classes" in markdown
    assert "| Stampede: upstream calls per burst (cold users in it) |" in markdown
    service_rows = [line for line in markdown.splitlines() if "| service | 16 |" in line]
    assert service_rows, markdown
    requests_per_second = float(service_rows[0].split("|")[4].split("(")[0].replace(",", ""))
    assert requests_per_second > 0
