"""``python -m simulator``: serve the simulated User Profile API in the foreground until SIGINT/SIGTERM."""

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
    args = parser.parse_args(argv)

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
    try:
        while not stop.wait(1.0):  # a timed wait lets the main thread run the signal handlers
            pass
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
