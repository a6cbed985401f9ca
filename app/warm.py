"""Warm the cache before a Braze send: fetch each user's whole profile through the running service.

``python -m app warm [FILE]`` asks the service for ``/v1/users/{id}`` once per id, never Amplitude
directly: warming spends the same upstream budget as live traffic (so warming and sending together
stay within Amplitude's limit), stores profiles where the service reads them (its cache, Redis when
configured), and needs no Amplitude key. No local state file is kept because none is needed: to
resume after an interruption, run the same command again; ids still fresh cost no Amplitude call.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import NewConnectionError

from app.errors import InvalidRequest
from app.http.params import check_text

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = (3.0, 15.0)  # the service answers within 1.5 s: this only catches a hung connection
# Retry-After is honoured up to MAX_PAUSE_SECONDS; longer would stall the run for no gain.
MAX_PAUSE_SECONDS, DEFAULT_PAUSE = 60.0, 1.0
# "rate_limited" means "wait your turn", not "this id is broken", so it does not use up
# --retries; these two bounds keep the waiting finite when the budget never comes back.
RATE_LIMITED_RETRIES, STALL_SECONDS = 100, 300.0
# A Retry-After this short means a slot within a second: the budget is full, not spent. The
# worker that was turned away waits alone and the others go on: a pause of every worker left
# a second's worth of slots unused each time (2-3 % of the limit under a steady warm-up).
OWN_PAUSE_SECONDS = 1.0
FETCHED, FRESH, STALE, NOT_FOUND, FAILED = "fetched", "fresh", "stale", "not_found", "failed"
# Answers that would be the same for every id: stop rather than fail each one.
REFUSALS = {
    401: "the service wants a valid caller key (401): set PROXY_API_KEY or --key-file to one of its keys",
    403: "the service refuses this address (403 forbidden): it is outside ALLOWED_CIDRS",
    404: "the service answered 404 for a profile route: is --url the profile service?",
    429: "the service is braking failed authentications from this address (429): fix the key, retry later",
    502: "Amplitude rejects the service's own AMPLITUDE_SECRET_KEY or URL (502 upstream_misconfigured)",
}


class Fatal(Exception):
    """A usage error, or a refusal that would repeat for every id (bad key, wrong URL): exit *code*."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Summary:
    """What a run did, for the final line or ``--json``."""

    total: int
    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: bool = False
    stopped: str | None = None

    def record(self, outcome: tuple[str, str]) -> None:
        self.counts[outcome[0]] += 1
        self.reasons.update([outcome[1]] if outcome[0] == FAILED else [])

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        return {"fetched": c[FETCHED], "not_found": c[NOT_FOUND], "failed": c[FAILED],
                "skipped_fresh": c[FRESH] + c[STALE], "stale": c[STALE], "processed": sum(c.values()),
                "total": self.total, "seconds": round(self.seconds, 1),
                "interrupted": self.interrupted, "stopped": self.stopped, "failures": dict(self.reasons)}  # fmt: skip

    def line(self) -> str:
        d = self.as_dict()
        counts = f"fetched {d['fetched']}, not found {d['not_found']}, failed {d['failed']}"
        stale = f" ({d['stale']} stale: the service refreshes those in the background)" if d["stale"] else ""
        scope = f"{d['total']} ids" if d["processed"] == d["total"] else f"{d['processed']} of {d['total']} ids"
        scope += f" in {self.seconds:.1f} s" + (", interrupted" if self.interrupted else "")
        return f"{counts}, skipped as fresh {d['skipped_fresh']}{stale} ({scope})"


