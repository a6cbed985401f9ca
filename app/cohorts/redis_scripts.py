"""The Lua scripts of the Redis cohort store: each says what :mod:`app.cohorts.rules` says.

Each write script first checks that the epoch (``KEYS[1]``'s ``id``) is the one the caller
named its keys after (``ARGV[1]``) and answers ``{'epoch'}`` if not. Times arrive from the
caller's clock (``now``), as the SQLite and in-process stores take theirs, so one table of
cases on a fake clock holds all three to the same rules.
"""

_SAME_EPOCH = "if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return {'epoch'} end\n"

ENSURE_EPOCH = """
if redis.call('HSETNX', KEYS[1], 'id', ARGV[1]) == 1 then redis.call('HSET', KEYS[1], 'created_at', ARGV[2]) end
return redis.call('HMGET', KEYS[1], 'id', 'created_at', 'opened_at')
"""

OPEN = (
    _SAME_EPOCH
    + """
redis.call('HSETNX', KEYS[1], 'opened_at', ARGV[2])
return {'ok', redis.call('HMGET', KEYS[1], 'id', 'created_at', 'opened_at')}
"""
)

# A record as rules.new_record makes it: ARGV[n] cohort, ARGV[n+1] now, opened_at or false.
_NEW_RECORD = """
local function new_record(key, epoch_key, cohort, now, opened)
  if opened then
    redis.call('HSET', key, 'cohort_id', cohort, 'state', 'armed', 'reason', 'store_opened', 'state_since', now,
               'armed_at', opened, 'armed_by_operator', 0, 'generation', 0)
  else
    redis.call('HSET', key, 'cohort_id', cohort, 'state', 'unarmed', 'reason', 'history_unknown',
               'state_since', now, 'armed_by_operator', 0, 'generation', 0)
  end
  redis.call('HSET', epoch_key, 'c:' .. cohort, now)
end
"""

# rules.on_receipt / on_duplicate, and the batch queued: KEYS epoch, record, seen, queue,
# bodies, facts; ARGV epoch, message_id, cohort, name, computed_time, body, now, window_ms, slack.
ENQUEUE = (
    _NEW_RECORD
    + _SAME_EPOCH
    + """
local msg, ct, now = ARGV[2], tonumber(ARGV[5]), ARGV[7]
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[8]) then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HINCRBY', KEYS[2], 'duplicates', 1) end
  return {'duplicate'}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  new_record(KEYS[2], KEYS[1], ARGV[3], now, redis.call('HGET', KEYS[1], 'opened_at'))
end
local rec = redis.call('HMGET', KEYS[2], 'state', 'armed_at', 'sync_time', 'generation')
local counted = 0
if rec[1] == 'armed' and rec[2] and ct >= tonumber(rec[2]) - tonumber(ARGV[9])
   and (not rec[3] or ct <= tonumber(rec[3])) then
  counted = 1
  redis.call('HSET', KEYS[2], 'sync_time', ARGV[5], 'quiet_since', now)
  redis.call('HINCRBY', KEYS[2], 'pending_sync', 1)
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'name', ARGV[4]) end
redis.call('HINCRBY', KEYS[2], 'received', 1)
redis.call('HINCRBY', KEYS[2], 'pending', 1)
redis.call('HSET', KEYS[2], 'last_received_at', now)
redis.call('ZADD', KEYS[4], now, msg)
redis.call('HSET', KEYS[5], msg, ARGV[6])
redis.call('HSET', KEYS[6], msg, counted .. ' ' .. (rec[4] or '0'))
return {'queued', counted}
"""
)

# KEYS epoch, queue, bodies, facts, leases; ARGV epoch, now, until, token.
LEASE = (
    _SAME_EPOCH
    + """
local ready = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, 1)
if #ready == 0 then return {'empty'} end
local msg = ready[1]
redis.call('ZADD', KEYS[2], ARGV[3], msg)
redis.call('HSET', KEYS[5], msg, ARGV[4])
return {'leased', msg, redis.call('HGET', KEYS[3], msg) or '', redis.call('HGET', KEYS[4], msg) or '0 0'}
"""
)

_DEQUEUE = """
local function dequeue(msg)
  redis.call('ZREM', KEYS[4], msg)
  redis.call('HDEL', KEYS[5], msg)
  redis.call('HDEL', KEYS[6], msg)
  redis.call('HDEL', KEYS[7], msg)
end
"""

