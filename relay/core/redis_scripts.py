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

from collections.abc import Callable
from typing import Any, Final

# WRITE: append batches of events to streams' logs, idempotently and fenced: every stream the
# writer has news of, in one call (one call per stream on Redis Cluster, where keys of different
# slots cannot meet in one script).
# KEYS: per stream, its meta, log and owner.
# ARGV: 1 instance, 2 owner ms, 3 running ms, 4 kept ms, 5 maxlen; then per stream: its fence ("0":
#       create, or take over our own earlier create), token digest, model, kind, the seq of its
#       first event given, "1" when its last event given is the terminal, the number of events
#       given, and the events.
# Events already in a log (seq <= its top) are skipped, so a batch can be sent again after a lost
# answer and a repair can resend everything memory holds.  A log never has a hole: a batch that
# starts past top + 1 is refused and the stream marked ``lost`` (the rest is gone).
# Returns per stream two numbers: its fence and 0 (written) or -3 (a hole: lost); or -1 and 0:
# fenced out; or -2 and 0: no such stream in Redis (restarted empty, or expired): the caller
# writes it anew with fence "0".  The lease (the owner key) is set when a stream is created here
# and dropped at its end; the refresher renews it (RENEW).
WRITE: Final = """
local out = {}
local a = 6
for s = 0, #KEYS / 3 - 1 do
  local meta, log, owner = KEYS[3 * s + 1], KEYS[3 * s + 2], KEYS[3 * s + 3]
  local mine, base, terminal, n = ARGV[a], tonumber(ARGV[a + 4]), ARGV[a + 5] == '1', tonumber(ARGV[a + 6])
  local first = a + 7
  a = first + n
  local fence = redis.call('HGET', meta, 'fence')
  local status = 0
  local created = false
  if not fence then
    if mine ~= '0' then
      status = -2
    else
      redis.call('HSET', meta, 'owner', ARGV[first - 6], 'model', ARGV[first - 5], 'kind', ARGV[first - 4],
                 'by', ARGV[1])
      mine = tostring(redis.call('HINCRBY', meta, 'fence', 1))
      created = true
    end
  elseif mine == '0' then
    if redis.call('HGET', meta, 'by') ~= ARGV[1] or redis.call('HEXISTS', meta, 'interrupted') == 1 then
      status = -1
    else
      mine = fence
    end
  elseif fence ~= mine then
    status = -1
  end
  if status < 0 then
    out[#out + 1] = status
    out[#out + 1] = 0
  elseif redis.call('HEXISTS', meta, 'end') == 1 then
    out[#out + 1] = tonumber(mine)
    out[#out + 1] = 0
  else
    local top = -1
    if not created then
      local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
      if #last > 0 then top = tonumber(string.match(last[1][1], '^(%d+)')) end
    end
    if n > 0 and base > top + 1 then
      redis.call('HSET', meta, 'lost', '1')
      out[#out + 1] = tonumber(mine)
      out[#out + 1] = -3
    else
      if top >= 0 and redis.call('HEXISTS', meta, 'lost') == 1 then redis.call('HDEL', meta, 'lost') end
      local ended = false
      for i = 0, n - 1 do
        local seq = base + i
        if seq > top then
          if i == n - 1 and terminal then
            redis.call('XADD', log, 'MAXLEN', '~', ARGV[5], seq .. '-1', 'd', ARGV[first + i], 'e', '1')
            redis.call('HSET', meta, 'end', seq)
            ended = true
          else
            redis.call('XADD', log, 'MAXLEN', '~', ARGV[5], seq .. '-1', 'd', ARGV[first + i])
          end
        end
      end
      if ended then
        redis.call('DEL', owner)
        redis.call('PEXPIRE', meta, ARGV[4])
        redis.call('PEXPIRE', log, ARGV[4])
      elseif created or top < 0 then
        redis.call('SET', owner, ARGV[1], 'PX', ARGV[2])
        redis.call('PEXPIRE', meta, ARGV[3])
        if n > 0 then redis.call('PEXPIRE', log, ARGV[3]) end
      end
      out[#out + 1] = tonumber(mine)
      out[#out + 1] = 0
    end
  end
end
return out
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

    async def call(self, client: Any, name: str, keys: list[str], args: list[Any], *, packed: bool = False) -> Any:
        """Run a script; ``packed``: the command is packed by hiredis, in C, and sent on a pooled
        connection of ``client`` (the writer's one command per round trip carries every event of
        every stream: redis-py's own packing, in Python, per argument, was most of its cost)."""
        if not self.loaded:
            await self.load(client)
        try:
            return await self._run(client, name, keys, args, packed)
        except Exception as exc:
            if not self.missing(exc):
                raise
            await self.load(client)
            return await self._run(client, name, keys, args, packed)

    async def _run(self, client: Any, name: str, keys: list[str], args: list[Any], packed: bool) -> Any:
        if not packed or _pack is None:
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
        command = _pack(("EVALSHA", self.sha[name], len(keys), *keys, *args))
        pool = client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(command, check_health=False)
            return await conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is fine
        except BaseException:
            # Cut short (a timeout, a cancel) or broken: its answer may still come, so the
            # connection cannot serve another command.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)


try:
    from redis.exceptions import ResponseError
except ImportError:  # without the redis extra nothing here runs
    ResponseError = Exception  # type: ignore[misc,assignment]

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # redis-py packs it then (the redis extra brings hiredis)
    _pack = None
