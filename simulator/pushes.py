"""Cohort Webhooks pushes as Amplitude sends them, kept true to the simulator's profile data.

:class:`CohortPlan` makes one cohort's batches: a full sync at ``T0``, then changes at
``T1`` and ``T2``, that end exactly at the simulator's truth (:func:`simulator.data.cohort_ids`
decides who is in which cohort, as for the Profile API), so answers from pushes and answers
from the Profile API agree. Over the plan's population (``user-0`` .. ``user-N``):

- *joiners* (members now) were out at ``T0`` and enter at ``T1``;
- *leavers* (not members now) were in at ``T0`` and leave at ``T1``;
- *flappers* (members now) were in at ``T0``, leave at ``T1`` and enter again at ``T2``.

:meth:`CohortPlan.deliveries` sends them as Amplitude may: the full sync with some batches
sent twice (a retry repeats the ``message_id``), one batch of it held back until after the
changes, and the changes out of order (``T2`` before ``T1``). :class:`CohortPusher` POSTs
batches with Amplitude's headers and retries a batch answered with anything but ``200``
(bounded, with back-off).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import orjson
import requests

from simulator import data

USER_AGENT = "Amplitude/Webhook/1.0"
#: Users per batch, as Amplitude's partner syncs send them.
BATCH_SIZE = 1000


@dataclass(frozen=True, slots=True)
class PushedBatch:
    """One batch: its message id, the users entering or leaving, and the body sent."""

    message_id: str
    cohort_id: str
    in_cohort: bool
    computed_time: int
    user_ids: tuple[str, ...]
    body: bytes = field(repr=False)


def _share(cohort_id: str, user_id: str) -> float:
    """A stable number in [0, 1) per (cohort, user), choosing who changed when."""
    digest = hashlib.sha256(f"push:{cohort_id}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class CohortPlan:
    """One cohort's batches, from a full sync to the simulator's truth."""

    def __init__(
        self,
        cohort_id: str = "cohort_vip",
        users: int = 5000,
        start: int | None = None,
        step: int = 60,
        churn: float = 0.05,
        batch_size: int = BATCH_SIZE,
        properties: bool = True,
        cohort_name: str | None = None,
    ) -> None:
        self.cohort_id = cohort_id
        self.cohort_name = cohort_name or cohort_id.replace("_", " ").title()
        self.population = tuple(f"user-{n}" for n in range(users))
        self.truth = frozenset(user for user in self.population if self.member(user))
        self.batch_size = batch_size
        self.properties = properties
        start = int(time.time()) if start is None else start
        self.times = (start, start + step, start + 2 * step)
        share = {user: _share(cohort_id, user) for user in self.population}
        self.joiners = sorted(user for user in self.truth if share[user] < churn)
        self.flappers = sorted(user for user in self.truth if churn <= share[user] < 2 * churn)
        self.leavers = sorted(user for user in self.population if user not in self.truth and share[user] < churn)
        self.full_sync = sorted((self.truth - set(self.joiners)) | set(self.leavers))
        self._rounds = 0
        self._last_time = self.times[2]

    def member(self, user_id: str) -> bool:
        """The truth for any user id: what the Profile API's ``cohort_ids`` says."""
        return self.cohort_id in data.cohort_ids("user", user_id)

    def syncs(self) -> list[list[PushedBatch]]:
        """The batches of each computation, in order: the full sync, then the two rounds of changes."""
        t0, t1, t2 = self.times
        return [
            self.batches(True, self.full_sync, t0),
            self.batches(True, self.joiners, t1) + self.batches(False, sorted(self.leavers + self.flappers), t1),
            self.batches(True, self.flappers, t2),
        ]

    def batches(self, in_cohort: bool, user_ids: Sequence[str], computed_time: int) -> list[PushedBatch]:
        """*user_ids* entering or leaving at *computed_time*, in batches of ``batch_size``."""
        run = uuid.UUID(bytes=hashlib.sha256(f"{self.cohort_id}:{computed_time}".encode()).digest()[:16])
        direction = "enter" if in_cohort else "leave"
        batches = []
        for index, start in enumerate(range(0, len(user_ids), self.batch_size)):
            chunk = tuple(user_ids[start : start + self.batch_size])
            message_id = f"{run}::{direction}::{index}"
            users = [self._user(user_id) for user_id in chunk]
            body = orjson.dumps(
                {"cohort_name": self.cohort_name, "cohort_id": self.cohort_id, "in_cohort": in_cohort,
                 "computed_time": str(computed_time), "message_id": message_id, "users": users}
            )  # fmt: skip
            batches.append(PushedBatch(message_id, self.cohort_id, in_cohort, computed_time, chunk, body))
        return batches

    def deliveries(self, seed: int = 7) -> list[PushedBatch]:
        """Every batch in an order Amplitude may send them: repeats, one late full-sync batch, changes reversed."""
        full, changes, again = self.syncs()
        rng = random.Random(seed)
        late = full[-1] if len(full) > 1 else None
        order: list[PushedBatch] = []
        for batch in full:
            if batch is late:
                continue
            order.append(batch)
            if rng.random() < 0.3:
                order.append(batch)  # a retry after a timeout: the same message_id
        order.extend(again)  # T2 before T1: the re-entries arrive before the leaves they follow
        shuffled = list(changes)
        rng.shuffle(shuffled)
        order.extend(shuffled)
        order.extend(changes[:1])  # a repeat of a change
        if late is not None:
            order.append(late)  # a full-sync batch delivered after the changes
        return order

    def flap_round(self, now: int | None = None, size: int = 20) -> list[PushedBatch]:
        """A later round of changes that ends at the truth again: a few members leave, then re-enter."""
        members = sorted(self.truth)
        if not members:
            return []
        start = (self._rounds * size) % len(members)
        chosen = (members[start:] + members[:start])[:size]
        self._rounds += 1
        leave = max(self._last_time + 1, now if now is not None else int(time.time()))
        self._last_time = leave + 1
        return self.batches(False, chosen, leave) + self.batches(True, chosen, leave + 1)

    def _user(self, user_id: str) -> dict[str, object]:
        if not self.properties:
            return {"user_id": user_id}
        return {"user_id": user_id, "user_properties": data.user_properties("user", user_id)}


