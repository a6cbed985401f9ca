"""The shared tier: one Redis connection pool, with health tracking so an outage costs little."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from app.clock import SYSTEM_CLOCK, Clock
from app.stores.shared import SharedUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: After a failure, how long to serve without Redis before trying it again.
RETRY_AFTER_FAILURE_SECONDS = 1.0


class RedisUnavailable(SharedUnavailable):
    """Redis could not answer in time; callers carry on with local state."""


class RedisTier:
    """Run Redis commands with short timeouts; after a failure, skip Redis for a moment.

    Skipping (instead of trying every request) keeps an outage from adding a socket
    timeout to every response; the first call after the pause tries again, so the
    service returns to Redis without a restart.
    """

    def __init__(self, url: str, timeout: float, prefix: str = "ampproxy", clock: Clock = SYSTEM_CLOCK) -> None:
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            retry_on_timeout=False,
            max_connections=256,
        )
        self.prefix = prefix
        self._now = clock.monotonic
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._healthy = True
        self.last_error: str | None = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def healthy(self) -> bool:
        return self._healthy

    def available(self) -> bool:
        """True unless a recent failure says to leave Redis alone for now."""
        return self._healthy or self._now() >= self._down_until

    def run(self, operation: Callable[[redis.Redis], T]) -> T:
        """Run *operation* against the client.

        :raises RedisUnavailable: Redis is paused after a failure, or failed now.
        """
        if not self.available():
            raise RedisUnavailable(self.last_error or "redis unavailable")
        try:
            result = operation(self.client)
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            raise RedisUnavailable(str(exc)) from None
        if not self._healthy:
            with self._lock:
                if not self._healthy:
                    self._healthy = True
                    log.warning("redis is reachable again; sharing cache and budget through it")
        return result

    def ping(self) -> bool:
        """Check Redis now, ignoring any pause (for readiness probes)."""
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        return True

    def script(self, source: str) -> Any:
        return self.client.register_script(source)

    def close(self) -> None:
        self.client.close()

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = self._now() + RETRY_AFTER_FAILURE_SECONDS
            self.last_error = type(exc).__name__
            if self._healthy:
                self._healthy = False
                # No URL in the message: it may hold a password.
                log.warning(
                    "redis unavailable (%s); serving from local cache and local budget share", type(exc).__name__
                )
