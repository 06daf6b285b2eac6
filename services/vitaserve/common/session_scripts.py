"""Lua scripts of the session store: each write checks and writes in one atomic step.

Why Lua and not WATCH/MULTI: a fenced write is one round trip and cannot lose a race between the
check and the write (Redis runs a script alone); WATCH needs a retry loop per conflict.

Every script refreshes the TTL of every key it touches (idle sessions expire, live ones do not).
Writes that change turn state carry an `op` id (a fresh uuid per Python call) and store it: a retry
of the same call after a lost reply finds its own op id and answers "done" instead of reporting
itself as a conflicting writer. Any other writer in between replaces the op id, so the retry is
then, correctly, stale.

Versions (keys.py): CREATE writes `schema` = SCHEMA; a session of an older version (no field) is
written in place, its fields being the same; one of a newer version is refused before anything is
written (claim, begin, commit, abort, owner-checked end), so an older release never takes over a
call it cannot read back.

Tenants (issue 13): CREATE records the caller's tenant; CLAIM of another tenant's session answers
'missing', exactly as for an unknown id, before it writes anything, so a caller of one tenant can
neither learn that another tenant's session exists nor move its fence, owner or history. A session
without the field (written before tenants) belongs to keys.ANONYMOUS_TENANT.

Replies of the writes are arrays whose first element is a status word (READ's: the hash, the list):
  ok | done (this op was already applied) | missing | ended | exists | stale (+ what, + value)
  | schema (+ the stored version: newer than this release reads)
"""

from __future__ import annotations

from vitaserve.common import keys

