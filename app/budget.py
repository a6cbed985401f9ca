"""The upstream budget: never more than the limit in any window, every slot used, live work first.

Admission is exact: a sliding log of grants (:class:`app.core.window.SlidingWindow`),
kept in the shared tier when there is one (:mod:`app.stores.shared`: Redis, one Lua
script, for every process of every instance; or the machine's SQLite file, one
transaction, for every process of one machine), so the processes share one log. The
window is 60 s plus the connect timeout: a granted call reaches Amplitude within that
time or not at all, so no 60-second window *as Amplitude counts arrivals* holds more
than the limit.

**The priority rule.** Bulk work is what callers named in ``BULK_CALLERS`` ask for, and
background refreshes; everything else is live. Each attempt is decided by
:func:`app.core.window.decide`, in the process (:class:`~app.core.window.SlidingWindow`),
in the SQLite transaction (:mod:`app.stores.sqlite_admission`) and, line for line, in
the Redis script (:mod:`app.stores.redis_shared`), from the log (``limit`` the ceiling,
``W`` the window) and two marks kept beside it: the latest slot granted to a live
request, and when bulk work may next be granted one.

- A live request is given the earliest slot the limit allows, given the grants already
  made, reservations included: now while the window holds fewer than the limit, else
  the moment the grant ``limit`` places from the newest leaves the window. If that
  comes within its wait, the slot is its own (a stamp later than now: a reservation)
  and it sleeps until then; if not, it is refused at once.
- A bulk request never reserves: it is granted a slot now or told when to ask again.
  It is refused while a live request waits (the latest live slot is later than now),
  while the window is full, and until its pace allows: bulk grants keep to the budget's
  steady rate, one per ``W / limit`` seconds (to the millisecond: ``PACE_SLACK_SECONDS``,
  the shortest wait a refusal names). Each makes the next one due a step after
  this one was due, so a caller that asks a moment late (up to half a step) keeps its
  turn and the pace does not drift below the rate; after a longer pause the pace starts
  again from the grant.

What it promises, for every interleaving of live and bulk requests across the
processes sharing a log (``tests/unit/test_priority.py`` checks each, on all three):

- **(a) Exact.** No window of ``W`` seconds holds more than the limit.
- **(b) Live first.** A live request gets the earliest slot the limit allows given the
  grants already made, and no bulk request, waiting or arriving later, is granted a slot
  ahead of it or in its place: while any live request waits, no bulk request is granted
  one. So a live request that finds the window full gets the next slot that frees within
  its wait, whatever bulk work is doing. (The reservations in the log keep the window
  full until the earliest of them comes; the latest live slot keeps bulk work out as
  well when the ceiling rises under a waiting request, a process gone quiet being heard
  again.) A live request may still wait longer than it would have with no bulk work at
  all: a slot bulk work took while no live request waited is one a later live request
  could have used. No rule avoids that for every history, short of leaving slots idle
  in case live work comes.
- **(c) Nothing idle.** Bulk work is refused only while a live request waits, while the
  window is full, or until its pace allows. So when bulk work asks without pause for two
  windows and no live request is granted a slot in the first, the second ends holding
  the limit, up to one slot.

Why paced, and not every free slot the instant it frees: on an idle window that would
take the whole limit at once, and the log would stay one clump, freeing everything at
once once a window and nothing in between. A live request in between (a Braze send that
starts just after a warm-up) would find the window full for up to a whole window, and
no priority can give it a slot that does not free. Paced, a slot frees every step, each
going first to a waiting live request, and nothing is lost: a paced run fills an idle
window in exactly one window. Live requests are never paced; a burst of them into free
capacity takes it at once, and when that clump leaves the window bulk work takes its
slots back at the steady rate rather than repeating the clump every window. Background
refreshes ask once and never wait: of a burst of stale hits, one a step is refreshed and
the others are answered stale and refreshed at a later hit.

A live request may wait for its slot as long as its deadline leaves time for the call,
at most ``BUDGET_MAX_WAIT_SECONDS`` (:mod:`app.admission`): at the steady rate a slot
frees every ``W / limit`` seconds (0.5 s at 120 a minute), so a live request that finds
the window full reaches the next one. Waiting holds no thread under the gevent worker.

When the shared tier cannot be reached, there are two cases.

- **The machine was the whole fleet** (Redis's last answer said every process heard from
  lately, and every grant still in the window, was of this machine; see
  :mod:`app.machine`): the machine's processes go on at once through the machine's
  SQLite file, which holds a copy of every grant they were given through Redis, with
  the same rule, exactly across them. When Redis answers again, the grants made
  meanwhile are written back into it before any process uses a grant from it.
- **Otherwise** (several machines; or no machine file) a process falls back to its share
  of the fleet (``limit // fleet``, the fleet counted by heartbeats in the tier), and
  only from one window (plus the heartbeat timeout) after it last reached the tier: by
  then nothing it or anyone else granted through the tier can share a window with its
  own grants, and the processes that still reach it hold back the shares of the ones
  that went quiet. Within its share the same rule holds. A process cut off for longer
  than ``FLEET_HORIZON_SECONDS`` stops calling Amplitude: by then the others no longer
  reserve its share.

After any outage a process writes every grant of its own still in the window back into
the tier, by id: one the tier holds already is counted once, and one it lost (Redis
restarted empty, or failed over before a replica had it) is counted again.
:meth:`UpstreamBudget.mode` says which case is in force (``MODES``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

from app.clock import SYSTEM_CLOCK, Clock
from app.core.window import PACE_SLACK_SECONDS, SlidingWindow
from app.errors import RateLimited
from app.machine import MachineLog
from app.stores.shared import BACKING_OFF, ENDED, GRANTED, AdmitRequest, SharedBusy, SharedTier, SharedUnavailable

log = logging.getLogger(__name__)

LIVE, BULK = "live", "bulk"

#: A process not heard from for this long may be granting on its own share.
HEARTBEAT_TIMEOUT_SECONDS = 5.0
#: How long a silent process keeps its share reserved (and may use it on its own).
FLEET_HORIZON_SECONDS = 300.0
#: How long to wait while the machine's file changes hands between Redis and itself.
SETTLE_SECONDS = 0.02
#: Grants written back into the tier per call (a hand-back may carry a whole window).
MERGE_BATCH = 500

#: What :meth:`UpstreamBudget.mode` answers: through the shared log (Redis, or the SQLite
#: file without Redis); through the machine's file while Redis is away; on this process's
#: share while cut off; not calling Amplitude while cut off (before the share is safe, or
#: past the horizon); alone in its process, with no shared tier at all.
SHARED, MACHINE, OWN_SHARE, STOPPED, PROCESS = "shared", "machine", "own_share", "stopped", "process"
MODES = (SHARED, MACHINE, OWN_SHARE, STOPPED, PROCESS)


class NoSlot(Exception):
    """No slot now; *seconds* until asking again is worth it (exact, unlike ``Retry-After``)."""

    #: Worth asking again within a live request's wait too: the machine's file is changing hands.
    settling = False

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = max(PACE_SLACK_SECONDS, seconds)


class Settling(NoSlot):
    """The machine's file is changing hands between Redis and itself: ask again in a moment."""

    settling = True


