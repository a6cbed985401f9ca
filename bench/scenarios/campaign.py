"""A Braze campaign: Connected Content calls for N recipients, through the service and direct.

Each message renders K Connected Content tags (default 3: a recommendation with
``default=``, one property, one cohort check), each appearing in the subject and the
body. The sender behaves like Braze:

- per-URL cache: identical URLs in one message are fetched once (subject and body share
  their three URLs, so a message makes K calls, not 2K);
- concurrency: a pool of threads, each with a keep-alive connection pool, rendering
  recipients in parallel (``--campaign-concurrency``), tags of one message in order;
- a 2 s timeout per call; a slower answer counts as a failure, as in Braze.

The simulator enforces 600 requests/min and the service runs with
``UPSTREAM_RATE_LIMIT_PER_MINUTE=600``, in its default configuration (gunicorn.conf.py's
worker class and workers, production settings) behind its front. At 600/min a 20,000-recipient send of cold
users takes over half an hour, so the run is *scaled* (nothing is pre-warmed):

- ``paced``: the operator sets Braze's delivery rate limit (``--campaign-rate``, 500
  messages/min as the README advises under a 600/min budget). Recipients are drawn from
  the population in order at that rate for ``--campaign-seconds``; the figures per
  recipient are those of the whole send, which would just take longer
  (N / rate minutes).
- ``blast``: no delivery rate limit: Braze sends as fast as the pool allows, for the
  same time budget (bounded by N recipients).

Each mode runs twice with the same recipients and time budget: through the service
(``service``), and with templates that call the simulator directly (``direct``: every tag
is its own Amplitude call with the secret key in the template, what a user does
without this service). Every send starts from a fresh service (empty cache, budget
starting empty) and a simulator whose call log and 60-second window are reset.

Outcomes per recipient (mutually exclusive):

- ``retried``: at least one tag answered non-2XX other than 404, or timed out or failed
  to connect; Braze renders it empty and, with ``:retry``, re-queues the message;
- ``fallback``: no such failure, but at least one tag carried fallback content (a
  recommendation with ``"fallback": true``, a 404, an unknown user, a user without
  recommendations) that the template's default content replaces;
- ``personalised``: every tag answered with the user's own data.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from bench.common import (
    CALLER_AUTH,
    SIM_AUTH,
    Server,
    log,
    percentile,
    service_env,
    start_server,
    start_simulator,
)
from bench.options import Options

BRAZE_TIMEOUT = 2.0
FIELDS = ("subject", "body")
UPSTREAM_LIMIT = 600
DEFAULT_ITEMS = "sku-1,sku-2,sku-3"


@dataclass(frozen=True)
class Tag:
    name: str
    service_path: str  # {u}: the url_param_escape'd user id
    direct_query: str
    has_default: bool = False


#: The message's tags, in template order; K picks the first K.
TAGS = (
    Tag(
        "recommendation",
        "/v1/users/{u}/recommendations/rec_home?limit=3&default=" + DEFAULT_ITEMS,
        "/v1/userprofile?user_id={u}&get_recs=true&rec_id=rec_home",
        has_default=True,
    ),
    Tag("property", "/v1/users/{u}/properties/first_name", "/v1/userprofile?user_id={u}&get_amp_props=true"),
    Tag("cohort", "/v1/users/{u}/cohorts/cohort_vip", "/v1/userprofile?user_id={u}&get_cohort_ids=true"),
    Tag(
        "prediction",
        "/v1/users/{u}/predictions/pred_churn",
        "/v1/userprofile?user_id={u}&get_propensity=true&prediction_id=pred_churn&propensity_type=score",
    ),
    Tag(
        "properties",
        "/v1/users/{u}/properties?keys=plan,city",
        "/v1/userprofile?user_id={u}&get_amp_props=true&get_computations=true",
    ),
)


def population(count: int, seed: int = 20_000) -> list[str]:
    """Recipient ids: mostly known users, with some Amplitude has not seen (2 %), some too
    new for recommendations (1 %) and some in every recommendation's control group (1 %)."""
    rng = random.Random(seed)
    ids = []
    for n in range(count):
        draw = rng.random()
        prefix = "unknown" if draw < 0.02 else "new" if draw < 0.03 else "control" if draw < 0.04 else "user"
        ids.append(f"{prefix}-cmp-{n}")
    return ids


