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


class SharedBusy(SharedUnavailable):
    """The tier is there but stayed busy past the wait (other processes were writing): this
    operation did not happen, nothing is lost, and the tier is not taken for down."""


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
    ``grant_id`` names the grant in the log. ``merges`` are grants this process knows of
    that the log may lack (made while cut off, or lost with a Redis that restarted
    empty), each as its id and seconds before now: a grant already in the log is not
    counted twice. ``remembered_fleet`` is the fleet size this process knew before an
    outage (0: none to remember). ``process_id`` is ``MACHINE/TOKEN`` when the process
    has a machine (see :mod:`app.machine`): the Redis tier answers whether every process
    it has heard from lately, and every grant in its window, is of that machine.

    For a machine's SQLite file beside Redis (:class:`app.stores.sqlite_machine.MachineFile`):
    ``episode`` is the episode of the machine's going on without Redis under which this
    attempt admits (refused with :data:`ENDED` once it is over); ``carried`` is how many
    grants the fleet's log held at its last answer, which a file that does not know what
    was spent before it counts instead of a ramp.

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
    merges: tuple[tuple[str, float], ...] = ()
    episode: int | None = None
    carried: int | None = None
    now: float | None = None


#: :attr:`AdmitReply.granted` values. ``ENDED``: the machine's episode the attempt named is
#: over (Redis answers again): nothing was granted, ask the fleet's log.
GRANTED, REFUSED, BACKING_OFF, HEARTBEAT, ENDED = 1, 0, -1, 2, -2


@dataclass(frozen=True, slots=True)
class AdmitReply:
    """The log's answer: granted (``wait`` until the slot) or not (``wait`` until one is
    expected), the fleet's size and the grants in the window; ``alone`` (Redis only): every
    process heard from lately and every grant in the window is of the asking process's
    machine."""

    granted: int
    wait: float
    fleet: int
    used: int
    alone: bool = False


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

    def retry_now(self) -> None:
        """Forget the pause after a failure: the next operation tries the tier again."""
        ...

    def back_off(self, seconds: float) -> None:
        """Refuse every admission for *seconds* (Amplitude answered 429)."""
        ...

    def close(self) -> None: ...
