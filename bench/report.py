"""docs/benchmarks.md and docs/benchmark-latency.png from the scenarios' results."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

RESULTS_MARK = "bench-results"

# The project's targets (README / the benchmark issue).
HIT_64_VS_BARE = 1.0
HIT_64_DEFAULT_VS_BARE_2X16 = 0.9
HIT_64_P99_MS = 25.0
HIT_256_P99_MS = 100.0
MISS_ADDED_P50_MS = 3.0
MEMORY_RATIO = 1.5


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _verdict(ok: bool | None) -> str:
    return "not run" if ok is None else "**pass**" if ok else "**FAIL**"


# -- stored results (so a partial run updates only its sections) -----------------------------


def strip_raw(results: dict[str, Any]) -> dict[str, Any]:
    """Results without per-run raw data, small enough to keep inside the markdown."""
    slim = json.loads(json.dumps(results, default=str))
    for name in ("hit", "miss"):
        if name in slim.get("scenarios", {}):
            slim["scenarios"][name].pop("runs", None)
    return slim


def load_previous(markdown: Path) -> dict[str, Any]:
    try:
        text = markdown.read_text()
    except OSError:
        return {}
    match = re.search(rf"<!-- {RESULTS_MARK}\n(.*?)\n-->", text, re.S)
    if not match:
        return {}
    try:
        return dict(json.loads(match.group(1)))
    except ValueError:
        return {}


def _int_keys(summary: dict[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in summary.items()}


# -- targets ----------------------------------------------------------------------------------


def evaluate(scenarios: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, pass / fail / None when not measured)."""
    rows: list[tuple[str, str, bool | None]] = []
    hit = scenarios.get("hit")
    hit_summary = _int_keys(hit["summary"]) if hit else {}
    hit_ratios = _int_keys(hit["ratios"]) if hit else {}
    at64, at256 = hit_summary.get(64), hit_summary.get(256)
    r64 = hit_ratios.get(64, {})
    rows.append(
        (
            f"Hit path, 64 connections: service >= {HIT_64_VS_BARE} x bare Flask (same gunicorn settings)",
            f"{_f(r64.get('bare'), 2)} x" if "bare" in r64 else "n/a",
            r64["bare"] >= HIT_64_VS_BARE if "bare" in r64 else None,
        )
    )
    rows.append(
        (
            f"Hit path, 64 connections: the default configuration without Redis >= {HIT_64_DEFAULT_VS_BARE_2X16} x "
            "bare Flask under gthread 2 x 16",
            f"{_f(r64.get('default_vs_bare_2x16'), 2)} x" if "default_vs_bare_2x16" in r64 else "n/a",
            r64["default_vs_bare_2x16"] >= HIT_64_DEFAULT_VS_BARE_2X16 if "default_vs_bare_2x16" in r64 else None,
        )
    )
    rows.append(
        (
            f"Hit path, 64 connections: p99 < {HIT_64_P99_MS:.0f} ms",
            f"{_f(at64['service']['p99_ms'])} ms" if at64 else "n/a",
            at64["service"]["p99_ms"] < HIT_64_P99_MS if at64 else None,
        )
    )
    if at256:
        s256 = at256["service"]
        measured = f"{s256['errors']} errors, p99 {_f(s256['p99_ms'])} ms"
        ok: bool | None = s256["errors"] == 0 and s256["p99_ms"] < HIT_256_P99_MS
    else:
        measured, ok = "n/a", None
    rows.append((f"Hit path, 256 connections: no errors and p99 < {HIT_256_P99_MS:.0f} ms", measured, ok))
    miss = scenarios.get("miss")
    if miss:
        for conns, row in sorted(_int_keys(miss["summary"]).items()):
            added = row["added_p50_ms"]
            rows.append(
                (
                    f"Miss path, {conns} connection{'s' if conns > 1 else ''}: median added latency "
                    f"<= {MISS_ADDED_P50_MS:.0f} ms",
                    f"{_f(added, 2)} ms",
                    added <= MISS_ADDED_P50_MS,
                )
            )
    else:
        rows.append((f"Miss path: median added latency <= {MISS_ADDED_P50_MS:.0f} ms", "n/a", None))
    campaign = scenarios.get("campaign")
    service_sends = [s for s in campaign["sends"] if s["target"] == "service"] if campaign else []
    for send in service_sends:
        label = "paced at the delivery rate limit" if send["mode"] == "paced" else "no delivery rate limit"
        rows.append(
            (
                f"Campaign ({label}): upstream calls per recipient <= 1.0",
                _f(send["upstream_calls_per_recipient"], 2),
                send["upstream_calls_per_recipient"] <= 1.0,
            )
        )
        rows.append((f"Campaign ({label}): zero upstream 429s", _f(send["upstream_429"]), send["upstream_429"] == 0))
        rows.append(
            (
                f"Campaign ({label}): zero empty renders where a default is given",
                f"{send['rec_empty']} of {send['rec_renders']}",
                send["rec_empty"] == 0,
            )
        )
    if not service_sends:
        rows.append(("Campaign: calls per recipient <= 1.0, zero 429s, zero empty renders with a default", "n/a", None))
    memory = scenarios.get("memory")
    for result in memory["results"] if memory else []:
        rows.append(
            (
                f"Memory ({result['mode']}): a cached profile costs <= {MEMORY_RATIO:g} x its compact JSON",
                f"{_f(result['ratio'], 2)} x",
                result["ratio"] <= MEMORY_RATIO,
            )
        )
    if not memory:
        rows.append((f"Memory: a cached profile costs <= {MEMORY_RATIO:g} x its compact JSON", "n/a", None))
    return rows


