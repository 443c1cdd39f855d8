"""Timer checks for silence and stall: find overdue agents in O(log n + k) and claim them atomically.

Every agent with something to wait for sits in its shard's ``timers`` sorted set, scored with the
earliest time a check could have something to decide (a lower bound: the batch update only ever
moves it earlier). Every worker, every tick, runs one script per shard that takes the agents
scored up to the *limit*, looks at each one's record and either opens its incident (silence or
stall) or re-arms it at its true next deadline. One script, so however many workers tick, each
overdue agent is decided once.

The limit is ``min(now, horizon)``: the horizon is the Redis time before which every event of the
shard has been applied (no older entry is undelivered or pending; engine.py). An agent whose
deadline lies beyond the horizon might have a beat sitting unread in the stream, so it is not
judged yet. This is how the checks hold back while workers lag or catch up, without ever
missing an agent that really stopped: its deadline passes the horizon as the backlog drains.

*Sight*: a shard's clock records the last check. A gap longer than ``blind_after`` (or than the
shortest silence allowance, if shorter: engine.sight_ms) means nobody
was watching (workers down, or Redis itself was down so agents could not even send); the checks
then restart from the end of the gap: an agent is judged silent only once it has been silent for
its whole allowance *since then* (``max(last seen, sight) + allowance``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgpack

from detectors.engine import lua_prelude, register

if TYPE_CHECKING:
    from detectors.engine import Engine

CLAIM_BATCH: Final = 1000
_ROUNDS: Final = 50

# KEYS: states, timers, stacks, intents, clock.
# ARGV: owner, lease, now, limit, k, blind_after ms, silence on, stall on.
# Returns msgpack [gap ms (0: none), owned intents keys, 1 if more may be due].
_CHECK: Final = """
local OWNER, LEASE = ARGV[1], tonumber(ARGV[2])
local now, limit, k, blind = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local sil_on, stall_on = ARGV[7] == '1', ARGV[8] == '1'
local c = redis.call('HMGET', KEYS[5], 'tick', 'sight')
local tick, sight = tonumber(c[1]), tonumber(c[2])
local gap = 0
if not tick then
  sight = now
elseif now - tick > blind then
  gap = now - tick
  sight = now