# rules.plan_apply, and the batch taken off the queue: KEYS epoch, record, pairs, queue,
# bodies, facts, leases; ARGV epoch, message_id, token, computed_time, in (1/0), now, slack,
# counted (1/0), generation, cohort, users...
APPLY = (
    _NEW_RECORD
    + _DEQUEUE
    + _SAME_EPOCH
    + """
local msg = ARGV[2]
if redis.call('HGET', KEYS[7], msg) ~= ARGV[3] then return {'lease_lost'} end
local ct, joined, now = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if redis.call('EXISTS', KEYS[2]) == 0 then new_record(KEYS[2], KEYS[1], ARGV[10], now, false) end
local rec = redis.call('HMGET', KEYS[2], 'state', 'armed_at', 'generation', 'pending_sync', 'last_computed_time',
                       'pending')
if ARGV[8] == '1' and tonumber(ARGV[9]) == tonumber(rec[3] or '0') and tonumber(rec[4] or '0') > 0 then
  redis.call('HINCRBY', KEYS[2], 'pending_sync', -1)
end
if tonumber(rec[6] or '0') > 0 then redis.call('HINCRBY', KEYS[2], 'pending', -1) end
local superseded = rec[1] == 'armed' and rec[2] and ct < tonumber(rec[2]) - tonumber(ARGV[7])
if not superseded then
  local members, pairs, value = 0, 0, joined .. ':' .. ARGV[4]
  for i = 11, #ARGV do
    local held = redis.call('HGET', KEYS[3], ARGV[i])
    if not held then
      pairs = pairs + 1
      members = members + joined
      redis.call('HSET', KEYS[3], ARGV[i], value)
    elseif ct >= tonumber(string.sub(held, 3)) then
      members = members + joined - tonumber(string.sub(held, 1, 1))
      redis.call('HSET', KEYS[3], ARGV[i], value)
    end
  end
  redis.call('HINCRBY', KEYS[2], 'members', members)
  redis.call('HINCRBY', KEYS[2], 'pairs', pairs)
  if not rec[5] or ct > tonumber(rec[5]) then redis.call('HSET', KEYS[2], 'last_computed_time', ARGV[4]) end
end
redis.call('HINCRBY', KEYS[2], 'applied', 1)
redis.call('HSET', KEYS[2], 'last_applied_at', now)
dequeue(msg)
if superseded then return {'superseded'} end
return {'applied'}
"""
)

# KEYS as for apply; ARGV epoch, message_id, token.
DISCARD = (
    _DEQUEUE
    + _SAME_EPOCH
    + """
if redis.call('HGET', KEYS[7], ARGV[2]) == ARGV[3] then dequeue(ARGV[2]) end
return {'ok'}
"""
)

# KEYS epoch, record, pairs; ARGV cohort, user. Reads only, from one moment.
LOOKUP = """
return {redis.call('HGET', KEYS[1], 'id') or false, redis.call('HGETALL', KEYS[2]),
        redis.call('HGET', KEYS[3], ARGV[2]) or false, redis.call('HLEN', KEYS[3]),
        redis.call('HEXISTS', KEYS[1], 'c:' .. ARGV[1])}
"""

# rules.armed: KEYS epoch, record, pairs; ARGV epoch, cohort, now.
ARM = (
    _SAME_EPOCH
    + """
local generation = tonumber(redis.call('HGET', KEYS[2], 'generation') or '0') + 1
redis.call('HSET', KEYS[2], 'cohort_id', ARGV[2], 'state', 'armed', 'reason', 'armed_by_operator',
           'state_since', ARGV[3], 'armed_at', ARGV[3], 'armed_by_operator', 1, 'generation', generation,
           'pending_sync', 0, 'members', 0, 'pairs', 0)
redis.call('HDEL', KEYS[2], 'sync_time', 'quiet_since', 'last_computed_time')
redis.call('HSETNX', KEYS[1], 'c:' .. ARGV[2], ARGV[3])
redis.call('UNLINK', KEYS[3])
return {'ok', redis.call('HGETALL', KEYS[2])}
"""
)

# rules.lost: KEYS epoch, record; ARGV epoch, cohort, reason, now, generation ('' for none).
MARK_LOST = (
    _SAME_EPOCH
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'cohort_id', ARGV[2], 'state', 'lost', 'reason', ARGV[3], 'state_since', ARGV[4],
             'armed_by_operator', 0, 'generation', 0)
  redis.call('HSETNX', KEYS[1], 'c:' .. ARGV[2], ARGV[4])
  return {'changed', redis.call('HGETALL', KEYS[2])}
end
local rec = redis.call('HMGET', KEYS[2], 'state', 'generation', 'armed_by_operator')
if rec[1] == 'lost' then return {'same'} end
if ARGV[5] ~= '' and tonumber(rec[2] or '0') ~= tonumber(ARGV[5]) then return {'same'} end
if ARGV[5] == '' and rec[1] == 'armed' and rec[3] == '1' then return {'same'} end
redis.call('HSET', KEYS[2], 'state', 'lost', 'reason', ARGV[3], 'state_since', ARGV[4])
return {'changed', redis.call('HGETALL', KEYS[2])}
"""
)
