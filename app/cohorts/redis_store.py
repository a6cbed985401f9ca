"""The cohort store in Redis: every operation one Lua script, shared by every machine.

The scripts say what :mod:`app.cohorts.rules` says (the store tests hold the two to one
table). Keys live under ``PREFIX:cohorts``: ``:epoch`` is a hash of the epoch's ``id``,
``created_at``, ``opened_at`` and one ``c:COHORT`` field per cohort ever heard of in it;
everything else is named after the epoch's id (``:EPOCH:r:COHORT`` the record,
``:EPOCH:m:COHORT`` the pairs as ``"1:COMPUTED_TIME"``/``"0:..."``, ``:EPOCH:q`` the queue
scored by when each batch is next available, ``:EPOCH:qb``/``qm``/``ql`` its bodies,
facts and lease tokens, ``:EPOCH:seen:MESSAGE_ID`` the repeats window). So a Redis
restarted empty, or an epoch hash evicted on its own, starts a new epoch whose keys share
nothing with the old ones; a record or a pairs hash evicted on its own is noticed by the
lookup (the cohort is listed, or its pair count no longer matches) and the cohort marked
lost. Run Redis with ``maxmemory-policy noeviction`` so that it refuses writes instead.

Every write script first checks that the epoch is the one the caller named its keys after;
if not, the caller reads the epoch again (making one if Redis has none) and retries once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from app.clock import SYSTEM_CLOCK, Clock, Deadline
from app.cohorts import redis_scripts as lua
from app.cohorts.payload import CohortBatch
from app.cohorts.rules import ARM_SLACK_SECONDS, CohortRecord, Pair
from app.cohorts.store import (
    APPLIED,
    DUPLICATE_WINDOW_SECONDS,
    LEASE_LOST,
    LEASE_SECONDS,
    SUPERSEDED,
    Epoch,
    Leased,
    Lookup,
    record_from,
)
from app.stores.redis import RedisTier
from app.stores.shared import SharedUnavailable


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _mapping(flat: list[Any]) -> dict[str, Any]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _epoch_from(values: list[Any]) -> Epoch:
    epoch_id, created_at, opened_at = values
    return Epoch(_text(epoch_id), float(created_at), None if opened_at is None else float(opened_at))


class RedisCohortStore:
    """:class:`app.cohorts.store.CohortStore` in Redis, through a :class:`RedisTier`."""

    name = "redis"

    def __init__(self, tier: RedisTier, clock: Clock = SYSTEM_CLOCK) -> None:
        self.tier = tier
        self._clock = clock
        self._base = tier.key("cohorts")
        self._epoch_key = f"{self._base}:epoch"
        self._epoch_id: str | None = None
        self._scripts = {
            name: tier.script(source)
            for name, source in (("ensure", lua.ENSURE_EPOCH), ("open", lua.OPEN), ("enqueue", lua.ENQUEUE),
                                 ("lease", lua.LEASE), ("apply", lua.APPLY), ("discard", lua.DISCARD),
                                 ("lookup", lua.LOOKUP), ("arm", lua.ARM), ("lost", lua.MARK_LOST))
        }  # fmt: skip

    # -- keys and scripts ----------------------------------------------------------------

    def _key(self, epoch: str, *parts: str) -> str:
        return ":".join((self._base, epoch, *parts))

    def _queue_keys(self, epoch: str) -> list[str]:
        return [self._key(epoch, name) for name in ("q", "qb", "qm", "ql")]

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        call = self._scripts[script]
        return self.tier.run(lambda client: call(keys=keys, args=args, client=client))

    def _ensure(self) -> Epoch:
        """The epoch in Redis (a new, closed one if it has none), remembered for naming keys."""
        epoch = _epoch_from(self._run("ensure", [self._epoch_key], [uuid.uuid4().hex, repr(self._clock.time())]))
        self._epoch_id = epoch.id
        return epoch

    def _in_epoch(self, call: Callable[[str], list[Any]]) -> list[Any]:
        """Run a write script with keys named after the epoch; once more if the epoch changed meanwhile."""
        reply = call(self._epoch_id or self._ensure().id)
        if _text(reply[0]) == "epoch":
            reply = call(self._ensure().id)
            if _text(reply[0]) == "epoch":
                raise SharedUnavailable("the cohort store's epoch changed twice during one operation")
        return reply

    # -- the operations ------------------------------------------------------------------

    def enqueue(self, batch: CohortBatch) -> bool:
        now, body = repr(self._clock.time()), batch.queued_form()

        def enqueue_in(epoch: str) -> list[Any]:
            keys = [self._epoch_key, self._key(epoch, "r", batch.cohort_id),
                    self._key(epoch, "seen", batch.message_id), *self._queue_keys(epoch)[:3]]  # fmt: skip
            args = [epoch, batch.message_id, batch.cohort_id, batch.cohort_name or "", batch.computed_time, body, now,
                    int(DUPLICATE_WINDOW_SECONDS * 1000), ARM_SLACK_SECONDS]  # fmt: skip
            return self._run("enqueue", keys, args)  # type: ignore[no-any-return]

        return _text(self._in_epoch(enqueue_in)[0]) == "queued"

    def lease(self, lease_seconds: float = LEASE_SECONDS) -> Leased | None:
        now, token = self._clock.time(), uuid.uuid4().hex

        def lease_in(epoch: str) -> list[Any]:
            args = [epoch, repr(now), repr(now + lease_seconds), token]
            return self._run("lease", [self._epoch_key, *self._queue_keys(epoch)], args)  # type: ignore[no-any-return]

        reply = self._in_epoch(lease_in)
        if _text(reply[0]) != "leased":
            return None
        counted, generation = _text(reply[3]).split(" ")
        return Leased(_text(reply[1]), token, bytes(reply[2]), counted == "1", int(generation), self._epoch_id)

    def _batch_keys(self, epoch: str, cohort_id: str) -> list[str]:
        record, pairs = self._key(epoch, "r", cohort_id), self._key(epoch, "m", cohort_id)
        return [self._epoch_key, record, pairs, *self._queue_keys(epoch)]

    def apply(self, leased: Leased, batch: CohortBatch) -> str:
        now = repr(self._clock.time())

        def apply_in(epoch: str) -> list[Any]:
            if epoch != leased.epoch:
                return [b"lease_lost"]  # the batch was queued in a store that is gone
            args = [epoch, leased.message_id, leased.token, batch.computed_time, int(batch.in_cohort), now,
                    ARM_SLACK_SECONDS, int(leased.counted), leased.generation, batch.cohort_id,
                    *batch.user_ids]  # fmt: skip
            return self._run("apply", self._batch_keys(epoch, batch.cohort_id), args)  # type: ignore[no-any-return]

        outcome = _text(self._in_epoch(apply_in)[0])
        return {"applied": APPLIED, "superseded": SUPERSEDED}.get(outcome, LEASE_LOST)

    def discard(self, leased: Leased) -> None:
        def discard_in(epoch: str) -> list[Any]:
            keys = self._batch_keys(epoch, "")
            return self._run("discard", keys, [epoch, leased.message_id, leased.token])  # type: ignore[no-any-return]

        self._in_epoch(discard_in)

    def lookup(self, cohort_id: str, user_id: str, deadline: Deadline | None = None) -> Lookup:
        # The socket timeout (REDIS_TIMEOUT_SECONDS) bounds the wait, deadline or not.
        epoch = self._epoch_id or self._ensure().id
        lookup = self._lookup_in(epoch, cohort_id, user_id)
        if lookup.epoch != epoch and lookup.epoch is not None:
            self._epoch_id = lookup.epoch  # a new epoch: read the cohort's keys under its name
            lookup = self._lookup_in(lookup.epoch, cohort_id, user_id)
        return lookup

    def _lookup_in(self, epoch: str, cohort_id: str, user_id: str) -> Lookup:
        keys = [self._epoch_key, self._key(epoch, "r", cohort_id), self._key(epoch, "m", cohort_id)]
        current, flat, held, pairs_held, registered = self._run("lookup", keys, [cohort_id, user_id])
        if current is None or _text(current) != epoch:
            return Lookup(None if current is None else _text(current), None, None)
        record = record_from(_mapping(flat)) if flat else None
        pair = None
        if held is not None:
            value = _text(held)
            pair = Pair(value[0] == "1", int(value[2:]))
        return Lookup(epoch, record, pair, registered=bool(registered), pairs_held=int(pairs_held))

    def records(self) -> tuple[Epoch | None, list[CohortRecord]]:
        raw = self.tier.run(lambda client: client.hgetall(self._epoch_key))
        meta = {_text(name): value for name, value in raw.items()}
        if "id" not in meta:
            return None, []
        epoch = _epoch_from([meta["id"], meta["created_at"], meta.get("opened_at")])
        cohorts = [name[2:] for name in meta if name.startswith("c:")]
        keys = [self._key(epoch.id, "r", cohort_id) for cohort_id in cohorts]

        def read(client: Any) -> list[dict[bytes, bytes]]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()  # type: ignore[no-any-return]

        found = [record_from({_text(name): value for name, value in values.items()}) for values in self.tier.run(read)
                 if values]  # fmt: skip
        return epoch, found

    def open(self) -> Epoch:
        now = repr(self._clock.time())
        reply = self._in_epoch(lambda epoch: self._run("open", [self._epoch_key], [epoch, now]))
        return _epoch_from(reply[1])

    def arm(self, cohort_id: str) -> CohortRecord:
        now = repr(self._clock.time())

        def arm_in(epoch: str) -> list[Any]:
            keys = self._batch_keys(epoch, cohort_id)[:3]
            return self._run("arm", keys, [epoch, cohort_id, now])  # type: ignore[no-any-return]

        return record_from(_mapping(self._in_epoch(arm_in)[1]))

    def mark_lost(self, cohort_id: str, reason: str, generation: int | None = None) -> CohortRecord | None:
        now = repr(self._clock.time())

        def mark_in(epoch: str) -> list[Any]:
            keys = self._batch_keys(epoch, cohort_id)[:2]
            args = [epoch, cohort_id, reason, now, "" if generation is None else generation]
            return self._run("lost", keys, args)  # type: ignore[no-any-return]

        reply = self._in_epoch(mark_in)
        return record_from(_mapping(reply[1])) if _text(reply[0]) == "changed" else None

    def close(self) -> None:
        pass  # the tier belongs to the shared tier, which closes it