@dataclass
class Call:
    tag: str
    status: int | None  # None: timeout or connection failure
    seconds: float
    outcome: str  # personalised, fallback, retried
    x_cache: str | None = None


@dataclass
class SendResult:
    target: str
    mode: str
    recipients: int = 0
    calls: list[Call] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def classify_service(tag: Tag, status: int, body: Any) -> str:
    if status == 200:
        if tag.name == "recommendation" and isinstance(body, dict) and body.get("fallback"):
            return "fallback"
        return "personalised"
    if status == 404:
        return "fallback"  # Braze renders it empty and goes on: the template's default shows
    return "retried"


def classify_direct(tag: Tag, status: int, body: Any) -> str:
    if status != 200:
        return "fallback" if status == 404 else "retried"
    data = body.get("userData") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return "fallback"  # the unknown-user error: nothing to personalise with
    wanted = {
        "recommendation": "recommendations",
        "property": "amp_props",
        "cohort": "cohort_ids",
        "prediction": "propensities",
        "properties": "amp_props",
    }[tag.name]
    # An empty cohort list is an answer ("not a member"); a null is not.
    return "personalised" if data.get(wanted) is not None else "fallback"


def send(base_url: str, target: str, mode: str, recipients: list[str], opts: Options) -> SendResult:
    """Render messages for *recipients* until the time budget ends; return every call."""
    tags = TAGS[: max(1, min(opts.campaign_tags, len(TAGS)))]
    paced = mode == "paced"
    interval = 60.0 / opts.campaign_rate_per_minute if paced else 0.0
    auth = CALLER_AUTH if target == "service" else SIM_AUTH
    classify = classify_service if target == "service" else classify_direct
    result = SendResult(target, mode)
    lock = threading.Lock()
    next_index = [0]
    started = time.monotonic()
    stop_at = started + opts.campaign_seconds

    def render(session: requests.Session, user: str) -> tuple[list[Call], str]:
        escaped = quote(user, safe="")
        fetched: dict[str, Call] = {}  # Braze's per-URL cache for this message
        for _field in FIELDS:
            for tag in tags:
                path = (tag.service_path if target == "service" else tag.direct_query).format(u=escaped)
                if path in fetched:
                    continue
                call_started = time.monotonic()
                status: int | None = None
                body: Any = None
                x_cache = None
                try:
                    response = session.get(base_url + path, timeout=(BRAZE_TIMEOUT, BRAZE_TIMEOUT))
                    status = response.status_code
                    x_cache = response.headers.get("X-Cache")
                    try:
                        body = response.json()
                    except ValueError:
                        body = None
                except requests.RequestException:
                    status = None
                elapsed = time.monotonic() - call_started
                if status is None or elapsed > BRAZE_TIMEOUT:
                    outcome, status = "retried", None
                else:
                    outcome = classify(tag, status, body)
                fetched[path] = Call(tag.name, status, elapsed, outcome, x_cache)
        calls = list(fetched.values())
        outcomes = {call.outcome for call in calls}
        verdict = "retried" if "retried" in outcomes else "fallback" if "fallback" in outcomes else "personalised"
        return calls, verdict

    def worker() -> None:
        session = requests.Session()
        session.trust_env = False
        session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=4, max_retries=0))
        session.headers.update({"Authorization": auth, "User-Agent": "Braze Sender bench", "Accept": "*/*"})
        mine: list[Call] = []
        verdicts: Counter[str] = Counter()
        try:
            while True:
                with lock:
                    index = next_index[0]
                    next_index[0] += 1
                if index >= len(recipients):
                    break
                if paced:
                    due = started + index * interval
                    if due >= stop_at:
                        break
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                elif time.monotonic() >= stop_at:
                    break
                calls, verdict = render(session, recipients[index])
                mine += calls
                verdicts[verdict] += 1
        finally:
            session.close()
            with lock:
                result.calls += mine
                result.outcomes.update(verdicts)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(opts.campaign_concurrency)]
    for thread in threads:
        thread.start()
    # Bounded: the budget plus the slowest possible message (K calls of 2 s each).
    join_deadline = stop_at + BRAZE_TIMEOUT * len(tags) + 10
    for thread in threads:
        thread.join(timeout=max(0.1, join_deadline - time.monotonic()))
    result.seconds = time.monotonic() - started
    result.recipients = sum(result.outcomes.values())
    return result


