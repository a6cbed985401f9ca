"""docs/benchmarks.md and docs/benchmark-latency.png from the scenarios' results."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_MARK = "bench-results"

# The project's targets (issue 20, "Speed, measured by make bench").
FIRST_RPS_VS_BARE = 0.9
FIRST_P99_VS_BARE = 1.5
STAMPEDE_MAX_MS = 2000.0
STAMPEDE_HIT_P99_VS_ALONE = 3.0
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


def _rss(values: list[int]) -> str:
    """Each worker's RSS, and their sum when there are several."""
    each = " + ".join(_mb(v) for v in values)
    return each if len(values) < 2 else f"{each} = {_mb(sum(values))}"


def _verdict(ok: bool | None) -> str:
    return "not run" if ok is None else "**pass**" if ok else "**FAIL**"


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{status}: {n:,}" for status, n in sorted(counts.items())) or "none"


def _shape(section: dict[str, Any]) -> str:
    """The worker class as run, e.g. ``gevent, 2 workers``, and what was asked for when it differs."""
    requested = section.get("requested")
    mismatch = requested and requested not in ("default", section["kind"])
    return section["shape"] + (f" ({requested} asked for)" if mismatch else "")


def _class_label(section: dict[str, Any]) -> str:
    """:func:`_shape`, saying which class ``gunicorn.conf.py`` ran when it was not the one asked for."""
    requested = section.get("requested")
    if requested and requested not in ("default", section["kind"]):
        return f"{section['shape']} (**{requested} asked for**: this gunicorn.conf.py ran `{section['worker_class']}`)"
    return str(section["shape"])


# -- stored results (so a partial run updates only its sections) -----------------------------


def strip_raw(results: dict[str, Any]) -> dict[str, Any]:
    """Results without per-run raw data, small enough to keep inside the markdown."""
    slim = json.loads(json.dumps(results, default=str))
    scenarios = slim.get("scenarios", {})
    for name in ("first", "stampede"):
        for section in scenarios.get(name, {}).get("classes", {}).values():
            section.pop("runs", None)
            section.get("repeat", {}).pop("runs", None)
            for point in section.get("first", {}).values():
                point.pop("runs", None)
    scenarios.get("miss", {}).pop("runs", None)
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


def reference_from(previous: dict[str, Any]) -> dict[str, Any] | None:
    """The repeated-URL ratio the report before this harness gave (its ``hit`` scenario), carried forward."""
    if previous.get("reference"):
        return dict(previous["reference"])
    hit = previous.get("scenarios", {}).get("hit")
    if not hit:
        return None
    ratios = {int(k): v for k, v in hit.get("ratios", {}).items()}
    conns = 64 if 64 in ratios else min(ratios, default=None)
    if conns is None or "bare" not in ratios[conns]:
        return None
    service = hit.get("targets", {}).get("service", {})
    return {
        "repeat_ratio": ratios[conns]["bare"],
        "connections": conns,
        "date": hit.get("date", previous.get("machine", {}).get("date", "?")),
        "setup": f"gthread {service.get('workers', '?')} x {service.get('threads', '?')}, gunicorn reached "
        "directly without a front, TRUSTED_PROXY_COUNT or ALLOWED_CIDRS",
    }


# -- targets ----------------------------------------------------------------------------------


def _classes(scenarios: dict[str, Any], name: str) -> dict[str, Any]:
    scenario = scenarios.get(name, {})
    if name == "stampede" and not _is_burst(scenario):
        return {}  # the earlier sustained-load stampede's figures: not comparable, not judged
    return dict(scenario.get("classes", {}))


def _is_burst(stampede: dict[str, Any]) -> bool:
    """Whether stored stampede results are of bursts (the earlier harness ran a sustained closed loop)."""
    return stampede.get("shape") == "burst"


