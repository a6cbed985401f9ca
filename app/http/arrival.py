"""When a request reached the service, so its deadline and logged duration count from then.

Time spent queued for a worker thread is Braze's time too. Two witnesses, the earliest
believed: the front proxy's ``X-Request-Start: t=<epoch seconds>`` (nginx's ``$msec``),
only from a peer named in ``FORWARDED_ALLOW_IPS``, and the moment gunicorn's worker
queued the request for a thread (:class:`app.http.worker.JsonErrorThreadWorker` stamps
it). Without either (a test server), the request arrived when the app first saw it.
Ages are measured on the real clock and applied to the app's clock, so a fake clock in
tests stays consistent.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from app.clock import Clock
from app.http.security import IPNetwork, address_in

#: Where the WSGI middleware leaves the arrival time (the app clock's monotonic reading).
ARRIVAL_KEY = "profile_proxy.arrival"

#: The oldest front stamp believed: anything older is a clock problem, not a queue.
MAX_BELIEVED_AGE_SECONDS = 30.0

_queued = threading.local()


def mark_queued(stamp: float | None) -> None:
    """Record (on the thread about to handle a request) when gunicorn queued it (time.monotonic)."""
    _queued.at = stamp


def _queued_age() -> float:
    stamp = getattr(_queued, "at", None)
    return max(0.0, time.monotonic() - stamp) if stamp is not None else 0.0


def _front_age(header: str | None) -> float:
    """Seconds since the front received the request, from ``t=1764400000.123`` (or a bare number)."""
    if not header:
        return 0.0
    value = header.strip()
    if value.startswith("t="):
        value = value[2:]
    try:
        started = float(value)
    except ValueError:
        return 0.0
    if started > 1e12:  # microseconds, as some proxies send
        started /= 1e6
    age = time.time() - started
    return age if 0.0 < age <= MAX_BELIEVED_AGE_SECONDS else 0.0


class ArrivalStamp:
    """The monotonic arrival time of a request on *clock*."""

    def __init__(self, clock: Clock, proxies: tuple[IPNetwork, ...]) -> None:
        self._now = clock.monotonic
        self.proxies = proxies

    def __call__(self, environ: dict[str, Any]) -> float:
        age = _queued_age()
        header = environ.get("HTTP_X_REQUEST_START")
        if header and address_in(environ.get("REMOTE_ADDR"), self.proxies):
            age = max(age, _front_age(header))
        return self._now() - age
