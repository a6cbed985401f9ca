"""A machine that was the whole fleet goes on without Redis, exactly, through its own file.

With Redis, the fleet's log of grants is in Redis, and a process cut off from it cannot
know what the others granted: it waits a window and then spends only its share (see
:mod:`app.budget`). But when Redis's last answer said this machine was alone (every
process heard from lately, and every grant still in the window, of this machine), the
others are this machine's own processes, and they can go on together, exactly, through
the machine's SQLite file. That needs the file to hold every grant of the window at the
moment Redis goes away, and Redis to hold every grant made through the file before it
is asked again. :class:`MachineLog` keeps both, for one process:

- **Mirror.** Every grant Redis gives is copied into the file before it is used, with
  the grant's id. A copy is taken only if the machine's state is unchanged since before
  Redis was asked (:meth:`app.stores.sqlite_machine.MachineFile.mirror`); if it changed,
  the grant is not used (it stays in Redis's log: one slot lost, never one too many).
- **Episode.** When Redis fails and its last answer said alone, the process starts an
  *episode* in the file (or joins the one running: a process that has never reached
  Redis joins too, since the file says the machine was alone). Its admissions then go
  to the file, the same transaction and rule as the SQLite tier's, with the full limit.
- **Hand back.** The first process that reaches Redis again stops the episode in the
  file, writes every grant of the file's window into Redis (by id: one Redis holds
  already is counted once, and one Redis lost, restarted empty or failed over before
  replicating it, is counted again), and only then lets the machine use Redis grants.
  The others find the episode over at their next admission and go back to Redis.

Every process also beats in the file, so the file's count of the machine's processes is
current when an episode starts. What this cannot see: a machine that joins the fleet
while this one cannot reach Redis (a new machine started meanwhile, or one on the far
side of a network split). Its calls come on top of this machine's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from app.clock import SYSTEM_CLOCK, Clock
from app.stores.shared import AdmitReply, AdmitRequest, SharedUnavailable
from app.stores.sqlite_machine import AWAY, HANDING_BACK, QUIET, MachineFile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a process knows of the machine before it asks Redis for a grant.

    ``epoch``: the state last seen quiet, which the grant's copy is checked against.
    ``usable`` False: the file cannot be read; Redis's grant is used without a copy.
    ``settled`` False: the machine is in an episode or handing one back; do not ask Redis
    for a grant until this process has settled it (:meth:`MachineLog.settle`).
    """

    epoch: int = 0
    usable: bool = True
    settled: bool = True


class MachineLog:
    """One process's side of its machine's file beside Redis (see the module's docstring)."""

    def __init__(self, file: MachineFile, clock: Clock = SYSTEM_CLOCK) -> None:
        self.file = file
        self.identity = file.identity()
        self._now = clock.monotonic
        self._lock = threading.Lock()
        self._quiet_epoch: int | None = None
        #: The episode this process admits under; None while it admits through Redis.
        self.episode: int | None = None
        #: Until then (monotonic) this process may not start an episode: a grant of its own
        #: could not be copied into the file, which may lack it while it is in the window.
        self._uncopied_until = float("-inf")
        self._handing_back = threading.Lock()

    # -- while Redis answers ----------------------------------------------------------------

    def ticket(self) -> Ticket:
        """What this process knows before asking Redis for a grant (a read when it knows nothing)."""
        epoch = self._quiet_epoch
        if epoch is not None and self.episode is None:
            return Ticket(epoch)
        try:
            state = self.file.state()
        except SharedUnavailable:
            return Ticket(usable=False)
        if state.away != QUIET or self.episode is not None:
            return Ticket(settled=False)
        self._quiet_epoch = state.epoch
        return Ticket(state.epoch)

    def confirm(self, ticket: Ticket, stamp: float, grant_id: str, window: float) -> bool:
        """Copy a grant Redis gave (at wall time *stamp*) into the file; False: do not use it."""
        if ticket.usable:
            try:
                if self.file.mirror(stamp, grant_id, ticket.epoch):
                    return True
                self._quiet_epoch = None  # the state changed: read it again before the next grant
                return False
            except SharedUnavailable:
                pass
        with self._lock:  # used without a copy: no episode from this process while it is in the window
            self._uncopied_until = max(self._uncopied_until, self._now() + window + 2.0)
        return True

    def beat(self, request: AdmitRequest) -> None:
        """Count this process in the file's fleet (a heartbeat-only *request*); never raises."""
        try:
            self.file.admit(request)
        except SharedUnavailable:
            pass

    def settle(self, window: float, merge: Callable[[list[tuple[str, float]]], bool], wall_now: float) -> None:
        """Redis answered: if the machine is in an episode, hand it back (see the module's docstring).

        *merge* writes (id, age) grants into Redis and says whether Redis took them all.
        """
        try:
            state = self.file.state()
        except SharedUnavailable:
            self.episode = None  # Redis answers and the file does not: Redis it is
            return
        if state.away == QUIET:
            self._quiet_epoch, self.episode = state.epoch, None
            return
        if not self._handing_back.acquire(blocking=False):
            return  # another greenlet of this process is at it
        try:
            try:
                begun, grants = self.file.hand_back(window)
            except SharedUnavailable:
                return
            if grants is None:  # another process is handing back, or has finished
                if begun.away == QUIET:
                    self._quiet_epoch, self.episode = begun.epoch, None
                return
            ok = merge([(grant_id, wall_now - stamp) for grant_id, stamp in grants])
            try:
                ended = self.file.handed_back(begun.epoch, ok)
            except SharedUnavailable:
                return  # left at "handing back": another process takes it over once it is stale
            if ended.away == QUIET:
                log.warning("redis answers again: %d grants of the machine's window written back", len(grants))
                self._quiet_epoch, self.episode = ended.epoch, None
            else:
                self._quiet_epoch = None
        finally:
            self._handing_back.release()

    # -- while Redis does not ---------------------------------------------------------------

    def enter(self, may_start: bool) -> bool | None:
        """Redis failed: join the machine's episode, or start one if *may_start* (Redis last said
        alone). True: admitting under an episode; None: a hand-back is under way, wait for
        it; False: no episode (the file cannot be used, or the fleet was not this machine)."""
        if self.episode is not None:
            return True
        try:
            state = self.file.go_away(may_start and self._now() >= self._uncopied_until)
        except SharedUnavailable:
            return False
        if state.away == HANDING_BACK:
            return None
        if state.away != AWAY:
            return False
        if self.episode is None:
            log.warning("redis unavailable and this machine was the whole fleet: admitting through its file")
        self.episode, self._quiet_epoch = state.epoch, None
        return True

    def admit(self, request: AdmitRequest) -> AdmitReply:
        """One admission through the file under this process's episode.

        :raises SharedUnavailable: the file cannot be used.
        """
        return self.file.admit(request)

    def ended(self) -> None:
        """The file said this process's episode is over: go back to Redis."""
        self.episode = None
