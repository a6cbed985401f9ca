"""``python -m simulator``: serve the simulated User Profile API in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from simulator import AmplitudeSimulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a simulated Amplitude User Profile API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--secret-key", default=os.environ.get("SIMULATOR_SECRET_KEY", "sim-secret-key"))
    parser.add_argument("--rate-limit", type=int, default=600, help="requests per minute; 0 for none")
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args(argv)

    sim = AmplitudeSimulator(
        secret_key=args.secret_key,
        host=args.host,
        port=args.port,
        rate_limit_per_minute=args.rate_limit or None,
        latency_ms=args.latency_ms,
    )
    # shutdown() must come from another thread than the one serving.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=sim.stop).start())
    print(f"Amplitude simulator listening on {sim.url} (limit {args.rate_limit or 'none'}/min)", file=sys.stderr)
    try:
        sim.serve_forever()
    except KeyboardInterrupt:
        sim.stop()


if __name__ == "__main__":
    main()
