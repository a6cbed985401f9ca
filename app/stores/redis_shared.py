"""The shared tier in Redis: every operation one Lua script (or one command), for every machine.

Redis keeps the time (``TIME`` in the admission script), expiry (``PX``) and atomicity
(a script runs alone). Keys are ``PREFIX:NAME`` (``ampproxy:p:KEY``, ``ampproxy:admission``).

Beside the fleet's heartbeats (``fleet``: each process, ``MACHINE/TOKEN``, by when it
was last heard), the admission script keeps which machines the fleet runs on:
``machines`` (each machine by when one of its processes was last heard; a machine
leaves it with its last process, see :data:`_LEAVE_LUA`) and ``spent`` (each machine by
when its latest grant leaves the window). Its answer says whether the asking process's
machine is alone in both: the whole fleet, with every grant of the window its own (see
:mod:`app.machine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.clock import Deadline
from app.stores.redis import RedisTier
from app.stores.shared import AdmitReply, AdmitRequest, ClaimReply

# Take the claim if it is free and return what is stored now, in one round trip; if it
# is taken, return the holder's token.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2]) or false, redis.call('GET', KEYS[3]) or false}
end
return {0, redis.call('GET', KEYS[1]) or false}
"""

# Write the answer, then release our own claim (never a successor's): one operation.
_PUBLISH_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Release our own claim, leaving word of why for the processes waiting on it.
_ABANDON_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1] .. '\\n' .. ARGV[2], 'PX', ARGV[3]) end
  redis.call('DEL', KEYS[1])
end
return 1
"""

# The sliding log of grants, the fleet's heartbeats, the 429 back-off and the priority
# rule's marks, in one step (see app.budget for what each part is for). The decision is
# app.core.window.decide, line for line. ARGV[5] is a test's clock (see AdmitRequest.now);
# empty, always in the service: Redis's own TIME, which every process of the fleet shares.
# ARGV[12] is the asking process's machine; from ARGV[13] on, grants to write back, as
# (id, seconds before now) pairs: by id, so one the log holds already is counted once.
_ADMIT_LUA = """
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local hb_timeout, horizon = tonumber(ARGV[7]), tonumber(ARGV[8])
local machine = ARGV[12]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - horizon)
redis.call('ZADD', KEYS[3], now, ARGV[6])
redis.call('PEXPIRE', KEYS[3], math.ceil(horizon * 1000))
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - horizon)
redis.call('ZADD', KEYS[5], now, machine)
redis.call('PEXPIRE', KEYS[5], math.ceil(horizon * 1000))
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
local function spend(until_)
  local known = tonumber(redis.call('ZSCORE', KEYS[6], machine))
  if not known or known < until_ then redis.call('ZADD', KEYS[6], until_, machine) end
  redis.call('PEXPIRE', KEYS[6], math.ceil((window + 60) * 1000))
end
local alive = redis.call('ZCOUNT', KEYS[3], now - hb_timeout, '+inf')
-- A process back from an outage remembers the fleet it knew: if Redis restarted empty, the
-- processes not heard from since may still be spending their shares on their own.
local members = redis.call('ZCARD', KEYS[3])
local fleet = math.max(members, tonumber(ARGV[11]))
local quiet = fleet - alive
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local merged_until = -math.huge
for i = 13, #ARGV - 1, 2 do
  local stamp = now - tonumber(ARGV[i + 1])
  if stamp > now - window then
    redis.call('ZADD', KEYS[1], stamp, ARGV[i])
    merged_until = math.max(merged_until, stamp + window)
  end
end
if merged_until > now then spend(merged_until) end
-- Alone: this machine is the only one heard from within the horizon, no other machine's
-- grant is still in the window, and no fleet remembered from before an outage is missing.
local alone = 0
if redis.call('ZCARD', KEYS[5]) == 1 and tonumber(ARGV[11]) <= members then
  local others = redis.call('ZCARD', KEYS[6])
  if redis.call('ZSCORE', KEYS[6], machine) then others = others - 1 end
  if others == 0 then alone = 1 end
end
local used = redis.call('ZCARD', KEYS[1])
if ARGV[9] == '1' then return {2, '0', fleet, used, alone} end
local backoff = redis.call('PTTL', KEYS[2])
if backoff > 0 then return {-1, tostring(backoff / 1000), fleet, used, alone} end
local ceiling = limit - math.floor(limit / fleet) * quiet
if ceiling <= 0 then return {0, tostring(window), fleet, used, alone} end
-- The earliest slot the limit allows, given the grants already made.
local slot = now
if used >= ceiling then
  local kth = redis.call('ZRANGE', KEYS[1], used - ceiling, used - ceiling, 'WITHSCORES')
  slot = math.max(slot, tonumber(kth[2]) + window)
end
local marks = redis.call('HMGET', KEYS[4], 'live_until', 'bulk_due')
local live_until, bulk_due = tonumber(marks[1]) or -math.huge, tonumber(marks[2]) or -math.huge
if ARGV[4] ~= '1' then
  if slot - now > tonumber(ARGV[3]) then return {0, string.format('%.17g', slot - now), fleet, used, alone} end
  redis.call('HSET', KEYS[4], 'live_until', string.format('%.17g', math.max(live_until, slot)))