# -- the plot ---------------------------------------------------------------------------------


def plot(hit: dict[str, Any], path: Path) -> str | None:
    """Latency percentiles against connections for each hit-path server; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    summary = _int_keys(hit["summary"])
    conns = sorted(summary)
    targets = list(hit["targets"])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = {"service": "tab:red", "bare": "tab:blue", "bare_2x16": "tab:green", "service_default": "tab:orange"}
    styles = {"p50_ms": ("-", "o", "p50"), "p90_ms": ("--", "s", "p90"), "p99_ms": (":", "^", "p99")}
    for target in targets:
        for key, (line, marker, name) in styles.items():
            values = [summary[c][target][key] for c in conns]
            ax.plot(
                conns,
                values,
                linestyle=line,
                marker=marker,
                color=colours.get(target),
                label=f"{hit['targets'][target]['label']} {name}",
            )
    limits = {64: HIT_64_P99_MS, 256: HIT_256_P99_MS}
    shown = False
    for c, limit in limits.items():
        if c in conns:
            ax.plot(
                [c],
                [limit],
                marker="_",
                markersize=30,
                color="black",
                linestyle="none",
                label=None if shown else "p99 target",
            )
            shown = True
    ax.set_xscale("log", base=2)
    ax.set_xticks(conns)
    ax.set_xticklabels([str(c) for c in conns])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("keep-alive connections (wrk)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Hit path latency: median of {hit['run_count']} runs x {hit['duration']:.0f} s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None


# -- the markdown -------------------------------------------------------------------------------


def render(results: dict[str, Any], plot_name: str | None) -> str:
    machine = results["machine"]
    scenarios = results["scenarios"]
    options = results["options"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add(
        "Generated by `python -m bench` (`make bench`); every figure below comes from that run and "
        "the file is overwritten by the next one. Absolute numbers depend on the machine and, on a "
        "shared or virtual machine, move by tens of percent from one run to the next: **read the "
        "ratios**, which compare servers measured side by side, interleaved, under the same conditions."
    )
    add("")
    add(f"Command: `{results['command']}`" + (" (**quick mode: indicative only**)" if options.get("quick") else ""))
    add("")
    add("## Machine")
    add("")
    add("| CPU | cores | Python | kernel | wrk | gunicorn | Flask | date |")
    add("|---|---|---|---|---|---|---|---|")
    libs = machine.get("libs", {})
    add(
        f"| {machine['cpu']} | {machine['cores']} | {machine['implementation']} {machine['python']} | "
        f"{machine['kernel']} | {machine['wrk']} | {libs.get('gunicorn', '?')} | {libs.get('flask', '?')} | "
        f"{machine['date']} |"
    )
    add("")
    add(
        "Everything runs on this one machine over 127.0.0.1: the load generators (wrk, the Braze-like "
        "sender), the simulator and the servers share its cores, so the servers get less than the "
        "whole machine. The simulator runs with TCP_NODELAY (`bench/sim_nodelay.py` makes sure of it): "
        "without it every answer after the first on a keep-alive connection waits ~40 ms for a delayed "
        "ACK (Nagle's algorithm), which real Amplitude does not."
        if not options.get("sim_nagle")
        else "The simulator ran as shipped (`--sim-nagle`): ~40 ms of Nagle delay on keep-alive answers."
    )
    add("")
    add("## Targets")
    add("")
    add("| Target | Measured | Result |")
    add("|---|---|---|")
    for target, measured, ok in evaluate(scenarios):
        add(f"| {target} | {measured} | {_verdict(ok)} |")
    add("")
    _closed_loop_note(out, scenarios.get("hit"))
    if "hit" in scenarios:
        _hit_section(out, scenarios["hit"], plot_name)
    if "miss" in scenarios:
        _miss_section(out, scenarios["miss"])
    if "campaign" in scenarios:
        _campaign_section(out, scenarios["campaign"])
    if "memory" in scenarios:
        _memory_section(out, scenarios["memory"])
    add("## Running it")
    add("")
    add("```sh")
    add("make bench                                   # the full run (about 15 minutes), rewrites this file")
    add(".venv/bin/python -m bench --quick            # seconds per scenario, indicative only")
    add(".venv/bin/python -m bench --only hit,memory  # some scenarios; the others keep their last figures")
    add(".venv/bin/python -m bench --help             # runs, durations, connections, campaign size...")
    add("```")
    add("")
    add(
        "wrk (`apt-get install wrk`) is needed for the hit and miss paths; matplotlib (the `bench` extra) for the plot."
    )
    add("")
    add(f"<!-- {RESULTS_MARK}")
    add(json.dumps(strip_raw(results), separators=(",", ":")))
    add("-->")
    add("")
    return "\n".join(out)


def _closed_loop_note(out: list[str], hit: dict[str, Any] | None) -> None:
    """wrk keeps every connection busy, so latency is connections / throughput (Little's law)."""
    if not hit:
        return
    summary = _int_keys(hit["summary"])
    parts = []
    for conns, limit in ((64, HIT_64_P99_MS), (256, HIT_256_P99_MS)):
        if conns in summary and "bare" in summary[conns]:
            needed = conns / (limit / 1000.0)
            parts.append(
                f"at {conns} connections a p99 under {limit:.0f} ms needs more than {needed:,.0f} req/s, and "
                f"the bare Flask app under the same settings serves {summary[conns]['bare']['rps']:,.0f}"
            )
    if parts:
        out.append(
            "Reading the latency targets: wrk keeps every connection busy (a closed loop), so a request's "
            "latency is about connections ÷ throughput, even for the median; " + "; ".join(parts) + "."
        )
        out.append("")


def _when(section: dict[str, Any]) -> str:
    return f" Measured {section['date']}." if section.get("date") else ""


def _hit_section(out: list[str], hit: dict[str, Any], plot_name: str | None) -> None:
    add = out.append
    summary = _int_keys(hit["summary"])
    ratios = _int_keys(hit["ratios"])
    targets = hit["targets"]
    add("## Hit path")
    add("")
    add(
        f"{hit['users']:,} users, each profile cached beforehand (warmed with one request per user, the "
        f"limits raised out of the way; `CACHE_TTL_SECONDS=3600` so nothing turns stale during the "
        f"scenario), then every path of the mix answered once by every worker of each service, over "
        f"keep-alive connections pinned to that worker: each worker holds every profile in its own cache "
        f"and every path's shaped answer, as after a long run. wrk with keep-alive connections and a 2 s "
        f"timeout picks each request at random from "
        f"{hit['paths']:,} paths: every user x five routes "
        f"({', '.join('`' + r.replace('{u}', 'ID') + '`' for r in hit['routes'])}); mean answer "
        f"{hit['mean_body_bytes']:.0f} bytes. The bare Flask app (`bench/bare_app.py`) answers the same "
        f"paths with a constant JSON object of the same size per route, and runs under the service's own "
        f"gunicorn.conf.py. Median of {hit['run_count']} runs x {hit['duration']:.0f} s per point, runs "
        f"interleaved across servers; in brackets, the lowest and highest of the runs. Each ratio is the "
        f"median of the runs' ratios: run *i* of every server goes back to back with the others' run *i*, "
        f"so a drift of the machine between rounds cancels out. *CPU µs per answer* is the user and system "
        f"CPU the server's worker processes used during a run (from /proc), divided by the answers: it moves "
        f"far less with the machine's noise than req/s, which also depends on how the load generator and the "
        f"server share the cores (median of the runs). Upstream calls "
        f"during the measured service runs: "
        f"**{hit['upstream_calls_during_load']}** (every answer was a cache hit).{_when(hit)}"
    )
    add("")
    add(
        "| Server | workers x threads | connections | req/s | p50 ms | p90 ms | p99 ms | errors "
        "| CPU µs per answer | service ÷ this |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for conns in sorted(summary):
        for name, row in summary[conns].items():
            info = targets[name]
            ratio = "" if name == "service" else f"{ratios[conns].get(name, float('nan')):.2f}"
            rps, p99 = f"{row['rps']:,.0f}", f"{row['p99_ms']:.1f}"
            if "rps_min" in row and hit.get("run_count", 1) > 1:
                rps += f" ({row['rps_min']:,.0f}–{row['rps_max']:,.0f})"
                p99 += f" ({row['p99_min']:.0f}–{row['p99_max']:.0f})"
            cpu = f"{row['cpu_us']:.0f}" if row.get("cpu_us") is not None else "–"
            add(
                f"| {info['label']} | {info['workers']} x {info['threads']} | {conns} | {rps} | "
                f"{row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {p99} | {row['errors']} | {cpu} | {ratio} |"
            )
    add("")
    lines = []
    for conns in sorted(ratios):
        parts = [f"{ratios[conns][n]:.2f} x {targets[n]['label']}" for n in ratios[conns] if n in targets]
        if parts:
            lines.append(f"at {conns} connections the service serves " + " and ".join(parts))
    if lines:
        add("In ratios: " + "; ".join(lines) + ".")
        add("")
    both = [c for c in sorted(summary) if {"service_default", "bare_2x16"} <= set(summary[c])]
    if both:
        same = ", ".join(f"{ratios[c]['default_vs_bare_2x16']:.2f} x at {c}" for c in both)
        add(
            f"In its default configuration without Redis (one process per core, every worker's cache warmed; "
            f"{hit.get('upstream_calls_during_load_2x16', 0)} upstream calls during its runs), the service serves "
            f"{same} connections of what bare Flask serves under gthread 2 x 16."
        )
        add("")
    rss = hit.get("service_worker_rss")
    if rss:
        add(
            f"Service worker RSS: {_mb(rss['before_warm'])} at start, {_mb(rss['after_warm'])} with "
            f"{hit['users']:,} profiles cached, {_mb(rss['after_load'])} after the load."
        )
        add("")
    if plot_name:
        add(f"![Hit path latency percentiles against connections]({plot_name})")
        add("")


def _miss_section(out: list[str], miss: dict[str, Any]) -> None:
    add = out.append
    summary = _int_keys(miss["summary"])
    add("## Miss path")
    add("")
    add(
        f"Every request names a user no request named before, so every one is a cache miss and one "
        f"Amplitude call (checked: upstream calls per answered request below). Simulator latency "
        f"{miss['latency_ms']:.0f} ms; no rate limit on the simulator and "
        f"`UPSTREAM_RATE_LIMIT_PER_MINUTE` at its maximum. *Direct* is wrk sending the simulator exactly "
        f"the request the service makes (same parameters, `Api-Key` header), at the same concurrency; "
        f"*added* is service minus direct. Median of {miss['run_count']} runs x {miss['duration']:.0f} s, "
        f"direct and service runs interleaved.{_when(miss)}"
    )
    add("")
    add(
        "| connections | direct p50 / p99 ms | service p50 / p99 ms | added p50 / p99 ms | direct req/s | "
        "service req/s | upstream calls per request | errors |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for conns, row in sorted(summary.items()):
        d, s = row["direct"], row["service"]
        add(
            f"| {conns} | {d['p50_ms']:.1f} / {d['p99_ms']:.1f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
            f"**{row['added_p50_ms']:.1f}** / {row['added_p99_ms']:.1f} | {d['rps']:,.0f} | {s['rps']:,.0f} | "
            f"{row['calls_per_request']:.2f} | {s['errors']} |"
        )
    add("")


def _campaign_section(out: list[str], campaign: dict[str, Any]) -> None:
    add = out.append
    add("## A Braze campaign")
    add("")
    tags = ", ".join(f"{name} (`{path.replace('{u}', 'ID')}`)" for name, path in campaign["tag_paths"].items())
    add(
        f"Each message renders {len(campaign['tags'])} Connected Content tags: {tags}, each in the "
        f"subject and the body. The sender behaves like Braze: identical URLs in one message are fetched "
        f"once, {campaign['concurrency']} messages render concurrently (threads with keep-alive connection "
        f"pools), each call gets 2 s. The simulator enforces {campaign['upstream_limit']}/min with "
        f"{campaign['latency_ms']:.0f} ms latency; the service runs with "
        f"`UPSTREAM_RATE_LIMIT_PER_MINUTE={campaign['upstream_limit']}` and starts cold (empty cache, empty "
        f"budget) for every send. Recipients: a population of {campaign['population']:,} ids (2 % unknown "
        f"to Amplitude, 1 % too new for recommendations, 1 % in the control group).{_when(campaign)}"
    )
    add("")
    add(
        f"**How the send is scaled (nothing is pre-warmed).** At {campaign['upstream_limit']} calls a "
        f"minute, {campaign['population']:,} cold users cannot be sent in a benchmark's time. *Paced* models "
        f"the operator setting Braze's delivery rate limit to {campaign['rate_per_minute']} messages per "
        f"minute (the README's advice): recipients go out at that rate for "
        f"{campaign['time_budget_s']:.0f} s, and the per-recipient figures are those of the whole send, "
        f"which would take about {max(1, round(campaign['full_send_minutes']))} min. *Blast* is the same population "
        f"with no delivery rate limit, sent as fast as the sender goes for the same "
        f"{campaign['time_budget_s']:.0f} s. *Direct* sends the same recipients in the same time budget with "
        f"templates that call the simulator themselves: one Amplitude call per tag, key in the template."
    )
    add("")
    add(
        "| send | target | recipients | upstream calls / recipient | limit used (busiest 60 s) | personalised | "
        "fallback | would be retried (non-2XX) | recommendation renders empty | p50 ms | p99 ms | upstream 429s |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for send in campaign["sends"]:
        n = max(1, send["recipients"])
        mode = f"{send['mode']} ({campaign['rate_per_minute']}/min)" if send["mode"] == "paced" else "blast"
        add(
            f"| {mode} | {send['target']} | {send['recipients']:,} | {send['upstream_calls_per_recipient']:.2f} | "
            f"{100 * send.get('limit_utilization', 0):.0f} % | "
            f"{send['personalised']:,} ({100 * send['personalised'] / n:.0f} %) | "
            f"{send['fallback']:,} ({100 * send['fallback'] / n:.0f} %) | "
            f"{send['retried']:,} ({100 * send['retried'] / n:.0f} %) | "
            f"{send['rec_empty']:,} of {send['rec_renders']:,} | "
            f"{send['p50_ms']:.0f} | {send['p99_ms']:.0f} | {send['upstream_429']:,} |"
        )
    add("")
    add(
        "*Personalised*: every tag rendered the user's own data. *Fallback*: the template's default "
        "content shows somewhere (recommendation defaults, a 404 for a user Amplitude has not seen, no "
        "recommendations yet). *Would be retried*: some tag answered non-2XX (503, 429) or timed out; "
        "Braze renders it empty, or re-queues the message with `:retry`. Latency is per Connected Content "
        "call; a 429 or a budget refusal answers at once, which pulls the median down."
    )
    add("")
    add(
        f"Without a delivery rate limit nothing can personalise more than {campaign['upstream_limit']} cold "
        "users a minute; what differs is how the rest fail. Through the service, Amplitude never sees a 429, "
        "every recommendation with `default=` still renders, and the other tags answer a fast 503 with "
        "`Retry-After` for Braze to retry later. Direct, every tag over the limit is a 429 from Amplitude "
        "(counted against the whole organisation's quota and Braze's unhealthy-host detection), and every "
        "recommendation over the limit renders empty."
    )
    add("")


def _short(site: str) -> str:
    return re.sub(r"^.*site-packages/", "", site)


def ensure_spread(results: dict[str, Any]) -> None:
    """Fill the hit path's min/max from its raw runs (results written before they were kept)."""
    hit = results.get("scenarios", {}).get("hit")
    if not hit or "runs" not in hit:
        return
    for conns, by_target in hit["runs"].items():
        for name, runs in by_target.items():
            row = hit["summary"].get(conns, hit["summary"].get(str(conns), {})).get(name)
            if row is not None and "rps_min" not in row and runs:
                rps = [r["rps"] for r in runs]
                p99 = [r["latency_us"]["p99"] / 1000 for r in runs]
                row.update(rps_min=min(rps), rps_max=max(rps), p99_min=min(p99), p99_max=max(p99))


def _memory_section(out: list[str], memory: dict[str, Any]) -> None:
    add = out.append
    add("## Memory")
    add("")
    add(
        "Resident memory (VmRSS from /proc) of one worker's process before and after caching the "
        "profiles. *in-process*: a fresh process builds the app with `app.create_app` and fills its cache "
        "through the service's own code (query planner, `AmplitudeClient` reading the simulator's answer, "
        "`ProfileCache.put`), no network. *http*: a gunicorn worker filled through `/v1/users/{id}` with the "
        "simulator unlimited. Profiles are the simulator's: 8 properties, cohorts, two recommendations of "
        f"50 items, one prediction.{_when(memory)}"
    )
    add("")
    add("| mode | profiles | RSS before | RSS after | RSS per profile | compact JSON per profile | ratio |")
    add("|---|---|---|---|---|---|---|")
    for r in memory["results"]:
        add(
            f"| {r['mode']} | {r['entries']:,} | {_mb(r['rss_baseline'])} | {_mb(r['rss_filled'])} | "
            f"{r['rss_per_profile']:,.0f} B | {r['json_per_profile']:,.0f} B | **{r['ratio']:.2f} x** |"
        )
    add("")
    allocations = next((r["allocations"] for r in memory["results"] if r.get("allocations")), None)
    if allocations:
        shown = [site for site in allocations["sites"] if site["bytes"] >= 16 and "tracemalloc" not in site["site"]]
        sites = "; ".join(f"`{_short(site['site'])}` {site['bytes']:,.0f} B" for site in shown)
        add(
            f"Where it goes (tracemalloc over 500 more `ProfileCache.put` calls): "
            f"{allocations['per_put']:,.0f} B of Python allocations kept per cached profile, by source "
            f"line: {sites}."
        )
        add("")
