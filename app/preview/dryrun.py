"""``preview --users FILE``: render a message for every recipient, as a send would, and summarise it."""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import requests

from app.preview.calls import BrazeUrlCache, Credentials, Session
from app.preview.cli import Fatal, load_recipient
from app.preview.render import Previewer
from app.preview.results import Preview
from app.preview.transport import HttpTransport
from app.warm import read_ids

_UPSTREAM_SAMPLE = re.compile(r"^proxy_upstream_calls_total(?:\{[^}]*\})?\s+([0-9.e+]+)\s*$", re.MULTILINE)


def upstream_calls_counted(transport: HttpTransport, key: str | None) -> float | None:
    """The service's ``proxy_upstream_calls_total`` (all outcomes), or None when /metrics is not ours to read."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = transport.session.get(transport.base_url + "/metrics", headers=headers, timeout=(3, 10))
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    return sum(float(value) for value in _UPSTREAM_SAMPLE.findall(response.text))


@dataclass
class Summary:
    """What a dry run saw, recipient by recipient."""

    recipients: int
    rendered: int = 0
    aborted: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    empty_connected_content: int = 0  # recipients with at least one call that rendered nothing
    empty_by_reason: Counter[str] = field(default_factory=Counter)  # why (the service's error code) -> recipients
    fallbacks_used: int = 0  # recipients served the URL's default= items
    control_group: int = 0  # recipients in a recommendation's control group
    braze_calls: int = 0  # requests Braze would make (identical URLs once, its URL cache honoured)
    warnings: Counter[str] = field(default_factory=Counter)  # code -> recipients
    upstream_calls: float | None = None
    seconds: float = 0.0
    interrupted: bool = False

    def record(self, preview: Preview) -> None:
        self.rendered += preview.rendered is not None
        if preview.aborted is not None:
            self.aborted[preview.aborted] += 1
        self.errors += preview.rendered is None and preview.aborted is None
        self.empty_connected_content += any(call.empty for call in preview.calls)
        self.empty_by_reason.update(
            {
                call.error or (f"http_{call.status}" if call.status else "no_answer")
                for call in preview.calls
                if call.empty
            }
        )
        self.fallbacks_used += any(call.fallback for call in preview.calls)
        self.control_group += preview.control
        self.braze_calls += sum(call.fetched for call in preview.calls)
        self.warnings.update({warning.code for warning in preview.warnings})

    def as_json(self) -> dict[str, Any]:
        processed = self.rendered + sum(self.aborted.values()) + self.errors
        return {
            "recipients": self.recipients,
            "processed": processed,
            "rendered": self.rendered,
            "aborted": sum(self.aborted.values()),
            "aborted_by_reason": dict(self.aborted),
            "errors": self.errors,
            "empty_connected_content": self.empty_connected_content,
            "empty_by_reason": dict(self.empty_by_reason),
            "fallbacks_used": self.fallbacks_used,
            "control_group": self.control_group,
            "braze_calls": self.braze_calls,
            "braze_calls_per_recipient": round(self.braze_calls / processed, 2) if processed else 0.0,
            "upstream_calls": None if self.upstream_calls is None else int(self.upstream_calls),
            "warnings": dict(self.warnings),
            "seconds": round(self.seconds, 1),
            "interrupted": self.interrupted,
        }

    def line(self) -> str:
        d = self.as_json()
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.aborted.most_common())
        empty = ", ".join(f"{reason} {n}" for reason, n in self.empty_by_reason.most_common())
        scope = f"{d['recipients']}" if d["processed"] == d["recipients"] else f"{d['processed']} of {d['recipients']}"
        upstream = "unknown (/metrics needs another key)" if d["upstream_calls"] is None else str(d["upstream_calls"])
        return (
            f"dry run over {scope} recipients in {self.seconds:.1f} s"
            + (", interrupted" if self.interrupted else "")
            + f": rendered {d['rendered']}, aborted {d['aborted']}"
            + (f" ({reasons})" if reasons else "")
            + (f", errors {d['errors']}" if d["errors"] else "")
            + f", empty Connected Content {d['empty_connected_content']}"
            + (f" ({empty})" if empty else "")
            + f", fallbacks used {d['fallbacks_used']}"
            + f", control group {d['control_group']}, Braze calls per recipient {d['braze_calls_per_recipient']}"
            + f" ({d['braze_calls']} in all), upstream calls caused {upstream}"
        )


def dry_run(args: argparse.Namespace, previewer: Previewer, transport: HttpTransport, credentials: Credentials) -> int:
    """Render for every id of ``--users``; print per-recipient JSON lines (``--json``) and the summary."""
    from tqdm import tqdm

    ids = read_ids(args.users, args.column)
    if args.sample is not None:
        if args.sample < 1:
            raise Fatal("--sample must be at least 1")
        ids = random.SystemRandom().sample(ids, min(args.sample, len(ids)))
    if not 1 <= args.concurrency <= 32:
        raise Fatal("--concurrency must be 1 to 32")
    template = load_recipient(None, args.attributes)
    if previewer.syntax_error is not None:
        print(f"preview: {previewer.syntax_error}", file=sys.stderr)
        return 2
    print(
        f"dry run: {len(ids)} recipients; their lookups go through the service and spend the Amplitude budget "
        "like live traffic (and warm its cache)",
        file=sys.stderr,
    )
    if not args.json:
        for warning in previewer.lints:
            print(f"warning: {warning}", file=sys.stderr)
    summary = Summary(recipients=len(ids))
    before = upstream_calls_counted(transport, credentials.caller_key)
    braze_cache, output_lock = BrazeUrlCache(), threading.Lock()

    def render(user_id: str) -> Preview:
        session = Session(transport, credentials, allow_external=args.allow_external, braze_cache=braze_cache)
        return previewer.render(replace(template, user_id=user_id), session)

    started = time.monotonic()
    bar = tqdm(
        total=len(ids), unit="recipient", desc="dry run", file=sys.stderr, disable=True if args.no_progress else None
    )
    pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="dry-run")
    todo = iter(ids)
    running: set[Future[Preview]] = set()
    try:
        while True:
            while len(running) < args.concurrency * 2 and (user_id := next(todo, None)) is not None:
                running.add(pool.submit(render, user_id))
            if not running:
                break
            done, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                preview = future.result()
                summary.record(preview)
                bar.update(1)
                if args.json:
                    with output_lock:
                        print(json.dumps(preview.as_json(), ensure_ascii=False), flush=True)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        summary.seconds = time.monotonic() - started
    after = upstream_calls_counted(transport, credentials.caller_key)
    summary.upstream_calls = after - before if before is not None and after is not None else None
    print(json.dumps({"summary": summary.as_json()}) if args.json else summary.line(), flush=True)
    if summary.interrupted:
        return 130
    return 1 if previewer.lints or summary.errors else 0