else
  -- Bulk work never reserves: a slot now, or the moment it may ask again.
  local due = math.max(slot, live_until, bulk_due - 0.001)  -- PACE_SLACK_SECONDS
  if due > now then return {0, string.format('%.17g', due - now), fleet, used, alone} end
  local step = window / ceiling
  local next_due = now + step
  if now - bulk_due <= step / 2 then next_due = bulk_due + step end
  redis.call('HSET', KEYS[4], 'bulk_due', string.format('%.17g', next_due))
end
redis.call('PEXPIRE', KEYS[4], math.ceil((window + 60) * 1000))
redis.call('ZADD', KEYS[1], slot, ARGV[10])
redis.call('PEXPIRE', KEYS[1], math.ceil((window + 60) * 1000))
spend(slot + window)
return {1, string.format('%.17g', slot - now), fleet, used + 1, alone}
"""

# A process leaves the fleet; with its machine's last process, the machine leaves
# ``machines`` (its grants still in the window keep it in ``spent``). A scan of the fleet,
# once per process exit.
_LEAVE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
local prefix = ARGV[2] .. '/'
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then return 0 end
end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


def machine_of(process_id: str) -> str:
    """The machine part of ``MACHINE/TOKEN`` (a process without a machine is its own)."""
    return process_id.partition("/")[0]


def _bytes(raw: Any) -> bytes | None:
    return raw if isinstance(raw, bytes) else None


class RedisShared:
    """:class:`app.stores.shared.SharedTier` over a :class:`RedisTier` (which raises
    :class:`app.stores.redis.RedisUnavailable`, a :class:`SharedUnavailable`)."""

    name = "redis"

    def __init__(self, tier: RedisTier) -> None:
        self.tier = tier
        self._claim = tier.script(_CLAIM_LUA)
        self._publish = tier.script(_PUBLISH_LUA)
        self._abandon = tier.script(_ABANDON_LUA)
        self._admit = tier.script(_ADMIT_LUA)
        self._leave = tier.script(_LEAVE_LUA)

    def available(self) -> bool:
        return self.tier.available()

    def get(self, keys: Sequence[str], deadline: Deadline | None = None) -> list[bytes | None]:
        # The socket timeout (REDIS_TIMEOUT_SECONDS) bounds the wait, deadline or not.
        names = [self.tier.key(key) for key in keys]
        return [_bytes(raw) for raw in self.tier.run(lambda client: client.mget(names))]

    def claim(self, lock: str, token: str, ttl_ms: int, entry: str, negative: str) -> ClaimReply:
        keys = [self.tier.key(lock), self.tier.key(entry), self.tier.key(negative)]
        script = self._claim
        result = self.tier.run(lambda client: script(keys=keys, args=[token, ttl_ms], client=client))
        if int(result[0]) == 1:
            return ClaimReply(True, _bytes(result[1]), _bytes(result[2]))
        holder = _bytes(result[1])
        return ClaimReply(False, holder=holder.decode() if holder is not None else None)

    def publish(self, key: str, value: bytes, ttl_ms: int, lock: str, token: str) -> None:
        keys = [self.tier.key(key), self.tier.key(lock)]
        script = self._publish
        self.tier.run(lambda client: script(keys=keys, args=[value, ttl_ms, token], client=client))

    def abandon(self, lock: str, note: str, token: str, failure: str, note_ms: int) -> None:
        keys = [self.tier.key(lock), self.tier.key(note)]
        script = self._abandon
        self.tier.run(lambda client: script(keys=keys, args=[token, failure, note_ms], client=client))

    def admit(self, request: AdmitRequest) -> AdmitReply:
        keys = [self.tier.key(name) for name in ("admission", "backoff", "fleet", "priority", "machines", "spent")]
        merges = [part for grant_id, age in request.merges for part in (grant_id, f"{age:.6f}")]
        args: list[Any] = [
            request.limit, request.window, request.max_wait, int(request.bulk),
            "" if request.now is None else repr(request.now),
            request.process_id, request.heartbeat_timeout, request.fleet_horizon, int(request.heartbeat_only),
            request.grant_id, request.remembered_fleet, machine_of(request.process_id), *merges,
        ]  # fmt: skip
        script = self._admit
        granted, wait, fleet, used, alone = self.tier.run(lambda client: script(keys=keys, args=args, client=client))
        return AdmitReply(int(granted), float(wait), int(fleet), int(used), bool(int(alone)))

    def leave_fleet(self, process_id: str) -> None:
        keys = [self.tier.key("fleet"), self.tier.key("machines")]
        script = self._leave
        self.tier.run(lambda client: script(keys=keys, args=[process_id, machine_of(process_id)], client=client))

    def retry_now(self) -> None:
        self.tier.retry_now()

    def back_off(self, seconds: float) -> None:
        key = self.tier.key("backoff")
        self.tier.run(lambda client: client.set(key, "1", px=max(1, int(seconds * 1000))))

    def close(self) -> None:
        self.tier.close()