def evaluate(scenarios: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, pass / fail / None when not measured)."""
    rows: list[tuple[str, str, bool | None]] = []
    first = _classes(scenarios, "first")
    for section in first.values():
        for conns, point in section["first"].items():
            ratios, summary = point["ratios"], point["summary"]
            where = f"First answers, {_shape(section)}, {conns} connections"
            rows.append(
                (
                    f"{where}: service req/s >= {FIRST_RPS_VS_BARE} x bare Flask's",
                    f"{_f(ratios['rps'], 2)} x ({_f(summary['service']['rps'], 0)} vs "
                    f"{_f(summary['bare']['rps'], 0)} req/s)",
                    ratios["rps"] >= FIRST_RPS_VS_BARE,
                )
            )
            rows.append(
                (
                    f"{where}: service p99 <= {FIRST_P99_VS_BARE} x bare Flask's",
                    f"{_f(ratios['p99'], 2)} x ({_f(summary['service']['p99_ms'])} vs "
                    f"{_f(summary['bare']['p99_ms'])} ms)",
                    ratios["p99"] <= FIRST_P99_VS_BARE,
                )
            )
    if not first:
        rows.append(
            (
                f"First answers: service >= {FIRST_RPS_VS_BARE} x bare Flask's req/s, p99 <= "
                f"{FIRST_P99_VS_BARE} x bare's",
                "n/a",
                None,
            )
        )
    stampede = _classes(scenarios, "stampede")
    for section in stampede.values():
        where = f"Stampede, {_shape(section)}"
        refused = _refused(section)
        missing = sum(section[side]["timeouts"] + section[side]["socket_errors"] for side in STAMPEDE_SIDES)
        rows.append(
            (
                f"{where}: no refusals (every answer 2XX, no socket error or timeout)",
                f"{refused:,} ("
                + "; ".join(
                    f"{label} {_statuses(section[side]['by_status'])}" for side, label in STAMPEDE_SIDES.items()
                )
                + (f"; {missing:,} without an answer" if missing else "")
                + ")"
                + ("; **a limit outside the service was reached** (see Stampede)" if _limit_reached(section) else ""),
                refused == 0,
            )
        )
        slowest = _slowest(section)
        over = sum(section[side]["over_2s"] for side in STAMPEDE_SIDES)
        timeouts = sum(section[side]["timeouts"] for side in STAMPEDE_SIDES)
        rows.append(
            (
                f"{where}: every answer within {STAMPEDE_MAX_MS / 1000:.0f} s",
                f"slowest {_f(slowest, 0)} ms, {over:,} over 2 s" + (f", {timeouts:,} timeouts" if timeouts else ""),
                slowest <= STAMPEDE_MAX_MS and over + timeouts == 0,
            )
        )
        ratio = section["hit_p99_ratio"]
        rows.append(
            (
                f"{where}: hit p99 <= {STAMPEDE_HIT_P99_VS_ALONE:g} x its value without the misses",
                f"{_f(ratio, 2)} x ({_f(section['hits']['p99_ms'])} vs {_f(section['baseline']['p99_ms'])} ms)",
                None if math.isnan(ratio) else ratio <= STAMPEDE_HIT_P99_VS_ALONE,
            )
        )
    if not stampede:
        rows.append(("Stampede: no refusals, every answer within 2 s, hit p99 <= 3 x without misses", "n/a", None))
    miss = scenarios.get("miss")
    if miss:
        for conns, row in sorted({int(k): v for k, v in miss["summary"].items()}.items()):
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


def plot(scenarios: dict[str, Any], path: Path) -> str | None:
    """First answers' and the stampede's latency percentiles per worker class; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (the bench extra): no plot"
    first, stampede = _classes(scenarios, "first"), _classes(scenarios, "stampede")
    if not first and not stampede:
        return "no first answers or stampede to plot"
    panels = [name for name, present in (("first", first), ("stampede", stampede)) if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=110, squeeze=False)
    keys = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max"))
    for ax, panel in zip(axes[0], panels, strict=True):
        bars: list[tuple[str, dict[str, Any]]] = []
        if panel == "first":
            for name, section in first.items():
                conns = min(section["first"], key=int)
                for target in ("service", "bare"):
                    bars.append((f"{name}\n{target}", section["first"][conns]["summary"][target]))
            ax.set_title(f"First answers ({conns} connections)")
        else:
            for name, section in stampede.items():
                for side, label in (("baseline", "hits alone"), ("hits", "hits"), ("misses", "misses")):
                    bars.append((f"{name}\n{label}", section[side]))
            scenario = scenarios["stampede"]
            ax.set_title(
                f"Stampede bursts ({scenario['hit_connections']} hits + {scenario['miss_connections']} misses)"
            )
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(keys):
            values = [row.get(key, float("nan")) for _, row in bars]
            ax.bar([i + (k - 1.5) * width for i in range(len(bars))], values, width, label=label)
        if panel == "stampede":
            ax.axhline(STAMPEDE_MAX_MS, color="black", linestyle=":", linewidth=1, label="Braze's 2 s")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([label for label, _ in bars], fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("latency (ms)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None


# -- the markdown -------------------------------------------------------------------------------


def render(results: dict[str, Any], plot_name: str | None) -> str:
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
    _machine_section(out, results)
    add("## Targets")
    add("")
    add("| Target | Measured | Result |")
    add("|---|---|---|")
    for target, measured, ok in evaluate(scenarios):
        add(f"| {target} | {measured} | {_verdict(ok)} |")
    add("")
    _classes_section(out, scenarios, results.get("reference"))
    if "first" in scenarios:
        _first_section(out, scenarios["first"], plot_name)
        _repeat_section(out, scenarios["first"], results.get("reference"))
    if "stampede" in scenarios:
        _stampede_section(out, scenarios["stampede"])
    if "miss" in scenarios:
        _miss_section(out, scenarios["miss"])
    if "campaign" in scenarios:
        _campaign_section(out, scenarios["campaign"])
    if "memory" in scenarios:
        _memory_section(out, scenarios["memory"])
    add("## Running it")
    add("")
    add("```sh")
    add("make bench                                        # the full run (about 25 minutes), rewrites this file")
    add(".venv/bin/python -m bench --quick --no-docs       # seconds per scenario, indicative only")
    add(".venv/bin/python -m bench --only first,stampede   # some scenarios; the others keep their last figures")
    add(".venv/bin/python -m bench --worker-classes gevent # one worker class (default: gevent and gthread)")
    add(".venv/bin/python -m bench --help                  # runs, durations, connections, campaign size...")
    add("```")
    add("")
    add(
        "wrk (`apt-get install wrk`) and nginx (`make system-deps`: nginx-light) are needed for every scenario but "
        "the in-process memory one; matplotlib (the `bench` extra) for the plot."
    )
    add("")
    add(f"<!-- {RESULTS_MARK}")
    add(json.dumps(strip_raw(results), separators=(",", ":")))
    add("-->")
    add("")
    return "\n".join(out)


def _machine_section(out: list[str], results: dict[str, Any]) -> None:
    add = out.append
    machine, options = results["machine"], results["options"]
    libs = machine.get("libs", {})
    add("## Machine")
    add("")
    add("| CPU | cores | memory | Python | kernel | wrk | nginx | gunicorn | gevent | Flask | date | load at start |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    add(
        f"| {machine['cpu']} | {machine['cores']} | {_f(machine.get('memory_gib'), 0)} GiB | "
        f"{machine['implementation']} {machine['python']} | {machine['kernel']} | {machine['wrk']} | "
        f"{machine.get('nginx', '?')} | {libs.get('gunicorn', '?')} | {libs.get('gevent', '?')} | "
        f"{libs.get('flask', '?')} | {machine['date']} | {_f(machine.get('load_at_start'), 2)} |"
    )
    add("")
    extra = options.get("service_env") or {}
    add(
        "Everything runs on this one machine over 127.0.0.1: the load generators (wrk, the Braze-like "
        "sender), the simulator, the fronts and the servers share its cores, so the servers get less "
        "than the whole machine. **Every server runs as production does**: gunicorn with the "
        "repository's `gunicorn.conf.py` on loopback, behind its own nginx front rendered by "
        "`deploy/nginx/render.py` exactly as `make run-prod` renders it, every request through the front. "
        "The service has the shipped production settings (`deploy/k8s/configmap.yaml`): "
        "`TRUSTED_PROXY_COUNT=1`, `FORWARDED_ALLOW_IPS=127.0.0.1`, and `ALLOWED_CIDRS=127.0.0.0/8` "
        "(the load generators' range, where the configmap names Braze's); no Redis, so with several "
        "workers it shares its cache and budget through its default SQLite file; the default number of "
        f"workers (`WEB_CONCURRENCY` {'unset: one per core' if not options.get('workers') else options['workers']})."
        + (" Added with `--service-env`: " + ", ".join(f"`{k}={v}`" for k, v in extra.items()) + "." if extra else "")
    )
    add("")
    add(
        "The simulator runs with TCP_NODELAY (`bench/sim_nodelay.py` makes sure of it): without it every "
        "answer after the first on a keep-alive connection waits ~40 ms for a delayed ACK (Nagle's "
        "algorithm), which real Amplitude does not."
        if not options.get("sim_nagle")
        else "The simulator ran as shipped (`--sim-nagle`): ~40 ms of Nagle delay on keep-alive answers."
    )
    add("")


def _when(section: dict[str, Any]) -> str:
    return f" Measured {section['date']}." if section.get("date") else ""


def _served(section: dict[str, Any]) -> str:
    """How a single-server scenario's service ran (figures kept from the harness before the front say so)."""
    if "shape" in section:
        return f"in its default configuration ({section['shape']}) behind its front"
    return (
        "as the earlier harness ran it (gthread 1 x 32, gunicorn reached directly: figures kept from before the front)"
    )


def _first_point(section: dict[str, Any]) -> dict[str, Any]:
    """First answers at the lowest connection count measured."""
    return dict(section["first"][min(section["first"], key=int)])


def _pair(section: dict[str, Any], key: str, digits: int = 1) -> str:
    """Service (bare) for one first-answers figure."""
    summary = _first_point(section)["summary"]
    return f"{_f(summary['service'][key], digits)} ({_f(summary['bare'][key], digits)})"


#: The stampede's three sides: each round's baseline burst, and the two halves of its stampede burst.
STAMPEDE_SIDES = {"baseline": "hits alone", "hits": "hits with the misses", "misses": "misses with the hits"}


def _refused(section: dict[str, Any]) -> int:
    """Stampede requests, in every burst, answered other than 2XX or not answered (socket errors, timeouts)."""
    return sum(int(section[side]["refused"]) for side in STAMPEDE_SIDES)


def _slowest(section: dict[str, Any]) -> float:
    return max(float(section[side]["max_ms"]) for side in STAMPEDE_SIDES)


#: The rows of the worker-class comparison: (scenario, label, the cell for one class's section).
CLASS_ROWS: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("first", "First answers: service req/s (bare)", lambda s: _pair(s, "rps", 0)),
    ("first", "First answers: service ÷ bare, req/s", lambda s: f"{_f(_first_point(s)['ratios']['rps'], 2)} x"),
    ("first", "First answers: service p99 ms (bare)", lambda s: _pair(s, "p99_ms")),
    ("first", "First answers: service ÷ bare, p99", lambda s: f"{_f(_first_point(s)['ratios']['p99'], 2)} x"),
    ("first", "First answers: CPU µs per answer, service (bare)", lambda s: _pair(s, "cpu_us", 0)),
    ("first", "Repeated URLs: service ÷ bare, req/s", lambda s: f"{_f(s['repeat']['ratios']['rps'], 2)} x"),
    ("first", "Service worker RSS after first answers", lambda s: _rss(s["service_worker_rss"]["after_first_answers"])),
    ("stampede", "Stampede: refused (non-2XX, socket errors, timeouts)", lambda s: _f(_refused(s))),
    ("stampede", "Stampede: slowest answer, ms", lambda s: _f(_slowest(s), 0)),
    ("stampede", "Stampede: hit p99 ms, alone → with misses",
     lambda s: f"{_f(s['baseline']['p99_ms'])} → {_f(s['hits']['p99_ms'])} ({_f(s['hit_p99_ratio'], 2)} x)"),
    ("stampede", "Stampede: miss p50 / p99 ms", lambda s: f"{_f(s['misses']['p50_ms'])} / {_f(s['misses']['p99_ms'])}"),
    ("stampede", "Stampede: upstream calls per burst (cold users in it)",
     lambda s: f"{_calls(s)} ({_f(s['misses']['requests'] // max(1, len(s['upstream_calls_per_burst'])))})"),
)  # fmt: skip


def _classes_section(out: list[str], scenarios: dict[str, Any], reference: dict[str, Any] | None) -> None:
    by_scenario = {name: _classes(scenarios, name) for name in ("first", "stampede")}
    first = by_scenario["first"]
    names = list(dict.fromkeys(name for sections in by_scenario.values() for name in sections))
    if not names:
        return
    add = out.append
    add("## Worker classes side by side")
    add("")
    add(
        "The same service and settings under each `GUNICORN_WORKER_CLASS` (`--worker-classes`; gthread with "
        "`GUNICORN_THREADS` from `--gthread-threads`). First answers at the lowest connection count measured; "
        "ratios are service ÷ bare Flask under the same class, median of the run pairs."
    )
    add("")
    header = ["", *[_class_label(first.get(n) or by_scenario["stampede"][n]) for n in names]]
    add("| " + " | ".join(header) + " |")
    add("|" + "---|" * len(header))
    for scenario, label, cell in CLASS_ROWS:
        sections = by_scenario[scenario]
        if sections:
            add(f"| {label} | " + " | ".join(cell(sections[n]) if n in sections else "–" for n in names) + " |")
    add("")
    if reference and first:
        ratios = ", ".join(f"{_f(section['repeat']['ratios']['rps'], 2)} x under {_shape(section)}"
                           for section in first.values())  # fmt: skip
        add(
            f"Repeated URLs, the old headline: {_f(reference['repeat_ratio'], 2)} x bare Flask in the report of "
            f"{reference['date']} ({reference['setup']}, {reference['connections']} connections); here {ratios}."
        )
        add("")


def _first_section(out: list[str], first: dict[str, Any], plot_name: str | None) -> None:
    add = out.append
    routes = ", ".join("`" + r.replace("{u}", "ID") + "`" for r in first["routes"])
    add("## First answers")
    add("")
    add(
        "Braze caches each Connected Content URL for five minutes, so the service mostly sees a URL once. "
        "Here every request is a URL the service has never answered, for a user whose profile it has "
        "cached: users are warmed beforehand with one request each on a route outside the mix "
        "(`/v1/users/ID/properties/first_name`), then each request takes the next (user, route) pair of "
        f"the mix ({routes}), each pair once; wrk walks the list without repeating "
        "(*URLs repeated* counts any request sent after a list ran out). `CACHE_TTL_SECONDS=3600` so no "
        "profile turns stale during the scenario; the limits are out of the way. The bare Flask app "
        "(`bench/bare_app.py`) answers the same paths with a constant JSON object of the same size per route, "
        "under the same `gunicorn.conf.py` and environment, behind its own front. wrk keeps its connections "
        f"busy (a closed loop) with a 2 s timeout. Median of {first['run_count']} runs x "
        f"{first['duration']:.0f} s per point, service and bare runs back to back (which goes first alternates); "
        "in brackets, the lowest and highest of the runs. Each ratio is the median of the run pairs' ratios. "
        "*CPU µs per answer* is the CPU the server's worker processes used during a run (from /proc) over "
        f"its answers: it moves far less with the machine's noise than req/s.{_when(first)}"
    )
    add("")
    add(
        "| worker class | server | connections | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | URLs repeated "
        "| CPU µs per answer |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    multi = first.get("run_count", 1) > 1
    for section in first["classes"].values():
        for conns, point in section["first"].items():
            for name, row in point["summary"].items():
                rps, p99 = f"{row['rps']:,.0f}", f"{row['p99_ms']:.1f}"
                if multi:
                    rps += f" ({row['rps_min']:,.0f}–{row['rps_max']:,.0f})"
                    p99 += f" ({row['p99_min']:.0f}–{row['p99_max']:.0f})"
                add(
                    f"| {_shape(section)} | {name} | {conns} | {rps} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | "
                    f"{p99} | {row['max_ms']:.0f} | {row['errors']} | {row['repeated']:,} | {row['cpu_us']:.0f} |"
                )
    add("")
    for section in first["classes"].values():
        upstream = section["upstream_calls_during_load"]
        rss = section["service_worker_rss"]
        add(
            f"- {_class_label(section)}: {section['first_answer_users']:,} users cached for first answers "
            f"(warmed in {section['warm_seconds']:.0f} s); upstream calls during the service's measured runs: "
            f"**{upstream}**{' (every answer came from the cache)' if upstream == 0 else ''}. Service worker RSS: "
            f"{_rss(rss['start'])} at start, **{_rss(rss['after_first_answers'])} after the first-answers runs** "
            f"(bare Flask's: {_rss(section['bare_worker_rss'])}). Answer sizes per route: "
            + ", ".join(f"{kind} {size} B" for kind, size in section["body_bytes"].items())
            + "."
        )
    add("")
    if plot_name:
        add(f"![First answers and stampede latency per worker class]({plot_name})")
        add("")


def _repeat_section(out: list[str], first: dict[str, Any], reference: dict[str, Any] | None) -> None:
    add = out.append
    classes = first["classes"]
    if not classes:
        return
    sample = next(iter(classes.values()))
    add("## Repeated URLs (the old hit path)")
    add("")
    add(
        f"The old headline, measured beside first answers on the same servers: {sample['repeat_users']:,} cached "
        f"users, wrk picking each request at random among their {sample['repeat_paths']:,} URLs (every route for "
        f"every user), so URLs repeat; before the runs every URL was answered about once per worker. Braze "
        f"rarely sends a URL twice within five minutes, so this is no longer what the targets judge."
        + (
            f" For comparison: {_f(reference['repeat_ratio'], 2)} x bare Flask in the report of "
            f"{reference['date']} ({reference['setup']})."
            if reference
            else ""
        )
    )
    add("")
    add("| worker class | server | connections | req/s | p50 ms | p99 ms | errors | service ÷ bare req/s |")
    add("|---|---|---|---|---|---|---|---|")
    for section in classes.values():
        repeat = section["repeat"]
        for name, row in repeat["summary"].items():
            ratio = f"{repeat['ratios']['rps']:.2f} x" if name == "service" else ""
            add(
                f"| {_shape(section)} | {name} | {repeat['connections']} | {row['rps']:,.0f} | "
                f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} | {ratio} |"
            )
    add("")


def _limit_reached(section: dict[str, Any]) -> bool:
    return bool(section.get("listen_overflows") or section.get("limit_errors"))


def _limits(section: dict[str, Any]) -> str:
    """Whether a limit other than the server's own was reached during the stampede."""
    overflows, errors = section.get("listen_overflows", 0), section.get("limit_errors", [])
    if not overflows and not errors:
        return "no listen queue overflowed (the kernel's count), and nginx and gunicorn logged no limit reached"
    parts = []
    if overflows:
        parts.append(f"**{overflows:,} connections dropped by a full listen queue** (the kernel's count, machine-wide)")
    if errors:
        parts.append("**a limit of nginx or gunicorn was reached**: `" + errors[0].strip()[-160:] + "`")
    return "; ".join(parts)


def _calls(section: dict[str, Any]) -> str:
    """The simulator's calls in each stampede burst, or their range when they differ."""
    calls = section["upstream_calls_per_burst"]
    return _f(calls[0]) if len(set(calls)) == 1 else f"{_f(min(calls))}–{_f(max(calls))}"


def _stampede_section(out: list[str], stampede: dict[str, Any]) -> None:
    add = out.append
    add("## Stampede")
    add("")
    if not _is_burst(stampede):
        add(
            "The stored figures are those of the earlier stampede, a sustained closed loop that saturated the "
            "machine, and are not shown: run `python -m bench --only stampede` for bursts."
        )
        add("")
        return
    hits, misses = stampede["hit_connections"], stampede["miss_connections"]
    add(
        f"Each burst is what the start of a Braze send looks like: {hits + misses:,} requests at once, each on a "
        f"connection of its own opened through the front just before, then all written one after another by one thread "
        f"(`testkit/burst.py`: a selector, HTTP/1.1 with Content-Length, no thread per request) and read as the "
        f"answers come. Each latency runs from a request's sending to the last byte of its answer. One round is "
        f"two bursts {stampede['pause_s']:g} s apart, so that each is over before the next: the *baseline*, "
        f"{hits:,} requests for cached users alone; then the *stampede*, {hits:,} other such requests interleaved "
        f"with {misses:,} for cold users. Hits are URLs never answered before for users cached beforehand (as in "
        f"first answers); each miss names a user no request named before, so it is one Amplitude call. "
        f"{stampede['run_count']} round{'s' if stampede['run_count'] != 1 else ''}, fresh users in each; before "
        f"the first, a burst of {hits + misses:,} hits, not measured, opens the front's connections to gunicorn "
        f"as in a service that has been running. The simulator answers after {stampede['latency_ms']:.0f} ms; the "
        "budget is out of the way (`UPSTREAM_RATE_LIMIT_PER_MINUTE` at its maximum, no rate limit on the "
        f"simulator). The client waits {stampede['timeout_s']:g} s, so answers slower than Braze's 2 s are "
        "measured (*over 2 s*), and a request not answered whole by then is a timeout, counted in the "
        "percentiles at the time it was given up. Percentiles are the medians of the rounds'; the slowest answer "
        "and the counts are over every round. *Refused* is every request without a 2XX answer: other statuses, "
        "timeouts and socket errors. Limits that are not the subject are raised out of the way: the harness's "
        "open-files limit (the client runs in the harness; nginx and gunicorn inherit it), and gunicorn's "
        f"`worker_connections` when `gunicorn.conf.py` gives fewer than twice a burst's requests.{_when(stampede)}"
    )
    add("")
    add(
        "Targets (issue 20): no refusals, every answer within 2 s, and the hits' p99 in the stampede at most "
        f"{STAMPEDE_HIT_P99_VS_ALONE:g} x the baseline's (the median of the rounds' ratios)."
    )
    add("")
    add("| worker class | side | requests | p50 ms | p90 ms | p99 ms | slowest ms | answers by status | X-Cache "
        "| refused | over 2 s |")  # fmt: skip
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for section in stampede["classes"].values():
        for side, label in STAMPEDE_SIDES.items():
            row = section[side]
            reasons = [f"`{refusal}` {n:,}" for refusal, n in row["refusals"].items()]
            reasons += [f"{reason} {n:,}" for reason, n in row["errors"].items()]
            refused = _f(row["refused"]) + (f" ({', '.join(reasons)})" if reasons else "")
            add(
                f"| {_shape(section)} | {label} | {row['requests']:,} | {_f(row['p50_ms'])} | {_f(row['p90_ms'])} | "
                f"{_f(row['p99_ms'])} | {_f(row['max_ms'], 0)} | {_statuses(row['by_status'])} | "
                f"{_statuses(row['by_cache'])} | {refused} | {row['over_2s']:,} |"
            )
    add("")
    for section in stampede["classes"].values():
        flags = " ".join(section["gunicorn_flags"])
        ratios = ", ".join(_f(ratio, 2) for ratio in section["hit_p99_ratios"])
        add(
            f"- {_class_label(section)}: {section['config']['worker_connections']:,} connections per worker"
            + (f" (raised with `{flags}`)" if flags else "")
            + f"; open-files limit {section['open_files_limit']:,}; "
            + _limits(section)
            + "; upstream calls in each stampede burst: "
            + ", ".join(_f(calls) for calls in section["upstream_calls_per_burst"])
            + f" for {misses:,} cold users each ({_f(section['baseline_upstream_calls'])} in the baseline bursts); "
            f"hit p99 with the misses ÷ alone, by round: {ratios}, median **{_f(section['hit_p99_ratio'], 2)} x**. "
            f"The client's slowest burst: connections opened in {_f(section['connect_ms'], 0)} ms, requests written "
            f"within {_f(section['send_spread_ms'], 0)} ms."
        )
    add("")


def _miss_section(out: list[str], miss: dict[str, Any]) -> None:
    add = out.append
    summary = {int(k): v for k, v in miss["summary"].items()}
    add("## Miss path")
    add("")
    add(
        f"Every request names a user no request named before, so every one is a cache miss and one "
        f"Amplitude call (checked: upstream calls per answered request below). The service runs "
        f"{_served(miss)}. Simulator latency "
        f"{miss['latency_ms']:.0f} ms; no rate limit on the simulator and "
        f"`UPSTREAM_RATE_LIMIT_PER_MINUTE` at its maximum. *Direct* is wrk sending the simulator exactly "
        f"the request the service makes (same parameters, `Api-Key` header), at the same concurrency; "
        f"*added* is service (front included) minus direct. Median of {miss['run_count']} runs x "
        f"{miss['duration']:.0f} s, direct and service runs interleaved.{_when(miss)}"
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
        f"{campaign['latency_ms']:.0f} ms latency; the service runs {_served(campaign)}, with "
        f"`UPSTREAM_RATE_LIMIT_PER_MINUTE={campaign['upstream_limit']}`, and starts cold (empty cache, empty "
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


def _memory_section(out: list[str], memory: dict[str, Any]) -> None:
    add = out.append
    add("## Memory")
    add("")
    add(
        "Resident memory (VmRSS from /proc) of one worker's process before and after caching the "
        "profiles. *in-process*: a fresh process builds the app with `app.create_app` and fills its cache "
        "through the service's own code (query planner, `AmplitudeClient` reading the simulator's answer, "
        "`ProfileCache.put`), no network. *http*: one gunicorn worker (`WEB_CONCURRENCY=1`, the default worker "
        "class) behind its front, filled through `/v1/users/{id}` with the simulator unlimited. Profiles are the "
        "simulator's: 8 properties, cohorts, two recommendations of 50 items, one prediction. The workers' RSS "
        f"after the first-answers runs is under *First answers*.{_when(memory)}"
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
