"""The Lua the Redis store runs: each step that must not interleave with another instance's.

Scripts are loaded once (``SCRIPT LOAD``) and called by SHA in pipelines; a Redis that lost them
(restarted) answers ``NOSCRIPT`` and the caller loads them again.  Every key a script touches is
in its ``KEYS`` and, for one stream, carries the stream's hash tag, so they run on Redis Cluster.

A stream's ownership is a lease with a fencing number: ``meta.fence`` is raised when the stream
is (re)created in Redis and again when a reader ends it as ``interrupted``; the producer's writes
and renewals carry the number it was given and are refused once it differs.  A producer that was
stopped past its lease therefore cannot add a single event after that end, and learns from the
refusal that it must end its own readers the same way.
"""

from __future__ import annotations

from typing import Any, Final

# WRITE: append a batch of one stream's events, idempotently and fenced.
# KEYS: meta, log, owner.
# ARGV: 1 instance, 2 fence ("0": create, or take over our own earlier create), 3 owner ms,
#       4 running ms, 5 kept ms, 6 maxlen, 7 token digest, 8 model, 9 kind, 10 seq of the first
#       event given, 11 "1" when the last event given is the terminal, 12.. the events.
# Events already in the log (seq <= its top) are skipped, so a batch can be sent again after a
# lost answer and a repair can resend everything memory holds.  The log never has a hole: a
# batch that starts past top + 1 is refused and the stream marked ``lost`` (the rest is gone).
# Returns {fence, status}: status 0 written, -3 a hole (lost); {-1} fenced out; {-2} no such
# stream in Redis (restarted empty, or expired): the caller writes it anew with fence "0".
WRITE: Final = """
local fence = redis.call('HGET', KEYS[1], 'fence')
local mine = ARGV[2]
if not fence then
  if mine ~= '0' then return {-2} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[7], 'model', ARGV[8], 'kind', ARGV[9], 'by', ARGV[1])
  mine = tostring(redis.call('HINCRBY', KEYS[1], 'fence', 1))
elseif mine == '0' then
  if redis.call('HGET', KEYS[1], 'by') ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'interrupted') == 1 then
    return {-1}
  end
  mine = fence
elseif fence ~= mine then
  return {-1}
end
local n = #ARGV - 11
if redis.call('HEXISTS', KEYS[1], 'end') == 1 then
  return {tonumber(mine), 0}
end
local top = -1
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then top = tonumber(string.match(last[1][1], '^(%d+)')) end
local base = tonumber(ARGV[10])
if n > 0 and base > top + 1 then
  redis.call('HSET', KEYS[1], 'lost', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {tonumber(mine), -3}
end
redis.call('HDEL', KEYS[1], 'lost')
local ended = false
for i = 1, n do
  local seq = base + i - 1
  if seq > top then
    if i == n and ARGV[11] == '1' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], seq .. '-1', 'd', ARGV[11 + i], 'e', '1')
      redis.call('HSET', KEYS[1], 'end', seq)
      ended = true
    else
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], seq .. '-1', 'd', ARGV[11 + i])
    end
  end
end
if ended then
  redis.call('DEL', KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
else
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  if n > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
end
return {tonumber(mine), 0}
"""

# RENEW: the producer's lease, renewed (and, after a stall, confirmed).
# KEYS: meta, owner.  ARGV: instance, fence, owner ms.
# Returns 1 renewed, 0 the stream has ended (nothing to hold), -1 fenced out, -2 not in Redis.
RENEW: Final = """
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return -2 end
if fence ~= ARGV[2] then return -1 end
if redis.call('HEXISTS', KEYS[1], 'end') == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return 1
"""

# INTERRUPT: end a stream whose producer is gone with the ``interrupted`` event, once.
# KEYS: meta, log, owner.  ARGV: the event, kept ms, "1" to append (else only look).
# Returns the terminal's seq; nil while the owner lives; -1 no such stream; -2 the owner is gone
# but nothing was appended (a reader appends only once the owner has stayed gone a whole TTL:
# a producer that was only cut off from a stalled Redis renews its lease when Redis is back).
INTERRUPT: Final = """
local ended = redis.call('HGET', KEYS[1], 'end')
if ended then return tonumber(ended) end
if redis.call('EXISTS', KEYS[3]) == 1 then return nil end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[3] ~= '1' then return -2 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local seq = 0
if #last > 0 then seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
redis.call('XADD', KEYS[2], seq .. '-1', 'd', ARGV[1], 'e', '1')
redis.call('HSET', KEYS[1], 'end', seq, 'interrupted', '1')
redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return seq
"""

# TAKE: a token bucket of ``ARGV[1]`` requests per minute (bursts of as many), on Redis's clock
# so every instance agrees.  Returns the seconds to wait, as a string ("0": allowed).
TAKE: Final = """
local per_minute = tonumber(ARGV[1])
local rate = per_minute / 60
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 'a')
local tokens = tonumber(state[1]) or per_minute
local at = tonumber(state[2]) or now
tokens = math.min(per_minute, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'a', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(60000 + 1000))
return tostring(wait)
"""

# ACQUIRE: a lease on one of ``ARGV[1]`` slots, expiring after ``ARGV[3]`` ms unless renewed, so
# an instance that dies gives its slots back.  Returns the slots held after the call, negative
# when refused.
ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return -held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return held + 1
"""

# SLOT: renew one slot lease.  KEYS: the slots key.  ARGV: lease, ms.
SLOT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class Scripts:
    """The scripts above, loaded once and called by SHA (a pipeline then needs no ``SCRIPT EXISTS``
    round trip of its own, which redis-py's ``Script`` objects cost every pipeline)."""

    SOURCES: Final = {"write": WRITE, "renew": RENEW, "interrupt": INTERRUPT, "take": TAKE, "acquire": ACQUIRE,
                      "slot": SLOT}

    def __init__(self) -> None:
        import hashlib

        self.sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self.SOURCES.items()}
        self.loaded = False

    async def load(self, client: Any) -> None:
        for source in self.SOURCES.values():
            await client.script_load(source)
        self.loaded = True

    def lost(self) -> None:
        """Redis answered NOSCRIPT (it restarted): load them again before the next call."""
        self.loaded = False

    @staticmethod
    def missing(exc: BaseException) -> bool:
        """Redis does not have the script (it restarted, or a replica was promoted)."""
        return type(exc).__name__ == "NoScriptError" or "NOSCRIPT" in str(exc)

    def queue(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        pipe.evalsha(self.sha[name], len(keys), *keys, *args)

    async def call(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        if not self.loaded:
            await self.load(client)
        try:
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
        except Exception as exc:
            if not self.missing(exc):
                raise
            await self.load(client)
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