def read_ids(source: str | None, column: str | None) -> list[str]:
    """Distinct ids (stripped, blank lines skipped) in input order."""
    try:
        raw = sys.stdin.buffer.read() if source in (None, "-") else Path(str(source)).read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise Fatal(f"cannot read {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise Fatal(f"{source or 'stdin'} is not UTF-8 (byte {exc.start})") from None
    # Not splitlines(): it also splits on separators (\x1c, \x85...) that may sit inside an id.
    values = text.split("\n")
    if column is not None or (source or "").lower().endswith(".csv"):
        rows = csv.reader(values)
        try:
            header = [name.strip() for name in next(rows, [])] if column is not None else []
            if column is not None and column not in header:
                raise Fatal(f"column {column!r} is not in the header row ({', '.join(header[:20])})")
            index = header.index(column) if column is not None else 0
            values = [row[index] for row in rows if len(row) > index]
        except csv.Error as exc:
            raise Fatal(f"the CSV is malformed at line {rows.line_num}: {exc}") from None
    return list(dict.fromkeys(value.strip() for value in values if value.strip()))


class Warmer:
    """Worker threads that ask the service for each id, all pausing together on a 503."""

    def __init__(self, base: str, kind: str, key: str | None, concurrency: int, retries: int) -> None:
        self.base, self.kind, self.key, self.retries, self.concurrency = base, kind, key, retries, concurrency
        self.session = requests.Session()
        self.session.mount(base, HTTPAdapter(pool_connections=1, pool_maxsize=concurrency))
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.fatal: Fatal | None = None
        self._lock, self._pause_until, self._last_progress = threading.Lock(), 0.0, time.monotonic()

    def work(self) -> None:
        """Take ids until none are left or the run stops."""
        while not self.stop.is_set():
            try:
                outcome = self.warm_one(self.todo.get_nowait())
            except queue.Empty:
                return
            except Fatal as exc:
                self.fatal = self.fatal or exc  # two workers racing here only pick which refusal is shown
                self.stop.set()
                return
            except Exception as exc:  # noqa: BLE001 - one odd id must not silently end a worker
                outcome = (FAILED, type(exc).__name__)
            if outcome is not None:
                self.results.put(outcome)

    def warm_one(self, user_id: str) -> tuple[str, str] | None:
        """Fetch one profile through the service; None when the run stopped first."""
        try:
            check_text("id", user_id)  # the service's own rule: it would answer 400
        except InvalidRequest:
            return FAILED, "invalid_id"
        url = f"{self.base}/v1/{self.kind}/{quote(user_id, safe='')}"
        failures = throttled = 0
        while failures <= self.retries and throttled <= RATE_LIMITED_RETRIES:
            if not self._wait_for_pause():
                return None
            status, error, retry_after = self._get(url)
            if status not in (None, 503):
                self._last_progress = time.monotonic()
            if status == 200:
                return {"HIT": FRESH, "STALE": STALE}.get(error, FETCHED), ""
            if status == 404 and error == "user_not_found":
                return NOT_FOUND, ""
            if status in REFUSALS:
                raise Fatal(REFUSALS[status])
            if status not in (None, 503):
                return FAILED, "invalid_id" if status == 400 else f"http_{status}"
            throttled += error == "rate_limited"
            failures += error != "rate_limited"
            if failures > self.retries:
                return FAILED, error
            if error == "rate_limited" and retry_after <= OWN_PAUSE_SECONDS:
                if self.stop.wait(retry_after):
                    return None
                continue
            with self._lock:  # every worker waits, not only this one: do not hammer a spent budget
                self._pause_until = max(self._pause_until, time.monotonic() + min(retry_after, MAX_PAUSE_SECONDS))
        return FAILED, "rate_limited"

    def _get(self, url: str) -> tuple[int | None, str, float]:
        """(status, error code or X-Cache, Retry-After); status None for a retryable network failure."""
        try:
            with self.session.get(url, timeout=TIMEOUT, allow_redirects=False) as response:
                if response.status_code == 200:
                    return 200, response.headers.get("X-Cache", "MISS").upper(), 0.0
                error = "unavailable"
                with contextlib.suppress(ValueError, AttributeError):
                    error = str(response.json().get("error") or error)
                retry_after = response.headers.get("Retry-After", "")  # this service sends whole seconds
                return response.status_code, error, float(retry_after) if retry_after.isdigit() else DEFAULT_PAUSE
        except requests.ConnectionError as exc:
            # Refused or unknown host: every id would fail the same way. A reset mid-way is retried.
            if isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), NewConnectionError):
                origin = urlsplit(self.base)
                raise Fatal(f"cannot connect to {origin.scheme}://{origin.netloc} (set --url or PROXY_URL)") from None
            return None, "connection_failed", DEFAULT_PAUSE
        except requests.Timeout:
            return None, "timeout", DEFAULT_PAUSE

    def _wait_for_pause(self) -> bool:
        """Sleep through the shared pause; False when the run stopped meanwhile."""
        while (remaining := self._pause_until - time.monotonic()) > 0 and not self.stop.is_set():
            if time.monotonic() - self._last_progress > STALL_SECONDS:
                raise Fatal(f"only 503s for {STALL_SECONDS:.0f} s: the service's budget stays spent", 1)
            self.stop.wait(min(remaining, 0.25))
        return not self.stop.is_set()


