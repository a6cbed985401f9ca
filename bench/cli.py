"""``python -m bench``: run the scenarios, write docs/benchmarks.md and the latency plot."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from types import FrameType
from typing import Any

from bench import common, report
from bench.options import SCENARIOS, WORKER_CLASSES, Options

PLOT_NAME = "benchmark-latency.png"
MARKDOWN_NAME = "benchmarks.md"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("must list positive integers")
    return values


def _names(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return names

    return parse


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isupper():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service behind its nginx front on 127.0.0.1: first answers against bare "
        "Flask, stampede bursts, the miss path, a Braze campaign, memory.",
    )
    p.add_argument("--quick", action="store_true", help="seconds per scenario, not minutes (indicative only)")
    p.add_argument("--only", type=_names(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--runs", type=int, help="run pairs per measured point; figures are medians (5; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (10; quick 2)")
    p.add_argument("--wrk-threads", type=int, help="wrk threads per wrk process (2)")
    g = p.add_argument_group("gunicorn (the same for the service and the bare app)")
    g.add_argument(
        "--worker-classes",
        type=_names((*WORKER_CLASSES, "default")),
        help="GUNICORN_WORKER_CLASS values to compare in first answers and the stampede "
        "(gevent,gthread; 'default' leaves it to gunicorn.conf.py)",
    )
    g.add_argument("--gthread-threads", type=int, help="GUNICORN_THREADS under gthread (256)")
    g.add_argument("--workers", type=int, help="WEB_CONCURRENCY (default: unset, gunicorn.conf.py's one per core)")
    g.add_argument(
        "--service-env",
        type=_env_pair,
        action="append",
        metavar="NAME=VALUE",
        help="add a setting to the service's environment in every scenario (repeatable; recorded in the report)",
    )
    g = p.add_argument_group("first answers")
    g.add_argument("--connections", type=_ints, help="wrk connections for first answers (64)")
    g.add_argument("--repeat-connections", type=int, help="wrk connections for the repeated-URL mix (64)")
    g.add_argument("--users", type=int, help="cached users of the repeated-URL mix (3000; quick 300)")
    g = p.add_argument_group("stampede")
    g.add_argument(
        "--stampede-hit-connections",
        type=int,
        help="requests of a burst asking for cached users, one connection each (500)",
    )
    g.add_argument(
        "--stampede-miss-connections",
        type=int,
        help="requests of a burst asking for cold users, one connection each (500)",
    )
    g.add_argument("--stampede-latency-ms", type=float, help="simulator latency (300)")
    g.add_argument("--stampede-runs", type=int, help="rounds, each a baseline burst then a stampede burst (5; quick 1)")
    g.add_argument("--stampede-pause", type=float, help="seconds after each burst, so it is over before the next (3)")
    g = p.add_argument_group("miss path")
    g.add_argument("--miss-connections", type=_ints, help="wrk connections for the miss path (1,16; quick 16)")
    g.add_argument("--miss-latency-ms", type=float, help="simulator latency (100)")
    g = p.add_argument_group("campaign")
    g.add_argument("--campaign-recipients", type=int, help="recipient population (20000; quick 400)")
    g.add_argument("--campaign-seconds", type=float, help="time budget of each send (60; quick 5)")
    g.add_argument(
        "--campaign-rate",
        type=int,
        dest="campaign_rate_per_minute",
        help="Braze delivery rate limit of the paced send, messages/min (500)",
    )
    g.add_argument("--campaign-concurrency", type=int, help="messages rendered at once (64; quick 32)")
    g.add_argument("--campaign-tags", type=int, help="Connected Content tags per message, 1-5 (3)")
    g.add_argument("--campaign-latency-ms", type=float, help="simulator latency (100)")
    g.add_argument("--campaign-modes", type=_names(("paced", "blast")), help="sends to run (paced,blast)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-profiles", type=int, help="profiles cached in-process (100000; quick 5000)")
    g.add_argument(
        "--memory-http-profiles",
        type=int,
        help="also fill a gunicorn worker over HTTP with this many profiles (20000; quick 0: skip)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, help=f"where {MARKDOWN_NAME} and {PLOT_NAME} go (docs)")
    g.add_argument("--json", type=Path, dest="json_path", help="also write every result, raw runs included")
    g.add_argument("--no-docs", action="store_true", help="write no markdown or plot")
    g.add_argument(
        "--from-json", type=Path, help="run nothing: rewrite the markdown and plot from a --json file of a run"
    )
    g.add_argument("--keep-logs", action="store_true", help="keep the servers' stdout (access logs) too")
    g.add_argument("--sim-nagle", action="store_true", help="run the simulator as shipped (Nagle delays)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    opts = Options.quick_defaults() if args.quick else Options()
    names = {f.name for f in fields(Options)}
    for name, value in vars(args).items():
        if name in names and value is not None and name not in ("quick", "service_env"):
            setattr(opts, name, value)
    if args.service_env:
        opts.service_env = dict(args.service_env)
    if args.no_docs:
        opts.write_docs = False
    if opts.runs < 1 or opts.duration < 1 or opts.stampede_runs < 1:
        raise SystemExit("--runs, --duration and --stampede-runs must be at least 1")
    if opts.stampede_hit_connections < 1 or opts.stampede_miss_connections < 1 or opts.stampede_pause < 0:
        raise SystemExit("--stampede-hit-connections and --stampede-miss-connections must be at least 1, "
                         "--stampede-pause at least 0")  # fmt: skip
    opts.campaign_tags = max(1, min(5, opts.campaign_tags))
    return opts


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_scenarios(opts: Options) -> tuple[dict[str, Any], dict[str, str]]:
    from bench.scenarios import campaign, first, memory, miss, stampede

    modules = {"first": first, "stampede": stampede, "miss": miss, "campaign": campaign, "memory": memory}
    done: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in SCENARIOS:
        if name not in opts.only:
            continue
        missing = [tool for tool, present in (("wrk", common.wrk_available()), ("nginx", common.nginx_binary()))
                   if not present and (name != "memory" or opts.memory_http_profiles)]  # fmt: skip
        if name != "campaign" and "wrk" in missing or "nginx" in missing:
            errors[name] = f"{' and '.join(missing)} not installed (make system-deps; apt-get install wrk): skipped"
            common.log(f"scenario {name}: {errors[name]}")
            continue
        common.log(f"scenario {name}")
        for attempt in (1, 2):
            try:
                result = modules[name].run(opts)
            except common.BenchError as exc:
                # A process that died under us (or was killed from outside): once more, cleanly.
                common.stop_all()
                common.log(f"scenario {name} failed (attempt {attempt}): {exc}")
                if attempt == 2:
                    errors[name] = str(exc).splitlines()[0]
                continue
            result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            result["quick"] = opts.quick
            done[name] = result
            break
    return done, errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = options_from(args)
    if args.from_json:
        stored: dict[str, Any] = json.loads(args.from_json.read_text())
        opts.only = tuple(stored["scenarios"]) if stored["scenarios"] else opts.only
        write_docs(stored, opts)
        print_summary(stored)
        return 0
    if args.keep_logs:
        common.KEEP_LOGS = True
    if args.sim_nagle:
        common.SIM_NAGLE = True
    signal.signal(signal.SIGTERM, _on_sigterm)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in given)])
    common.log(f"logs in {common.LOG_DIR}")
    machine = common.machine_info()  # before the load: its load average is the machine's own
    started = time.monotonic()
    interrupted = False
    scenarios: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        scenarios, errors = run_scenarios(opts)
    except KeyboardInterrupt:
        interrupted = True
        common.log("interrupted: stopping every process started")
    finally:
        common.stop_all()
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    options["sim_nagle"] = common.SIM_NAGLE
    results: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "options": options,
        "scenarios": scenarios,
        "errors": errors,
        "seconds": time.monotonic() - started,
    }
    if opts.json_path:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(results, indent=1, default=str))
    if interrupted:
        return 130
    if opts.write_docs and scenarios:
        write_docs(results, opts)
    print_summary(results)
    return 1 if errors else 0


def write_docs(results: dict[str, Any], opts: Options) -> None:
    out_dir = opts.out_dir if opts.out_dir.is_absolute() else common.ROOT / opts.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / MARKDOWN_NAME
    previous = report.load_previous(markdown)
    merged = dict(results)
    # The old repeated-URL headline, carried from report to report for comparison.
    merged["reference"] = results.get("reference") or report.reference_from(previous)
    if set(opts.only) != set(SCENARIOS):
        # A partial run: the scenarios not run keep their previous figures (each dated).
        kept = {name: value for name, value in previous.get("scenarios", {}).items() if name in SCENARIOS}
        merged["scenarios"] = {**kept, **results["scenarios"]}
    plotted = ("first", "stampede")
    plot_name = None
    if any(name in results["scenarios"] for name in plotted):
        problem = report.plot(merged["scenarios"], out_dir / PLOT_NAME)
        if problem:
            common.log(problem)
        else:
            plot_name = PLOT_NAME
    elif any(name in merged["scenarios"] for name in plotted) and (out_dir / PLOT_NAME).exists():
        plot_name = PLOT_NAME
    markdown.write_text(report.render(merged, plot_name))
    common.log(f"wrote {markdown}" + (f" and {out_dir / PLOT_NAME}" if plot_name else ""))


def print_summary(results: dict[str, Any]) -> None:
    print(f"\nbench finished in {results['seconds']:.0f} s")
    for target, measured, ok in report.evaluate(results["scenarios"]):
        verdict = "not run" if ok is None else "pass" if ok else "FAIL"
        print(f"  [{verdict:>7}] {target}: {measured}")
    for name, error in results["errors"].items():
        print(f"  [  error] {name}: {error}")
    sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
