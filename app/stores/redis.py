"""The shared tier: one Redis connection pool, with health tracking so an outage costs little.

Redis is reached at ``REDIS_URL``, or through Redis Sentinel (``REDIS_SENTINELS``,
``REDIS_SENTINEL_SERVICE``): redis-py's :class:`redis.sentinel.Sentinel` asks the
sentinels for the service's primary each time it opens a connection, so after a
failover the next connection goes to the new primary. A connection still open to the
old one fails (or is told it now serves a replica, which redis-py turns into a
connection error); the tier then pauses as after any failure and reconnects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from redis.sentinel import Sentinel

from app.clock import SYSTEM_CLOCK, Clock
from app.stores.shared import SharedUnavailable

if TYPE_CHECKING:
    from app.settings import Settings

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

    def __init__(
        self,
        url: str | None,
        timeout: float,
        prefix: str = "ampproxy",
        clock: Clock = SYSTEM_CLOCK,
        sentinels: Sequence[tuple[str, int]] = (),
        service: str | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 0,
            "retry_on_timeout": False,
        }
        self.sentinel: Sentinel | None = None
        if sentinels:
            if not service:
                raise ValueError("a Sentinel service name is required with sentinels")
            # The sentinels are asked with the same short timeouts: a sentinel that is down is
            # skipped for the next, as redis-py does, and none is waited on past the timeout.
            self.sentinel = Sentinel(list(sentinels), sentinel_kwargs=dict(options), **options)
            self.client = self.sentinel.master_for(service, max_connections=256)
        elif url:
            self.client = redis.Redis.from_url(url, max_connections=256, **options)
        else:
            raise ValueError("a Redis URL or sentinels are required")
        self.prefix = prefix
        self._now = clock.monotonic
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._healthy = True
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> RedisTier | None:
        """The tier *settings* name (``REDIS_URL`` or ``REDIS_SENTINELS``), or None without Redis."""
        if settings.redis_sentinels:
            return cls(None, settings.redis_timeout_seconds, clock=clock, sentinels=settings.redis_sentinels,
                       service=settings.redis_sentinel_service)  # fmt: skip
        if settings.redis_url:
            return cls(settings.redis_url, settings.redis_timeout_seconds, clock=clock)
        return None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def healthy(self) -> bool:
        return self._healthy

    def available(self) -> bool:
        """True unless a recent failure says to leave Redis alone for now."""
        return self._healthy or self._now() >= self._down_until

    def retry_now(self) -> None:
        """End the pause after a failure: the next command tries Redis again."""
        with self._lock:
            self._down_until = 0.0

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
        self._answered()
        return result

    def _answered(self) -> None:
        if not self._healthy:
            with self._lock:
                if not self._healthy:
                    self._healthy = True
                    log.warning("redis is reachable again; sharing cache and budget through it")

    def ping(self) -> bool:
        """Check Redis now, ignoring any pause (for readiness probes); an answer ends the pause."""
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        self._answered()
        return True

    def script(self, source: str) -> Any:
        return self.client.register_script(source)

    def close(self) -> None:
        self.client.close()
        if self.sentinel is not None:
            self.sentinel.close()

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
