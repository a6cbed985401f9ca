"""A local imitation of Amplitude's User Profile API, for the demo, tests and benchmarks."""

from __future__ import annotations

from simulator.server import AmplitudeSimulator, RecordedRequest

__all__ = ["AmplitudeSimulator", "RecordedRequest"]