# Shared prelude: server clock (one clock for all replicas), the version check and the fence check.
# KEYS[1] is the session hash in every script that uses gate().
_PRELUDE = f"""
local SCHEMA = {keys.SESSION_SCHEMA}  -- written by this release; the newest it reads
local ANONYMOUS = '{keys.ANONYMOUS_TENANT}'
""" + """
local function newer(schema)
  return schema and tonumber(schema) and tonumber(schema) > SCHEMA
end
local function now()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
-- nil, fields when the caller may write; else the reply to return
local function gate(owner, fence, op)
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
  local f = redis.call('HMGET', KEYS[1], 'status', 'owner', 'fence', 'op', 'turn', 'schema')
  if newer(f[6]) then return {'schema', f[6]} end
  if op ~= '' and f[4] == op then return {'done', tonumber(f[5]), tonumber(f[3])} end
  if f[1] == 'ended' then return {'ended'} end
  if f[2] ~= owner then return {'stale', 'owner', f[2]} end
  if fence ~= '' and f[3] ~= fence then return {'stale', 'fence', f[3]} end
  return nil, f
end
-- the tenant a session belongs to; sessions written before tenants were recorded are anonymous
local function tenant_of(stored)
  return stored or ANONYMOUS
end
local function refresh(ttl)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] op id   ARGV[2] ttl ms   ARGV[3] owner   ARGV[4] tenant   ARGV[5..] config field, value pairs
# returns {'ok'} | {'done'} (retry of this op) | {'exists'} (id taken: never for a uuid4)
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'op') == ARGV[1] then return {'done'} end
  return {'exists'}
end
local t = now()
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'schema', SCHEMA, 'created_at', t, 'updated_at', t, 'turn', 0,
           'status', 'active', 'owner', ARGV[3], 'fence', 0, 'op', ARGV[1], 'tenant', ARGV[4],
           unpack(ARGV, 5))
refresh(ARGV[2])
return {'ok'}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] expected turn   ARGV[2] owner   ARGV[3] fence ('' = not checked)   ARGV[4] op id
# ARGV[5] ttl ms
# returns {'ok', new turn} | {'done', turn} | {'missing'} | {'ended'} | {'stale', what, value}
#       | {'schema', version}
# An unfinished turn (status in_turn) of the same owner is abandoned: its number is not reused.
BEGIN_TURN = """
local reply, f = gate(ARGV[2], ARGV[3], ARGV[4])
if reply then return reply end
local turn = tonumber(f[5])
if turn ~= tonumber(ARGV[1]) then return {'stale', 'turn', f[5]} end
turn = turn + 1
redis.call('HSET', KEYS[1], 'turn', turn, 'status', 'in_turn', 'op', ARGV[4], 'updated_at', now())
refresh(ARGV[5])
return {'ok', turn}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] turn   ARGV[2] owner   ARGV[3] fence ('' = not checked)   ARGV[4] op id   ARGV[5] ttl ms
# ARGV[6] turn record (JSON)   ARGV[7] max turns kept (the oldest are trimmed)
# returns {'ok', history length} | {'done', turn} | {'missing'} | {'ended'} | {'stale', what, value}
#       | {'schema', version}
COMMIT_TURN = """
local reply, f = gate(ARGV[2], ARGV[3], ARGV[4])
if reply then return reply end
if tonumber(f[5]) ~= tonumber(ARGV[1]) then return {'stale', 'turn', f[5]} end
if f[1] ~= 'in_turn' then return {'stale', 'committed', f[5]} end
redis.call('RPUSH', KEYS[2], ARGV[6])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
redis.call('HSET', KEYS[1], 'status', 'active', 'op', ARGV[4], 'updated_at', now())
refresh(ARGV[5])
return {'ok', redis.call('LLEN', KEYS[2])}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] turn   ARGV[2] owner   ARGV[3] fence ('' = not checked)   ARGV[4] op id   ARGV[5] ttl ms
# returns {'ok', turn counter} | {'done', ...} | {'missing'} | {'ended'} | {'stale', what, value}
#       | {'schema', version}
# A turn that failed before anything of it was committed gives its number back: the counter
# returns to the last committed turn, so the history has no gap and the next turn reuses it.
ABORT_TURN = """
local reply, f = gate(ARGV[2], ARGV[3], ARGV[4])
if reply then return reply end
if tonumber(f[5]) ~= tonumber(ARGV[1]) then return {'stale', 'turn', f[5]} end
if f[1] ~= 'in_turn' then return {'stale', 'committed', f[5]} end
redis.call('HSET', KEYS[1], 'turn', tonumber(ARGV[1]) - 1, 'status', 'active', 'op', ARGV[4], 'updated_at', now())
refresh(ARGV[5])
return {'ok', tonumber(ARGV[1]) - 1}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] turn   ARGV[2] owner   ARGV[3] fence ('' = not checked)   ARGV[4] op id   ARGV[5] ttl ms
# ARGV[6] the cut turn record (JSON)
# returns {'ok'} | {'done', ...} | {'missing'} | {'ended'} | {'stale', what, value} | {'schema', version}
#       | {'grows', why}
# A finished answer the caller barged in on while it still played: the history's LAST entry is
# replaced by the part the caller heard. Only while that turn is the session's last one (counter at
# it, no later turn begun) and only by a prefix of its stored assistant ids with the same user
# audio: a cut never adds, so a confused or replayed writer can shorten an answer but never invent one.
CUT_TURN = """
local reply, f = gate(ARGV[2], ARGV[3], ARGV[4])
if reply then return reply end
if tonumber(f[5]) ~= tonumber(ARGV[1]) then return {'stale', 'turn', f[5]} end
if f[1] ~= 'active' then return {'stale', 'open', f[5]} end
local raw = redis.call('LINDEX', KEYS[2], -1)
if not raw then return {'stale', 'last', ''} end
local old, new = cjson.decode(raw), cjson.decode(ARGV[6])
if tonumber(old.turn) ~= tonumber(ARGV[1]) then return {'stale', 'last', tostring(old.turn)} end
if tonumber(new.turn) ~= tonumber(ARGV[1]) then return {'grows', 'the record is of another turn'} end
-- nil when `short` is a prefix of `long` (all of it when `exact`); else why not
local function prefix_of(short, long, name, exact)
  if #short > #long then return name .. ': ' .. #short .. ' ids, more than the ' .. #long .. ' stored' end
  if exact and #short ~= #long then return name .. ': ' .. #short .. ' ids, not the ' .. #long .. ' stored' end
  for i = 1, #short do
    if short[i] ~= long[i] then return name .. ' differ from the stored ones at index ' .. (i - 1) end
  end
  return nil
end
local why = prefix_of(new.user_audio, old.user_audio, 'user_audio', true)
  or prefix_of(new.assistant_ids, old.assistant_ids, 'assistant_ids', false)
if why then return {'grows', why} end
redis.call('LSET', KEYS[2], -1, ARGV[6])
redis.call('HSET', KEYS[1], 'op', ARGV[4], 'updated_at', now())
refresh(ARGV[5])
return {'ok'}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] new owner   ARGV[2] op id   ARGV[3] ttl ms   ARGV[4] the caller's tenant
# returns {'ok', fence, HGETALL, LRANGE} | {'done', ...same} | {'missing'} | {'ended'}
#       | {'schema', version}
# Another tenant's session is 'missing', checked before anything else is read out or written.
# The new owner gets a bumped fence; an unfinished turn of the old owner is abandoned (status
# back to active), so the old owner's begin/commit fail on the owner and the fence.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local f = redis.call('HMGET', KEYS[1], 'status', 'op', 'schema', 'tenant')
if tenant_of(f[4]) ~= ARGV[4] then return {'missing'} end
if newer(f[3]) then return {'schema', f[3]} end
local word = 'done'
if f[2] ~= ARGV[2] then
  if f[1] == 'ended' then return {'ended'} end
  redis.call('HINCRBY', KEYS[1], 'fence', 1)
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'status', 'active', 'op', ARGV[2],
             'updated_at', now())
  word = 'ok'
end
refresh(ARGV[3])
return {word, tonumber(redis.call('HGET', KEYS[1], 'fence')), redis.call('HGETALL', KEYS[1]),
        redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] owner ('' = anyone)   ARGV[2] fence ('' = not checked)   ARGV[3] tombstone ttl ms
# ARGV[4] '1' = erase: the history and the system prompt are deleted at once (the caller asked)
# returns {'ok'} (also when already ended) | {'missing'} | {'stale', what, value} | {'schema', version}
# An ended call is kept only briefly (ARGV[3] = keys.ENDED_SESSION_TTL_S): long enough that a late
# resume or a stale writer hears 'ended' rather than 'missing' and its history can be read back.
END = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st == 'ended' and ARGV[4] ~= '1' then return {'ok'} end
if ARGV[1] ~= '' then
  if st == 'ended' then  -- erasing an ended call: still only its last owner may
    local owner = redis.call('HGET', KEYS[1], 'owner')
    if owner ~= ARGV[1] then return {'stale', 'owner', owner or ''} end
  else
    local reply = gate(ARGV[1], ARGV[2], '')
    if reply then return reply end
  end
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'system_prompt')
end
redis.call('HSET', KEYS[1], 'status', 'ended', 'updated_at', now())
refresh(ARGV[3])
return {'ok'}
"""

# KEYS[1] session hash   KEYS[2] history list
# returns {HGETALL, LRANGE}: one consistent snapshot (a script runs alone), writing nothing.
# A script and not MULTI/EXEC: Redis refuses every command queued in a MULTI while it is out of
# memory, reads included, and a full Redis must still let running calls read their history.
READ = """
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS[1] session hash   KEYS[2] history list
# ARGV[1] ttl ms
# returns {'ok'} | {'missing'}      (keep-alive for a connected but silent caller)
TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
refresh(ARGV[1])
return {'ok'}
"""

SESSION_SCRIPTS = {
    "create": CREATE, "begin_turn": BEGIN_TURN, "commit_turn": COMMIT_TURN, "abort_turn": ABORT_TURN,
    "cut_turn": CUT_TURN, "claim": CLAIM, "end": END, "touch": TOUCH, "read": READ,
}


def session_script(name: str) -> str:
    """The full text of a session script: the shared prelude + its body."""
    return _PRELUDE + SESSION_SCRIPTS[name]
