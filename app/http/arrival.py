"""When a request reached the service, so its deadline and logged duration count from then.

Time spent in front of the app is Braze's time too. The front (nginx: ``make run-prod``,
the front image) stamps each request with ``X-Request-Start: t=<epoch seconds>`` (its
``$msec``) as it receives it, and that stamp is believed only from a peer named in
``FORWARDED_ALLOW_IPS``. Without it (gunicorn served directly, the test server), the
request arrived when the app first saw it: under the gevent worker a request is read by
its own greenlet as soon as its bytes arrive, so little waits unseen before that.
Ages are measured on the real clock and applied to the app's clock, so a fake clock in
tests stays consistent.
"""

from __future__ import annotations

import time
from typing import Any

from app.clock import Clock
from app.http.security import IPNetwork, address_in

#: Where the WSGI middleware leaves the arrival time (the app clock's monotonic reading).
ARRIVAL_KEY = "profile_proxy.arrival"

#: The oldest front stamp believed: anything older is a clock problem, not a queue.
MAX_BELIEVED_AGE_SECONDS = 30.0


def front_age(header: str | None, now: float) -> float:
    """Seconds between the front's stamp (``t=1764400000.123``, or a bare number) and *now* (epoch)."""
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
    age = now - started
    return age if 0.0 < age <= MAX_BELIEVED_AGE_SECONDS else 0.0


class ArrivalStamp:
    """The monotonic arrival time of a request on *clock*."""

    def __init__(self, clock: Clock, proxies: tuple[IPNetwork, ...]) -> None:
        self._now = clock.monotonic
        self.proxies = proxies

    def __call__(self, environ: dict[str, Any]) -> float:
        header = environ.get("HTTP_X_REQUEST_START")
        age = 0.0
        if header and address_in(environ.get("REMOTE_ADDR"), self.proxies):
            age = front_age(header, time.time())
        return self._now() - age