@dataclass(frozen=True, slots=True)
class Grant:
    """A slot for one upstream call: how long the caller waited for it, and its class."""

    waited: float
    caller_class: str


class UpstreamBudget:
    """Slots for Amplitude calls: one log in the shared tier (with the machine's file beside
    Redis, see :mod:`app.machine`), else this process's share."""

    def __init__(
        self,
        per_minute: int,
        shares: int,
        shared: SharedTier | None = None,
        clock: Clock = SYSTEM_CLOCK,
        window: float = 60.0,
        machine: MachineLog | None = None,
    ) -> None:
        self.per_minute = per_minute
        self.window = window
        self.shared = shared
        self.machine = machine
        self.min_fleet = max(1, shares)
        self._clock = clock
        self._now = clock.monotonic
        self._lock = threading.Lock()
        self._backoff_until = 0.0
        token = secrets.token_hex(6)
        # MACHINE/TOKEN: Redis tells whether the fleet is this machine's processes alone.
        self.process_id = f"{machine.identity}/{token}" if machine is not None else token
        self._grant_ids = itertools.count()
        started = self._now()
        # Without a shared tier: this process's share, ramping up as if its predecessor (a
        # restart) had spent the limit evenly over the last window.
        self._local = SlidingWindow(per_minute // self.min_fleet, window, clock)
        if shared is None:
            self._local.occupy(self._local.limit, spread=window)
        # With one: what the shared log last said, and the fallback while it is away.
        self._fleet = self.min_fleet
        self._last_shared = started  # until the tier answers, assume it just did (strictest)
        self._reached = True
        self._alone = False
        self._used = 0
        self._fallback: SlidingWindow | None = None
        # This process's own grants in the window (stamp, id), to write back after an outage.
        self._own: deque[tuple[float, str]] = deque()
        self._remerge = False
        self._recovered_at = float("-inf")
        self._heartbeat: threading.Thread | None = None
        self._closed = threading.Event()
        if shared is not None:
            # Counted in the fleet from the start, not from the first miss: the others'
            # fallback shares are computed from the fleet's size.
            self._start_heartbeat()

    def close(self) -> None:
        """Stop the heartbeat and leave the fleet, so the others need not hold back this share."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.shared is not None and self._heartbeat is not None:
            for tier in (self.shared, self.machine.file if self.machine is not None else None):
                try:
                    if tier is not None:
                        tier.leave_fleet(self.process_id)
                except SharedUnavailable:
                    pass

    # -- admission -------------------------------------------------------------------

    def acquire(self, max_wait: float, bulk: bool = False) -> Grant:
        """Take a slot within *max_wait* seconds (sleeping until it comes) or be turned away.

        A live caller reserves the slot it will wait for. A bulk caller never holds a
        reservation (one would stand before a live request arriving later): it sleeps until
        it may ask again and asks again, as long as *max_wait* allows. Either asks again
        while the machine's file changes hands (a moment).

        :raises RateLimited: in a 429 back-off, or no slot within *max_wait*;
            ``retry_after`` says when one is expected.
        """
        started = self._now()
        while True:
            try:
                wait = self.try_acquire(max_wait, bulk)
            except NoSlot as refused:
                waited = self._now() - started
                if not (bulk or refused.settling) or waited + refused.seconds > max_wait:
                    raise RateLimited(retry_after=refused.seconds) from None
                self._clock.sleep(refused.seconds)
                continue
            if wait > 0:
                self._clock.sleep(wait)
            return Grant(self._now() - started, BULK if bulk else LIVE)

    def try_acquire(self, max_wait: float, bulk: bool = False) -> float:
        """One attempt under the priority rule, without sleeping: the seconds until the slot taken.

        A live caller's slot may be up to *max_wait* away (it is reserved: the caller sleeps
        until it); a bulk caller's is now, whatever *max_wait* says.

        :raises NoSlot: refused; ``seconds`` until asking again is worth it.
        """
        remaining_backoff = self._backoff_until - self._now()
        if remaining_backoff > 0:
            self._turn_away(remaining_backoff)
        max_wait = 0.0 if bulk else max_wait
        if self.shared is None:
            return self._acquire_local(self._local, max_wait, bulk)
        wait = self._acquire_shared(max_wait, bulk)
        if wait is None and self.machine is not None:
            wait = self._acquire_machine(self.machine, max_wait, bulk)
        if wait is None:
            wait = self._acquire_local(self._fallback_window(), max_wait, bulk)
        return wait

    def _acquire_local(self, window: SlidingWindow | None, max_wait: float, bulk: bool) -> float:
        if window is None:  # cut off from the shared tier too recently, or for too long
            self._turn_away(self._fallback_retry_after())
        decision = window.admit(max_wait, bulk)
        if decision.slot is None:
            self._turn_away(decision.wait)
        if window is not self._local:
            self._remember(self._now() + decision.wait, self._grant_id())
        return decision.wait

    def _grant_id(self) -> str:
        return f"{self.process_id}:{next(self._grant_ids)}"

    def _remember(self, stamp: float, grant_id: str) -> None:
        with self._lock:
            while self._own and self._own[0][0] <= stamp - self.window:
                self._own.popleft()
            self._own.append((stamp, grant_id))

    def _acquire_shared(self, max_wait: float, bulk: bool) -> float | None:
        """A slot from the shared log; None when the tier did not answer (cut off)."""
        machine = self.machine
        ticket = None
        if machine is not None:
            ticket = machine.ticket()
            if not ticket.settled:
                # The machine admits through its file: only if Redis answers is it handed back.
                if self._run_shared(0.0, False, heartbeat_only=True) is None:
                    return None
                machine.settle(self.window, self._merge_back, self._clock.time())
                ticket = machine.ticket()
                if not ticket.settled:
                    raise Settling(SETTLE_SECONDS)  # another process is handing back
        grant_id = self._grant_id()
        result = self._run_shared(max_wait, bulk, heartbeat_only=False, grant_id=grant_id)
        if result is None:
            return None
        granted, wait = result
        if granted == BACKING_OFF:  # a 429 back-off recorded by another process
            self._backoff_until = max(self._backoff_until, self._now() + wait)
        if granted <= 0:
            self._turn_away(wait)
        if machine is not None and ticket is not None:
            if not machine.confirm(ticket, self._clock.time() + wait, grant_id, self.window):
                raise Settling(SETTLE_SECONDS)  # the machine's state changed meanwhile: not used
        self._remember(self._now() + wait, grant_id)
        return wait

    def _request(
        self, max_wait: float, bulk: bool, heartbeat_only: bool, grant_id: str, *, remembered_fleet: int = 0,
        merges: tuple[tuple[str, float], ...] = (), episode: int | None = None, carried: int | None = None,
    ) -> AdmitRequest:  # fmt: skip
        return AdmitRequest(
            limit=self.per_minute, window=self.window, max_wait=max_wait, bulk=bulk, process_id=self.process_id,
            grant_id=grant_id, heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS, fleet_horizon=FLEET_HORIZON_SECONDS,
            heartbeat_only=heartbeat_only, remembered_fleet=remembered_fleet, merges=merges, episode=episode,
            carried=carried,
        )  # fmt: skip

    def _run_shared(
        self, max_wait: float, bulk: bool, heartbeat_only: bool, grant_id: str = ""
    ) -> tuple[int, float] | None:
        if self.shared is None:
            return None
        self._start_heartbeat()
        with self._lock:
            now = self._now()
            # After an outage, write back every own grant still in the window (by id: Redis
            # may have restarted empty or failed over; if not, each is counted once).
            remerge = self._remerge
            merges = (
                tuple((grant_id, now - stamp) for stamp, grant_id in self._own if stamp > now - self.window)
                if remerge
                else ()
            )
            # For a horizon after an outage, the fleet known before it still counts.
            recent_outage = remerge or now - self._recovered_at < FLEET_HORIZON_SECONDS
            remembered_fleet = self._fleet if recent_outage else 0
        request = self._request(max_wait, bulk, heartbeat_only, grant_id,
                                remembered_fleet=remembered_fleet, merges=merges)  # fmt: skip
        try:
            reply = self.shared.admit(request)
        except SharedBusy:
            return None  # contended: this attempt did not happen, and the log lost nothing
        except SharedUnavailable:
            with self._lock:
                self._remerge = True
                self._reached = False
            return None
        with self._lock:
            if remerge:
                self._recovered_at = self._now()
            self._remerge = False
            self._reached = True
            self._last_shared = self._now()
            self._fleet = max(1, reply.fleet)
            self._used = reply.used
            self._alone = reply.alone
            self._fallback = None
        return reply.granted, reply.wait

    # -- the machine's file, while Redis is away (see app.machine) ---------------------------

    def _acquire_machine(self, machine: MachineLog, max_wait: float, bulk: bool) -> float | None:
        """A slot from the machine's file under its episode; None when there is no episode to
        admit under (the fallback share applies)."""
        entered = machine.enter(self._alone)
        if entered is None:
            raise Settling(SETTLE_SECONDS)  # a hand-back to Redis is under way
        if not entered or machine.episode is None:
            return None
        grant_id = self._grant_id()
        try:
            reply = machine.admit(self._request(max_wait, bulk, False, grant_id, episode=machine.episode))
        except SharedUnavailable:
            return None
        self._used = reply.used
        if reply.granted == ENDED:  # back on Redis: ask it now, not after the pause
            machine.ended()
            if self.shared is not None:
                self.shared.retry_now()
            raise Settling(SETTLE_SECONDS)
        if reply.granted == BACKING_OFF:
            self._backoff_until = max(self._backoff_until, self._now() + reply.wait)
        if reply.granted != GRANTED:
            self._turn_away(reply.wait)
        self._remember(self._now() + reply.wait, grant_id)
        return reply.wait

    def _settle_machine(self, machine: MachineLog, reached: bool) -> None:
        """After a heartbeat: keep counted in the machine's file, and follow Redis's state."""
        if reached:
            machine.beat(self._request(0.0, False, True, "", carried=self._used))
            machine.settle(self.window, self._merge_back, self._clock.time())
            return
        machine.enter(self._alone)  # the whole machine switches at once, busy or not
        machine.beat(self._request(0.0, False, True, ""))

    def _merge_back(self, grants: list[tuple[str, float]]) -> bool:
        """Write *grants* (id, seconds before now) into the shared log; whether it took them all."""
        shared = self.shared
        if shared is None:
            return False
        try:
            for start in range(0, max(1, len(grants)), MERGE_BATCH):
                batch = tuple(grants[start : start + MERGE_BATCH])
                shared.admit(self._request(0.0, False, True, "", merges=batch))
        except SharedUnavailable:
            return False
        return True

    # -- cut off from the shared tier ------------------------------------------------------

    def _fallback_window(self) -> SlidingWindow | None:
        """This process's share while the shared tier is away, once it is safe to use; else None."""
        silent_for = self._now() - self._last_shared
        if silent_for < self.window + HEARTBEAT_TIMEOUT_SECONDS or silent_for > FLEET_HORIZON_SECONDS:
            return None
        with self._lock:
            if self._fallback is None:
                self._fallback = SlidingWindow(self.per_minute // max(self._fleet, self.min_fleet), self.window,
                                               self._clock)  # fmt: skip
            return self._fallback

    def _fallback_retry_after(self) -> float:
        silent_for = self._now() - self._last_shared
        if silent_for > FLEET_HORIZON_SECONDS:
            return self.window
        return max(1.0, self.window + HEARTBEAT_TIMEOUT_SECONDS - silent_for)

    def _start_heartbeat(self) -> None:
        """Keep this process counted in the fleet while it is idle (one daemon thread)."""
        if self._heartbeat is None:
            with self._lock:
                if self._heartbeat is None:
                    self._heartbeat = threading.Thread(target=self._beat, name="budget-heartbeat", daemon=True)
                    self._heartbeat.start()

    def heartbeat(self) -> None:
        """Tell the shared tier (and the machine's file) this process is alive; with a machine's
        file, switch to it or hand back to Redis as Redis answers (the heartbeat thread does
        this every few seconds)."""
        reached = self._run_shared(0.0, False, heartbeat_only=True) is not None
        if self.machine is not None:
            self._settle_machine(self.machine, reached)

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_TIMEOUT_SECONDS / 3):
            try:
                self.heartbeat()
            except Exception:  # never let the heartbeat die
                log.exception("budget heartbeat failed")

    # -- 429s and reporting --------------------------------------------------------------

    def back_off(self, seconds: float) -> None:
        """Stop calling Amplitude for *seconds*, in every process sharing the tier (or the machine's file)."""
        self._backoff_until = max(self._backoff_until, self._now() + seconds)
        log.warning("Amplitude answered 429: pausing upstream calls for %.0f s", seconds)
        for tier in (self.shared, self.machine.file if self.machine is not None else None):
            if tier is not None:
                try:
                    tier.back_off(seconds)
                except SharedUnavailable:
                    pass

    def _turn_away(self, seconds: float) -> NoReturn:
        raise NoSlot(seconds)

    def mode(self) -> str:
        """How this process admits now: one of ``MODES``."""
        if self.shared is None:
            return PROCESS
        if self.machine is not None and self.machine.episode is not None:
            return MACHINE
        if self._reached:
            return SHARED
        silent_for = self._now() - self._last_shared
        if self.window + HEARTBEAT_TIMEOUT_SECONDS <= silent_for <= FLEET_HORIZON_SECONDS:
            return OWN_SHARE
        return STOPPED

    def used(self) -> int:
        """Calls granted in the trailing window (the shared log's count when the tier or the machine's file answers)."""
        if self.shared is not None and self._fallback is None:
            return self._used
        window = self._local if self.shared is None else self._fallback
        return window.used() if window is not None else 0

    def tokens_left(self) -> float:
        """Slots still free in the trailing window."""
        limit = self._local.limit if self.shared is None else self.per_minute
        return float(max(0, limit - self.used()))


class CallerMissCaps:
    """A per-caller-key cap on upstream misses, so one key cannot spend everyone's budget.

    Off unless ``CALLER_MISS_LIMIT_PER_MINUTE`` is set. Each process holds its share of
    the cap (an abuse guard, not the budget: the budget above is the exact one).
    """

    def __init__(self, per_minute: int | None, shares: int, window: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.per_minute = per_minute
        self.shares = max(1, shares)
        self.window = window
        self._clock = clock
        self._caps: dict[str, SlidingWindow] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self.per_minute is not None

    def spend(self, caller: str) -> None:
        """Take one miss from *caller*'s allowance.

        :raises RateLimited: the caller's allowance for this window is spent.
        """
        if self.per_minute is None:
            return
        with self._lock:
            cap = self._caps.get(caller)
            if cap is None:
                cap = self._caps[caller] = SlidingWindow(max(1, self.per_minute // self.shares), self.window,
                                                         self._clock)  # fmt: skip
        if cap.reserve(0.0) is None:
            raise RateLimited(retry_after=cap.seconds_until_slot())
