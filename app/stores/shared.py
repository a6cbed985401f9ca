"""The shared tier: what every process of a fleet keeps in one place, whatever holds it.

:class:`app.stores.profiles.ProfileStore` (profiles, not-founds, single-flight claims)
and :class:`app.budget.UpstreamBudget` (the admission log, 429 back-off, fleet
heartbeats) run the operations below against Redis (:mod:`app.stores.redis_shared`:
one Lua script each, shared by every machine) or against SQLite
(:mod:`app.stores.sqlite`: one transaction each, shared by the processes of one
machine). Each operation is atomic across processes, and each raises
:class:`SharedUnavailable` rather than wait long: callers then carry on with local state.

Keys are logical names (``p:KEY``, ``lock:KEY``, ``failed:KEY``); a tier may prefix them.
Values are bytes; a stored profile is ``b"<fetched_at>\\n<json>"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.clock import Deadline


class SharedUnavailable(Exception):
    """The shared tier could not answer in time; callers carry on with local state."""


@dataclass(frozen=True, slots=True)
class ClaimReply:
    """A claim taken (with what was stored at that moment), or the holder's token."""

    taken: bool
    entry: bytes | None = None
    negative: bytes | None = None
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """One admission attempt (or heartbeat) against the shared log of grants.

    ``bulk`` selects the priority rule's side (see :mod:`app.budget`): a live attempt
    reserves a slot within ``max_wait``, a bulk one is granted a slot now or refused.
    ``merge_ages`` are grants this process made while cut off, as seconds before now,
    to write into the log; ``remembered_fleet`` is the fleet size this process knew
    before an outage (0: none to remember).

    ``now`` is for tests only: the wall time the tier takes as now, instead of its own
    clock (Redis's ``TIME``, which a test cannot move; the SQLite tier's clock). The
    service never sets it: the processes of a fleet must share one clock, the tier's.
    """

    limit: int
    window: float
    max_wait: float
    bulk: bool
    process_id: str
    grant_id: str
    heartbeat_timeout: float
    fleet_horizon: float
    heartbeat_only: bool = False
    remembered_fleet: int = 0
    merge_ages: tuple[float, ...] = ()
    now: float | None = None


#: :attr:`AdmitReply.granted` values.
GRANTED, REFUSED, BACKING_OFF, HEARTBEAT = 1, 0, -1, 2


@dataclass(frozen=True, slots=True)
class AdmitReply:
    """The log's answer: granted (``wait`` until the slot) or not (``wait`` until one is
    expected), the fleet's size and the grants in the window."""

    granted: int
    wait: float
    fleet: int
    used: int


class SharedTier(Protocol):
    """The operations both tiers implement, each atomic across the processes sharing it."""

    name: str

    def available(self) -> bool:
        """False while a recent failure says to leave the tier alone for a moment."""
        ...

    def get(self, keys: Sequence[str], deadline: Deadline | None = None) -> list[bytes | None]:
        """The values stored under *keys* (``None`` where absent or expired), as of one moment."""
        ...

    def claim(self, lock: str, token: str, ttl_ms: int, entry: str, negative: str) -> ClaimReply:
        """Take *lock* for *ttl_ms* if free, returning *entry* and *negative*; else name its holder."""
        ...

    def publish(self, key: str, value: bytes, ttl_ms: int, lock: str, token: str) -> None:
        """Store *value* under *key*, then release *lock* if *token* still holds it."""
        ...

    def abandon(self, lock: str, note: str, token: str, failure: str, note_ms: int) -> None:
        """Release *lock* if *token* holds it, leaving ``token\\nfailure`` under *note* (unless empty)."""
        ...

    def admit(self, request: AdmitRequest) -> AdmitReply:
        """Heartbeat, merge, and take a slot in the shared log if one comes within ``max_wait``."""
        ...

    def leave_fleet(self, process_id: str) -> None:
        """Stop counting *process_id* in the fleet."""
        ...

    def back_off(self, seconds: float) -> None:
        """Refuse every admission for *seconds* (Amplitude answered 429)."""
        ...

    def close(self) -> None: ...