end
if not tick or now > tick then redis.call('HSET', KEYS[5], 'tick', now, 'sight', sight) end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', limit, 'LIMIT', 0, k)
if #due == 0 then return cmsgpack.pack({gap, {}, 0}) end
local R = load_records(KEYS[1], due)
local zadd, zrem, out = {}, {}, {}
for _, a in ipairs(due) do
  local r = R[a]
  local nxt = 0
  if r.seen > 0 and not has(r, F_RETIRED) and not has(r, F_EXITED) then
    local sd = math.max(r.seen, r.xu, sight) + r.sa
    local td = math.max(r.beat, r.start, r.xu, sight) + r.ta
    -- (silence per agent: off for an agent a schedule judges, detectors/schedule.py)
    local sil = sil_on and not has(r, F_NO_SILENCE)
    if sil and not has(r, F_SILENCE) and sd <= limit then
      open(a, r, F_SILENCE, 'silence', now, {seen = r.seen, allowance = r.sa, iv = r.iv,
        r0 = r.r0 * 1024, rl = r.rl * 1024, rpk = r.rpk * 1024, t0 = r.t0})
    else
      -- "Pulses keep coming": the newest must be fresh (2.5 pulse periods), or the process may
      -- just have died after its last beat; silence decides that, or the next pulse brings this
      -- agent back here (the batch update re-arms it).
      -- (A process that was frozen comes back with a pulse: the batch update restarted its
      -- stall clock then, in r.xu, so this pulse proves life from then on, not for before.)
      local alive = now - r.pulse <= live_for(r)
      -- Stuck, not dead: a pulse at or after the deadline proves the process lived through the
      -- whole allowance. A pulse from before it does not (a process killed just after a pulse
      -- looks alive until its next pulse is due): wait for the next one, checked every tick.
      if stall_on and not has(r, F_STALL) and r.pulse > r.beat and td <= limit and alive
          and r.pulse >= td then
        local stack = has(r, F_HAS_STACK) and redis.call('HGET', KEYS[3], a) or ''
        open(a, r, F_STALL, 'stall', now, {beat = r.beat, start = r.start, pulse = r.pulse,
          allowance = r.ta, iv = r.iv, stack = stack})
      end
      if sil and not has(r, F_SILENCE) then nxt = sd end
      if stall_on and not has(r, F_STALL) and r.pulse > r.beat and alive and (nxt == 0 or td < nxt) then
        nxt = td
      end
    end
  end
  if nxt > 0 then zadd[#zadd + 1] = nxt; zadd[#zadd + 1] = a else zrem[#zrem + 1] = a end
  r.armed = nxt
  if r.seen > 0 then out[#out + 1] = a; out[#out + 1] = rec_dump(r) end
end
if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
if #zrem > 0 then redis.call('ZREM', KEYS[2], unpack(zrem)) end
if #out > 0 then redis.call('HSET', KEYS[1], unpack(out)) end
local owned = flush_ops(KEYS[4], OWNER, LEASE)
return cmsgpack.pack({gap, owned, #due == k and 1 or 0})
"""

# Forget agents not seen since ARGV[3]: resolve what is open, delete every trace (the start
# facts too, agentwatch/facts.py: a forgotten agent is not listed by status or reports).
# KEYS: states, timers, agents, stacks, rss, intents, facts. ARGV: owner, lease, cutoff, k.
_FORGET: Final = """
local OWNER, LEASE = ARGV[1], tonumber(ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
if #old == 0 then return {} end
local R = load_records(KEYS[1], old)
local at = now_ms()
for _, a in ipairs(old) do
  local r = R[a]
  for det, f in pairs({silence = F_SILENCE, stall = F_STALL, exit = F_EXIT, tokens = F_TOKENS,
                       loop = F_LOOP, memory = F_MEMORY}) do
    close(a, r, f, det, at, {forgotten = 1, seen = r.seen})
  end
end
redis.call('HDEL', KEYS[1], unpack(old))
redis.call('ZREM', KEYS[2], unpack(old))
redis.call('ZREM', KEYS[3], unpack(old))
redis.call('HDEL', KEYS[4], unpack(old))
redis.call('HDEL', KEYS[5], unpack(old))
redis.call('HDEL', KEYS[7], unpack(old))
return flush_ops(KEYS[6], OWNER, LEASE)
"""


class Timers:
    """Runs the checks of one worker (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.keys = engine.keys
        client = engine.client
        self._check = register(client, lua_prelude(), _CHECK)
        self._forget = register(client, lua_prelude(), _FORGET)

    def _settings(self) -> tuple[bool, bool, int]:
        silence, stall = (self.engine.get(k) for k in ("Silence", "Stall"))
        return silence is not None, stall is not None, self.engine.sight_ms()

    def check(self, shard: int, now_ms: int, limit_ms: int) -> int:
        """Claim and decide every agent due by ``limit_ms``; the gap (ms) found, or 0."""
        silence, stall, blind = self._settings()
        keys = self.keys
        gap = 0
        for _ in range(_ROUNDS):  # bounded: a huge backlog of due agents continues next tick
            reply = self._check(
                keys=[keys.states(shard), keys.timers(shard), keys.stacks(shard), keys.intents(shard),
                      keys.clock(shard)],
                args=[self.engine.owner, self.engine.lease_ms, now_ms, limit_ms, CLAIM_BATCH, blind,
                      int(silence), int(stall)],
            )  # fmt: skip
            found, owned, more = msgpack.unpackb(reply, raw=False)
            gap = max(gap, int(found))
            if owned:
                self.engine.publisher.publish(shard, owned)
            if not more:
                break
        return gap

    def forget(self, now_ms: int) -> None:
        """Delete the state of agents silent for longer than ``[detectors.silence] forget``."""
        silence = self.engine.get("Silence")
        forget_s = silence.config.forget_s if silence is not None else 7 * 86400.0
        cutoff = now_ms - int(forget_s * 1000)
        keys = self.keys
        for shard in range(keys.shards):
            owned: Any = self._forget(
                keys=[keys.states(shard), keys.timers(shard), keys.agents(shard), keys.stacks(shard),
                      keys.rss(shard), keys.intents(shard), keys.facts(shard)],
                args=[self.engine.owner, self.engine.lease_ms, cutoff, 500],
            )  # fmt: skip
            if owned:
                self.engine.publisher.publish(shard, owned)
