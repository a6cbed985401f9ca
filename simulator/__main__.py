"""``python -m simulator``: serve the simulated User Profile API in the foreground until SIGINT/SIGTERM.

With ``--push-url`` it also posts Cohort Webhooks batches there, as Amplitude would (see :mod:`simulator.pushes`).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from simulator import AmplitudeSimulator


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, serve, and stop cleanly on SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m simulator", description="Serve a simulated Amplitude profile API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--secret-key",
        default=os.environ.get("SIMULATOR_SECRET_KEY", "sim-secret-key"),
        help="the Api-Key clients must send (default: $SIMULATOR_SECRET_KEY or sim-secret-key)",
    )
    parser.add_argument("--rate-limit", type=int, default=600, help="requests per minute; 0 for none (600)")
    parser.add_argument("--latency-ms", type=float, default=0, help="added to every profile request (0)")
    parser.add_argument("--unknown-user-status", type=int, default=200, help="status of the unknown-user error (200)")
    pushes = parser.add_argument_group("cohort webhooks", "POST cohort batches to a receiver, as Amplitude does")
    pushes.add_argument("--push-url", help="the receiver, e.g. http://127.0.0.1:8000/v1/webhooks/amplitude/cohorts")
    pushes.add_argument(
        "--push-secret",
        default=os.environ.get("SIMULATOR_PUSH_SECRET"),
        help="sent as Authorization: Bearer SECRET (default: $SIMULATOR_PUSH_SECRET)",
    )
    pushes.add_argument("--push-cohorts", default="cohort_vip", help="comma-separated cohort ids (cohort_vip)")
    pushes.add_argument("--push-users", type=int, default=5000, help="users user-0.. in each cohort's population")
    pushes.add_argument("--push-every", type=float, default=0, help="seconds between later rounds of changes (0: none)")
    args = parser.parse_args(argv)
    if args.push_url and not args.push_secret:
        parser.error("--push-url needs --push-secret (or $SIMULATOR_PUSH_SECRET)")

    sim = AmplitudeSimulator(
        secret_key=args.secret_key,
        host=args.host,
        port=args.port,
        rate_limit_per_minute=args.rate_limit or None,
        latency_ms=args.latency_ms,
        unknown_user_status=args.unknown_user_status,
    )
    stop = threading.Event()
    # The handlers only set a flag: stopping the server from a signal handler could deadlock.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sim.start()
    print(f"Amplitude simulator listening on {sim.url} (rate limit {args.rate_limit or 'none'}/min)", flush=True)
    if args.push_url:
        cohorts = tuple(part.strip() for part in args.push_cohorts.split(",") if part.strip())
        sim.push_cohorts(args.push_url, args.push_secret, cohorts, args.push_users, args.push_every)
        print(f"pushing cohorts {', '.join(cohorts)} to {args.push_url}", flush=True)
    try:
        while not stop.wait(1.0):  # a timed wait lets the main thread run the signal handlers
            pass
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
