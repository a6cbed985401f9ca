"""A local imitation of Amplitude's User Profile API, for the demo, tests and benchmarks.

``AmplitudeSimulator`` serves ``GET /v1/userprofile`` with deterministic data per identity
(the rules are in :mod:`simulator.data`), a per-minute rate limit, injectable faults, and a
record of every profile request; ``python -m simulator`` serves it in the foreground.
"""

from __future__ import annotations

from simulator.server import FAULT_MODES, AmplitudeSimulator, Fault, RecordedRequest

__all__ = ["FAULT_MODES", "AmplitudeSimulator", "Fault", "RecordedRequest"]
