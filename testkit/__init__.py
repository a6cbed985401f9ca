"""What the test suite and the benchmark harness share: processes, ports, a fake clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = "") -> T:
    """Poll *check* until it returns something truthy (returned), failing after *timeout* seconds.

    For waiting on what a test really waits for (a log line, a call count), never a guessed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        time.sleep(interval)