def summarise(sent: SendResult, sim_stats: dict[str, Any], calls_before: int) -> dict[str, Any]:
    latencies = [call.seconds * 1000 for call in sent.calls]
    upstream_calls = int(sim_stats["calls"]) - calls_before
    by_status = {str(k): int(v) for k, v in sim_stats["by_status"].items()}
    rec_calls = [call for call in sent.calls if call.tag == "recommendation"]
    statuses = Counter("timeout" if call.status is None else str(call.status) for call in sent.calls)
    recipients = sent.recipients or 1
    return {
        "target": sent.target,
        "mode": sent.mode,
        "recipients": sent.recipients,
        "seconds": sent.seconds,
        "calls": len(sent.calls),
        "calls_per_recipient": len(sent.calls) / recipients,
        "upstream_calls": upstream_calls,
        "upstream_calls_per_recipient": upstream_calls / recipients,
        "upstream_429": by_status.get("429", 0),
        "upstream_by_status": by_status,
        "upstream_max_in_60s": int(sim_stats["max_in_60s"]),
        # How much of the limit the busiest minute used: the service should use it all, never more.
        "limit_utilization": int(sim_stats["max_in_60s"]) / UPSTREAM_LIMIT,
        "personalised": sent.outcomes["personalised"],
        "fallback": sent.outcomes["fallback"],
        "retried": sent.outcomes["retried"],
        "rec_renders": len(rec_calls),
        "rec_empty": sum(1 for call in rec_calls if call.outcome == "retried"),
        "statuses": dict(statuses),
        "x_cache": dict(Counter(call.x_cache for call in sent.calls if call.x_cache)),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else float("nan"),
    }


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    recipients = population(opts.campaign_recipients)
    sim = start_simulator(rate_limit=UPSTREAM_LIMIT, latency_ms=opts.campaign_latency_ms)
    sends: list[dict[str, Any]] = []
    shape = "?"
    try:
        for mode in opts.campaign_modes:
            for target in ("service", "direct"):
                server: Server | None = None
                try:
                    if target == "service":
                        env = service_env(sim, UPSTREAM_LIMIT, workers=opts.workers, extra=opts.service_env)
                        server = start_server("service-campaign", env)
                        shape = server.config.shape
                    # A fresh 60-second window and call log for every send.
                    sim.reset()
                    sim.configure(rate_limit_per_minute=UPSTREAM_LIMIT, latency_ms=opts.campaign_latency_ms)
                    calls_before = sim.calls()
                    base_url = server.url if server is not None else sim.url
                    sent = send(base_url, target, mode, recipients, opts)
                    row = summarise(sent, sim.stats(), calls_before)
                finally:
                    if server is not None:
                        server.stop()
                sends.append(row)
                log(
                    f"campaign: {mode:<5} {target:<7} {row['recipients']:6d} recipients in {row['seconds']:5.1f} s: "
                    f"{row['upstream_calls_per_recipient']:.2f} upstream calls/recipient, "
                    f"{100 * row['limit_utilization']:.0f}% of the limit in the busiest minute, "
                    f"personalised {row['personalised']}, fallback {row['fallback']}, retried {row['retried']}, "
                    f"429s {row['upstream_429']}, p99 {row['p99_ms']:.0f} ms"
                )
    finally:
        sim.proc.stop()
    tags = TAGS[: max(1, min(opts.campaign_tags, len(TAGS)))]
    return {
        "shape": shape,
        "population": len(recipients),
        "tags": [tag.name for tag in tags],
        "tag_paths": {tag.name: tag.service_path for tag in tags},
        "fields": list(FIELDS),
        "rate_per_minute": opts.campaign_rate_per_minute,
        "time_budget_s": opts.campaign_seconds,
        "concurrency": opts.campaign_concurrency,
        "latency_ms": opts.campaign_latency_ms,
        "upstream_limit": UPSTREAM_LIMIT,
        "full_send_minutes": len(recipients) / opts.campaign_rate_per_minute,
        "sends": sends,
        "seconds": time.monotonic() - started,
    }