def service_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    """The service's base URL and the caller key (``PROXY_API_KEY`` or ``--key-file``, never an
    option), from the options and the environment; shared with ``python -m app preview``."""
    url = (args.url or os.environ.get("PROXY_URL") or DEFAULT_URL).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
        raise Fatal("--url must be an http(s) URL without credentials or query, e.g. http://127.0.0.1:8000")
    if args.key is not None:
        raise Fatal("--key is not accepted (ps and shell history would show it): use PROXY_API_KEY or --key-file")
    key: str | None = os.environ.get("PROXY_API_KEY", "").strip() or None
    if args.key_file:
        try:
            key = Path(args.key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Fatal(f"cannot read the key file {args.key_file}: {type(exc).__name__}") from None
    if args.key_file and not key or key is not None and not (key.isascii() and key.isprintable()):
        raise Fatal("the caller key must be non-empty printable ASCII")
    return url.rstrip("/"), key


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: "--key SECRET" must not pass for "--key-file SECRET" (and echo it in an error).
    about = "Fetch each id's whole profile through the running service, so a Braze send finds it cached."
    parser = argparse.ArgumentParser(prog="python -m app warm", description=about, allow_abbrev=False)
    parser.add_argument("file", nargs="?", help="ids, one per line, or a CSV; '-' or absent: stdin")
    parser.add_argument("--column", help="CSV column holding the ids (the first row is then the header)")
    parser.add_argument("--devices", action="store_true", help="the ids are Amplitude device ids")
    parser.add_argument("--url", help=f"the service (default: $PROXY_URL or {DEFAULT_URL})")
    parser.add_argument("--key-file", help="file holding the caller key (default: $PROXY_API_KEY)")
    parser.add_argument("--key", help=argparse.SUPPRESS)  # only to refuse it without echoing the value
    parser.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    parser.add_argument("--retries", type=int, default=3, help="retries per id when lookups fail (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--json", action="store_true", help="print the summary as a JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``warm``; return the exit code: 0 all done, 1 some failed, 2 usage or config, 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        base, key = service_settings(args)
        if not 1 <= args.concurrency <= 64 or not 0 <= args.retries <= 20:
            raise Fatal("--concurrency must be 1 to 64 and --retries 0 to 20")
        ids = read_ids(args.file, args.column)
    except Fatal as exc:
        print(f"warm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    summary = Summary(total=len(ids))
    _stop_on_sigterm()
    warmer = Warmer(base, "devices" if args.devices else "users", key, args.concurrency, args.retries)
    try:
        _run(warmer, ids, summary, progress=not args.no_progress)
    finally:
        warmer.session.close()
    if warmer.fatal is not None:
        summary.stopped = str(warmer.fatal)
        print(f"warm: {warmer.fatal}", file=sys.stderr)
    if summary.reasons:
        print("warm: failures: " + ", ".join(f"{r} {n}" for r, n in summary.reasons.most_common()), file=sys.stderr)
    print(json.dumps(summary.as_dict()) if args.json else summary.line(), flush=True)
    code = warmer.fatal.code if warmer.fatal is not None else int(summary.counts[FAILED] > 0)
    return 130 if summary.interrupted else code


def _stop_on_sigterm() -> None:
    """SIGTERM (a job or container being stopped, a CI timeout) stops a run as Ctrl-C does:
    requests in flight finish, and the summary of what was done is printed."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _run(warmer: Warmer, ids: list[str], summary: Summary, progress: bool) -> None:
    """Start the workers and count their results; Ctrl-C stops them and keeps what is done."""
    for user_id in ids:
        warmer.todo.put(user_id)
    started = time.monotonic()
    # disable=None: tqdm draws only when stderr is a terminal.
    bar = tqdm(total=len(ids), unit="id", desc="warming", file=sys.stderr, disable=None if progress else True)
    workers = [threading.Thread(target=warmer.work, name=f"warm-{n}", daemon=True) for n in range(warmer.concurrency)]
    try:
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers) or not warmer.results.empty():  # all counted
            with contextlib.suppress(queue.Empty):
                summary.record(warmer.results.get(timeout=0.2))
                bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
        warmer.stop.set()
        with contextlib.suppress(KeyboardInterrupt):  # requests in flight finish within TIMEOUT
            for worker in (worker for worker in workers if worker.is_alive()):
                worker.join(timeout=sum(TIMEOUT))
        while not warmer.results.empty():
            summary.record(warmer.results.get_nowait())
    finally:
        summary.seconds = time.monotonic() - started
        bar.close()