@dataclass(frozen=True, slots=True)
class PushResult:
    """How one batch went: the last status (0: no answer) after how many attempts."""

    message_id: str
    status: int
    attempts: int


class CohortPusher:
    """POST batches to a receiver as Amplitude does, retrying (bounded, with back-off) until a ``200``."""

    def __init__(
        self,
        url: str,
        secret: str,
        attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        timeout: tuple[float, float] = (1.0, 5.0),
        stopping: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.url = url
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.stopping = stopping or threading.Event()
        self._sleep = sleep or self._wait
        self.session = requests.Session()
        self.session.headers.update(
            {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Authorization": f"Bearer {secret}"}
        )
        #: Every attempt's status, in order (0: the connection failed).
        self.statuses: list[int] = []

    def _wait(self, seconds: float) -> None:
        self.stopping.wait(seconds)  # a stop ends the back-off at once

    def push(self, batch: PushedBatch) -> PushResult:
        """Send one batch until it is answered ``200``, at most ``attempts`` times."""
        delay, status = self.backoff, 0
        for attempt in range(1, self.attempts + 1):
            try:
                with self.session.post(self.url, data=batch.body, timeout=self.timeout) as response:
                    status = response.status_code
            except requests.RequestException:
                status = 0
            self.statuses.append(status)
            if status == 200 or attempt == self.attempts or self.stopping.is_set():
                return PushResult(batch.message_id, status, attempt)
            self._sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")  # pragma: no cover

    def push_all(self, batches: Iterable[PushedBatch]) -> list[PushResult]:
        """Send *batches* one after another, as Amplitude sends one sync's batches."""
        results = []
        for batch in batches:
            if self.stopping.is_set():
                break
            results.append(self.push(batch))
        return results

    def close(self) -> None:
        self.session.close()


class CohortPushes:
    """The simulator's pushes: each cohort's plan delivered, then (with *every*) a flap round that often."""

    def __init__(
        self, url: str, secret: str, cohort_ids: Sequence[str] = ("cohort_vip",), users: int = 5000,
        every: float = 0.0, stopping: threading.Event | None = None,
    ) -> None:  # fmt: skip
        self.stopping = stopping or threading.Event()
        self.pusher = CohortPusher(url, secret, stopping=self.stopping)
        self.plans = [CohortPlan(cohort_id, users) for cohort_id in cohort_ids]
        self.every = every
        self.results: list[PushResult] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="cohort-pushes", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Wait for the receiver, deliver every plan, then flap rounds every ``every`` seconds until stopped."""
        self.wait_ready()
        for plan in self.plans:
            self.results.extend(self.pusher.push_all(plan.deliveries()))
        while self.every > 0 and not self.stopping.wait(self.every):
            for plan in self.plans:
                self.results.extend(self.pusher.push_all(plan.flap_round()))

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until the receiver answers HTTP at all (it may start after the simulator), at most *timeout*."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                with self.pusher.session.get(self.pusher.url, timeout=(0.5, 1.0)):
                    return True  # any status: something is listening
            except requests.RequestException:
                self.stopping.wait(0.25)
        return False

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.pusher.close()

    def report(self) -> dict[str, int]:
        """Batches sent, delivered (answered 200) and given up on, and every attempt made."""
        delivered = sum(1 for result in self.results if result.status == 200)
        return {"batches": len(self.results), "delivered": delivered, "failed": len(self.results) - delivered,
                "attempts": len(self.pusher.statuses)}  # fmt: skip
