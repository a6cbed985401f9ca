"""The benchmark harness still works: its quickest hit-path run, end to end, in a few seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_quick_hit_path_runs_and_reports(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"
    argv = [
        sys.executable, "-m", "bench", "--quick", "--only", "hit", "--hit-targets", "service,bare",
        "--connections", "16", "--runs", "1", "--duration", "1", "--users", "60",
        "--out-dir", str(tmp_path), "--json", str(results_file),
    ]  # fmt: skip
    completed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads(results_file.read_text())
    assert results["errors"] == {}
    hit = results["scenarios"]["hit"]
    # Warming cached every profile with exactly one upstream call each...
    assert hit["warm_statuses"] == {"200 MISS": 60}
    # ...and the measured load was all cache hits, all answered 2XX, none failed.
    assert hit["upstream_calls_during_load"] == 0
    for target in ("service", "bare"):
        row = hit["summary"]["16"][target]
        assert row["requests"] > 0 and row["rps"] > 0
        assert row["errors"] == 0 and row["non_2xx"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert hit["ratios"]["16"]["bare"] > 0

    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "## Hit path" in markdown
    service_rows = [line for line in markdown.splitlines() if line.startswith("| service | 1 x 32 | 16 |")]
    assert service_rows, markdown
    requests_per_second = float(service_rows[0].split("|")[4].replace(",", ""))
    assert requests_per_second > 0
