"""Who may call: a network allowlist, and a brake on repeated authentication failures."""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading

from cachetools import TTLCache

from app import braze_ranges
from app.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """``10.0.0.0/8,2001:db8::/32`` style entries as networks (a bare address is a /32 or /128).

    A ``braze:US-01`` entry stands for the addresses Braze publishes for that cluster.
    """
    return tuple(ipaddress.ip_network(cidr, strict=False) for entry in cidrs for cidr in braze_ranges.resolve(entry))


class NetworkAllowlist:
    """Callers' addresses that may use the service; empty means everyone."""

    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        self.networks = networks

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, address: str | None) -> bool:
        return not self.networks or address_in(address, self.networks)


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as text (a zone index dropped, an IPv4-mapped IPv6 address as IPv4), or None.

    Remembered: a request reads its peer's and its client's address several times, and
    Braze sends from a few hundred addresses (``ipaddress`` takes tens of microseconds each).
    """
    try:
        ip = ipaddress.ip_address((text or "").strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def address_in(address: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether *address* is in one of *networks* (never, for something that is not an address)."""
    ip = parse_ip(address)
    return ip is not None and any(ip in network for network in networks)


class FailureBrake:
    """Count authentication failures per address; past *limit* a minute, refuse failures at once.

    Only failing attempts are refused: Braze sends from shared addresses, so locking an
    address out entirely would let one misconfigured template (or another Braze customer)
    block every campaign sent from it. Refused attempts skip the key comparison and the
    per-failure log line, which keeps a guessing loop cheap for us and noisy in metrics.
    """

    def __init__(self, limit: int, window: float = 60.0, clock: Clock = SYSTEM_CLOCK) -> None:
        self.limit = limit
        self.window = window
        self._failures: TTLCache[str, int] = TTLCache(maxsize=10_000, ttl=window, timer=clock.monotonic)
        self._lock = threading.Lock()

    def blocked(self, address: str) -> bool:
        with self._lock:
            return self.limit > 0 and self._failures.get(address, 0) >= self.limit

    def record_failure(self, address: str) -> int:
        with self._lock:
            count = self._failures.get(address, 0) + 1
            # Re-setting restarts the window: a steady trickle stays braked.
            self._failures[address] = count
            return count
