"""Per-agent state of the built-in detectors: one atomic, idempotent update per batch and shard.

A batch of events becomes *segments* (segments.py: the events of one agent and one run, folded
in Python). One Lua script per shard then applies every segment to its agent's record
(record.py) and decides every transition, atomically (segments for which it would decide
nothing take the fast path instead: fastpath.py and fastplan.py mirror ``apply()`` below, so
keep them in step with it):

* **Idempotent under redelivery.** Each record keeps the current run's highest applied ``seq``
  and up to two gaps below it. A segment above the mark is new; one inside a gap is a late
  batch (a reclaimed one) and is applied then; anything else was applied already and is skipped.
  Each agent's update is atomic: this script per shard, or for the common "nothing happens"
  segment the fast path's watched transaction (fastpath.py), which writes exactly what this
  script would. A batch interrupted between the two is redelivered and the marks skip what
  already landed.
* **Order between runs by Redis time.** A ``start`` whose entry is newer than the current run's
  start begins a new run (resetting the per-run marks; resolving exit, stall, memory, loop).
  A ``start`` that declares a ``parent`` (a forked child of the agent) does not take over: it
  opens a *child run* of the current run (the ``children`` hash), whose beats count for the
  agent's tokens, cost and token/loop detection (idempotent by the child's own seq mark), and
  whose silence detectors/children.py watches. Events of other runs count as signs of life only.
* **Timers are lower bounds.** An agent's place in the timers set is only moved *earlier* here;
  the timer check re-arms an agent it finds not due (detectors/timers.py). That saves a write
  per event for the common case of an agent beating well within its allowance.

Detector-specific parts of the script live with their detectors (silence.py, stall.py, exit.py,
tokens.py, memory.py)
as Lua functions this module's script calls; their parameters arrive per *profile* (the
detector settings that apply to an agent after per-agent overrides).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from agentwatch.keys import Keys, shard_of
from detectors import record

PROFILE: Final = (
    "sil_on", "sil_after", "sil_recover", "stall_on", "stall_after", "stall_recover",
    "exit_on", "exit_clean", "tok_on", "factor", "min_tokens", "min_cost", "warmup", "alpha", "fire_after",
    "recover_after", "recover_factor", "window", "loop_on", "repeat", "loop_recover",
    "mem_on", "bucket", "points",
)  # fmt: skip
"""Per-agent parameters the update script needs, in this order (durations in ms)."""


def profile_lua() -> str:
    return "\n".join(f"local P_{name.upper()} = {i + 1}" for i, name in enumerate(PROFILE))


def flags_lua() -> str:
    names = [
        "RETIRED",
        "EXITED",
        "SILENCE",
        "STALL",
        "EXIT",
        "TOKENS",
        "LOOP",
        "MEMORY",
        "HAS_STACK",
        "HAS_RSS",
        "TOKENS_COST",
        "NO_SILENCE",
    ]
    return "\n".join(f"local F_{name} = {getattr(record, name)}" for name in names)


# Helpers every deciding script shares (after record.lua() and intents.LUA_EMIT).
LUA_COMMON: Final = """
local band = bit.band
local function has(r, f) return band(r.flags, f) ~= 0 end
local function set(r, f) r.flags = bit.bor(r.flags, f) end
local function clear(r, f) r.flags = bit.band(r.flags, bit.bnot(f)) end
local function open(a, r, f, det, at, facts)
  if has(r, f) then return false end
  set(r, f); emit(a, det, 'f', at, facts); return true
end
local function close(a, r, f, det, at, facts)
  if not has(r, f) then return false end
  clear(r, f); emit(a, det, 'r', at, facts); return true
end
local function chunked(cmd, key, list, prefix_args)
  -- unpack() is limited to a few thousand values: issue big commands in slices
  for i = 1, #list, 4000 do
    local slice = {}
    for j = i, math.min(i + 3999, #list) do slice[#slice + 1] = list[j] end
    if prefix_args then redis.call(cmd, key, prefix_args, unpack(slice))
    else redis.call(cmd, key, unpack(slice)) end
  end
end
local function load_records(key, names)
  local R = {}
  for i = 1, #names, 4000 do
    local slice = {}
    for j = i, math.min(i + 3999, #names) do slice[#slice + 1] = names[j] end
    local raws = redis.call('HMGET', key, unpack(slice))
    for j, name in ipairs(slice) do R[name] = rec_load(raws[j]) end
  end
  return R
end
local function live_for(r)
  -- How long a process may send nothing at all and still count as alive: 2.5 pulse periods
  -- (the time between its last two pulses), or half the silence allowance without pulses.
  -- Past that, nothing proved it alive: it may be dead, frozen (SIGSTOP, a suspended VM) or
  -- cut off, and only silence may judge it.
  return r.pg > 0 and 2.5 * r.pg or r.sa / 2
end
local function dead_after(r)
  -- A gap of the agent's events longer than this proved nothing about it (live_from): live_for,
  -- or half the stall allowance when longer, so that pulses a little late (or sparse, as an OTel
  -- agent's metrics exports every 60 s against 180 s) never restart the stall clock, while any
  -- freeze long enough to pass for a stall does (beats come at least three times per allowance,
  -- so such a freeze lasts over two thirds of it).
  return math.max(live_for(r), r.ta / 2)
end
local function live_from(seen, s, w, from, till)
  -- Stall means "alive and not working" for the whole allowance, so its clock over [from, till]
  -- restarts after a gap of the agent's events longer than ``w`` (dead_after): before this
  -- segment (since ``seen``, the agent's last event before it), or inside it (GA..GB, its
  -- longest). A process frozen for longer than the stall allowance comes back with a pulse
  -- before its next beat: it was not stuck, it was not running at all.
  if seen > 0 and s[S_FIRST] - seen > w and s[S_FIRST] <= till then
    from = math.max(from, s[S_FIRST])
  end
  if s[S_GB] - s[S_GA] > w and s[S_GA] >= from and s[S_GB] <= till then from = math.max(from, s[S_GB]) end
  return from
end
local function next_due(r, p)
  -- The earliest time a timer check has something to decide for this agent (0: nothing).
  if has(r, F_RETIRED) or has(r, F_EXITED) then return 0 end
  local due = 0
  if p[P_SIL_ON] == 1 and not has(r, F_SILENCE) then due = math.max(r.seen, r.xu) + r.sa end
  if p[P_STALL_ON] == 1 and not has(r, F_STALL) and r.pulse > r.beat then
    local td = math.max(r.beat, r.start, r.xu) + r.ta
    if due == 0 or td < due then due = td end
  end
  return due
end
"""

# The batch update. KEYS: states, timers, agents, stacks, rss, intents, clock, children.
# ARGV: owner, lease ms, profiles (msgpack), segments (msgpack), blind_after ms.
# Returns msgpack [owned intents keys, memory windows to evaluate].
LUA_MAIN: Final = """
local OWNER, LEASE = ARGV[1], tonumber(ARGV[2])
local P = cmsgpack.unpack(ARGV[3])
local S = {}
do  -- segments: numbers from the packed string, the other fields from the list (state.pack)
  local packed = cmsgpack.unpack(ARGV[4])
  local numbers, others = packed[1], packed[2]
  for i = 1, #numbers / SEG_SIZE do
    local s = {struct.unpack(SEG_FORMAT, numbers, (i - 1) * SEG_SIZE + 1)}
    local o = (i - 1) * SEG_OTHERS
    for k = 1, SEG_OTHERS do s[SEG_NUMBERS + k] = others[o + k] end
    S[i] = s
  end
end
local CUR, NEW, PREV, FOREIGN, CHILD = 1, 2, 3, 4, 5
local ADOPT = F_RETIRED + F_EXITED + F_SILENCE
local DUPS = 0  -- events whose seq was applied already: redelivered, or a producer repeating seq
-- The shard's watch clock (timers.py): while nobody checks (STALE), or for time before the
-- last gap ended (SIGHT), a gap in an agent's events proves nothing.
local CLOCK = redis.call('HMGET', KEYS[7], 'tick', 'sight')
local SIGHT = tonumber(CLOCK[2]) or 0
local STALE = not CLOCK[1] or now_ms() - tonumber(CLOCK[1]) > tonumber(ARGV[5])

local names, known = {}, {}
for i = 1, #S do
  local a = S[i][S_AGENT]
  if not known[a] then known[a] = true; names[#names + 1] = a end
end
local R = load_records(KEYS[1], names)
local STACK_SET, STACK_DEL, RSS_DEL = {}, {}, {}
local MEM = {}  -- agent -> closed buckets, for memory_flush

local function add_gap(r, lo, hi_excl)
  r.g2a, r.g2b = r.g1a, r.g1b
  r.g1a, r.g1b = lo, hi_excl
end
local function take_gap(r, lo, hi)
  -- seqs lo..hi inside a gap [a, b): a late batch. Shrink or split the gap; keep at most two.
  for g = 1, 2 do
    local a, b
    if g == 1 then a, b = r.g1a, r.g1b else a, b = r.g2a, r.g2b end
    if b > a and lo >= a and hi < b then
      local la, lb, ra, rb = a, lo, hi + 1, b
      local parts = {}
      if lb > la then parts[#parts + 1] = {la, lb} end
      if rb > ra then parts[#parts + 1] = {ra, rb} end
      local other = (g == 1) and {r.g2a, r.g2b} or {r.g1a, r.g1b}
      if #parts == 2 then r.g1a, r.g1b, r.g2a, r.g2b = parts[2][1], parts[2][2], parts[1][1], parts[1][2]
      elseif #parts == 1 then r.g1a, r.g1b, r.g2a, r.g2b = parts[1][1], parts[1][2], other[1], other[2]
      else r.g1a, r.g1b, r.g2a, r.g2b = other[1], other[2], 0, 0 end
      return true
    end
  end
  return false
end

local function new_run(a, r, s)
  local at = s[S_START] > 0 and s[S_START] or s[S_FIRST]
  local facts = {at = at, restarted = 1}
  if r.run ~= 0 then r.prun = r.run end
  r.run = s[S_RUN]; r.hw = -1; r.g1a, r.g1b, r.g2a, r.g2b = 0, 0, 0, 0
  r.start = at; r.beat = 0; r.pulse = 0; r.xu = 0
  if s[S_IV] >= 0 then r.iv = s[S_IV] elseif s[S_START] > 0 then r.iv = 0 end
  close(a, r, F_EXIT, 'exit', at, facts)
  if close(a, r, F_STALL, 'stall', at, facts) then r.kr, r.kw = 0, 0 end
  close(a, r, F_MEMORY, 'memory', at, {at = at, restarted = 1, rl = r.rl * 1024, r0 = r.r0 * 1024})
  close(a, r, F_LOOP, 'loop', at, facts)
  clear(r, F_RETIRED + F_EXITED)
  r.r0, r.t0, r.rl, r.rpk, r.bk, r.bm, r.mh, r.mc = 0, 0, 0, 0, 0, 0, 0, 0
  r.fp, r.fc, r.lf, r.lq = 0, 0, 0, 0
  if has(r, F_HAS_RSS) then RSS_DEL[a] = true; clear(r, F_HAS_RSS) end
  if has(r, F_HAS_STACK) then STACK_DEL[a] = true; STACK_SET[a] = nil; clear(r, F_HAS_STACK) end
end

local function retire(a, r, at)
  local facts = {at = at, shutdown = 1}
  set(r, F_RETIRED)
  close(a, r, F_SILENCE, 'silence', at, facts)
  close(a, r, F_STALL, 'stall', at, facts)
  r.sr, r.sw, r.kr, r.kw = 0, 0, 0, 0
  if close(a, r, F_TOKENS, 'tokens', at, facts) then r.tx = at end
  close(a, r, F_LOOP, 'loop', at, facts)
  close(a, r, F_MEMORY, 'memory', at, facts)
end

local ZADD, ZREM, ZIDX = {}, {}, {}
local CH, CH_DIRTY = {}, {}

local function child_of(a, r, s)
  -- The child run of segment s (a worker process of the agent), or false. A child's start names
  -- its parent (S_CHILD: the parent run's hash); its later events are known by the children hash.
  local k = a .. '|' .. string.format('%.0f', s[S_RUN])
  local c = CH[k]
  if c == nil then
    local raw = redis.call('HGET', KEYS[8], k)
    c = raw and cjson.decode(raw) or false
    CH[k] = c
  end
  if not c and s[S_START] > 0 and s[S_CHILD] ~= 0 then
    c = {p = string.format('%.0f', s[S_CHILD]), hw = -1, last = 0, iv = 0, ex = 0, at = s[S_START]}
    CH[k] = c
  end
  return c, k
end

local function retro(a, det, fire_at, back, facts)
  -- A gap longer than the allowance, found in the events themselves (a batch processed late:
  -- a worker died, or the checks waited for the horizon). One worker watching in real time
  -- would have fired and resolved: so do exactly that, with those times.
  emit(a, det, 'f', fire_at, facts)
  emit(a, det, 'r', back, {back = back, since = facts.since, late = 1})
end

local function retro_gaps(a, r, p, s, cls)
  if STALE or has(r, F_RETIRED + F_EXITED) or r.seen == 0 then return end
  if p[P_SIL_ON] == 1 and not has(r, F_SILENCE) then
    local from, till = math.max(r.seen, r.xu, SIGHT), s[S_FIRST]
    if s[S_GB] - math.max(s[S_GA], SIGHT) > till - from then
      from, till = math.max(s[S_GA], SIGHT), s[S_GB]
    end
    if till - from > r.sa then
      retro(a, 'silence', from + r.sa, till, {seen = from, since = from, allowance = r.sa, iv = r.iv,
        r0 = r.r0 * 1024, rl = r.rl * 1024, rpk = r.rpk * 1024, t0 = r.t0})
    end
  end
  if cls == CUR and p[P_STALL_ON] == 1 and not has(r, F_STALL) and s[S_FBEAT] > 0 then
    local w = dead_after(r)
    local from, till = live_from(r.seen, s, w, math.max(r.beat, r.start, r.xu, SIGHT), s[S_FBEAT]), s[S_FBEAT]
    local alive = r.pulse > r.beat or s[S_PBF] == 1
    local from2 = live_from(r.seen, s, w, math.max(s[S_BA], SIGHT), s[S_BB])
    if s[S_BB] - from2 > till - from then
      from, till, alive = from2, s[S_BB], true
    end
    if alive and till - from > r.ta then
      local stack = has(r, F_HAS_STACK) and redis.call('HGET', KEYS[4], a) or ''
      retro(a, 'stall', from + r.ta, till, {beat = from, start = r.start, since = from, allowance = r.ta,
        iv = r.iv, stack = stack})
    end
  end
end

local function apply(s)
  local a = s[S_AGENT]
  local r = R[a]
  local p = P[s[S_PROFILE]]
  local seen0, beat0 = r.seen, r.beat
  local cls, child, ckey
  if r.run ~= 0 and s[S_RUN] == r.run then cls = CUR
  elseif s[S_START] > 0 and s[S_CHILD] == 0 and s[S_START] >= r.start then cls = NEW  -- (CHILD: parent hash)
  else
    -- (also before the parent's own start arrived: a worker may flush first)
    if r.run ~= 0 or (s[S_START] > 0 and s[S_CHILD] ~= 0) then child, ckey = child_of(a, r, s) end
    if child then cls = CHILD
    elseif r.run == 0 or (has(r, ADOPT) and s[S_FIRST] > r.seen and s[S_RUN] ~= r.prun) then cls = NEW
    elseif r.prun ~= 0 and s[S_RUN] == r.prun then cls = PREV
    else cls = FOREIGN end
  end

  local late = false
  if (cls == CUR and s[S_LO] > r.hw) or cls == NEW then retro_gaps(a, r, p, s, cls) end
  if cls == NEW then new_run(a, r, s) end
  if cls == CUR or cls == NEW then
    if s[S_LO] > r.hw then
      -- (a run adopted without its first events, as when another worker has them: they may
      -- still come, so they are a gap too)
      if (r.hw >= 0 or cls == NEW) and s[S_LO] > r.hw + 1 then add_gap(r, r.hw + 1, s[S_LO]) end
      r.hw = s[S_HI]
    elseif take_gap(r, s[S_LO], s[S_HI]) then
      late = true
    else
      DUPS = DUPS + s[S_NEV]
      return  -- applied before: a redelivered batch (counted: `status --json` duplicates_dropped)
    end
    if cls == CUR and s[S_START] > 0 then  -- this run's own start, arriving late
      if r.start == 0 or s[S_START] < r.start then r.start = s[S_START] end
    end
    -- The declared interval: from the start, and repeated by every pulse, so a record that was
    -- lost (Redis restarted without persistence, a layout change) relearns it at the next pulse.
    if cls == CUR and s[S_IV] >= 0 and (not late or s[S_START] > 0) then r.iv = s[S_IV] end
  end

  -- Signs of life: order-independent maxima, so any class may apply them.
  -- Back after a gap in which nothing proved it alive (live_from): the stall clock starts here.
  local dead0 = dead_after(r)
  local back = cls == CUR and live_from(seen0, s, dead0, 0, s[S_LAST]) or 0
  local fresh = s[S_LAST] > seen0
  if fresh then r.seen = s[S_LAST] end
  if cls ~= PREV then
    if s[S_BEAT] > r.beat then r.beat = s[S_BEAT] end
    if s[S_PULSE] > r.pulse then
      -- (the pulse period is not learnt from a gap that proved nothing: it is not one)
      local pgap = s[S_PGAP] > 0 and s[S_PGAP] or (r.pulse > 0 and s[S_PULSE] - r.pulse or 0)
      if pgap > 0 and (back == 0 or pgap <= dead0) then r.pg = pgap end
      r.pulse = s[S_PULSE]
    end
    if s[S_XBEAT] == 1 then
      if s[S_BEAT] >= beat0 then r.xu = s[S_XU] end
    elseif s[S_XU] > r.xu then r.xu = s[S_XU] end
  end
  if back > r.xu then r.xu = back end
  r.sa = math.max(p[P_SIL_AFTER], 3000 * r.iv)
  -- (for the timer checks, which know no profiles: a scheduled agent is never silent)
  if p[P_SIL_ON] == 1 then clear(r, F_NO_SILENCE) else set(r, F_NO_SILENCE) end
  r.ta = math.max(p[P_STALL_AFTER], 3000 * r.iv)
  -- (flags tested first: this runs for every segment, closing almost never)
  if fresh and has(r, F_SILENCE) then silence_back(a, r, p, s, seen0) end
  if cls == CUR and s[S_BEAT] > beat0 and has(r, F_STALL) then stall_back(a, r, p, s, beat0) end

  local ex = s[S_EXIT]
  if cls == CUR or cls == NEW then
    if ex then
      if ex[2] == 'shutdown' then retire(a, r, ex[1]) else exit_fire(a, r, p, ex, false) end
    end
    r.bt = r.bt + s[S_NBEAT]
    memory_track(a, r, p, s, late)
    tokens_apply(a, r, p, s, late)
    if s[S_STACK] and s[S_STACKMS] > r.beat then
      STACK_SET[a] = s[S_STACK]; STACK_DEL[a] = nil; set(r, F_HAS_STACK)
    elseif s[S_BEAT] > beat0 and has(r, F_HAS_STACK) then
      STACK_DEL[a] = true; STACK_SET[a] = nil; clear(r, F_HAS_STACK)
    end
  elseif cls == CHILD then
    -- A worker process of the agent: its usage is the agent's (once per event: its own mark).
    if s[S_LO] > child.hw then
      child.hw = s[S_HI]
      if s[S_LAST] > child.last then child.last = s[S_LAST] end
      if s[S_IV] >= 0 then child.iv = s[S_IV] end
      if ex then child.ex = 1 end
      CH_DIRTY[ckey] = child
      r.bt = r.bt + s[S_NBEAT]
      tokens_apply(a, r, p, s, false)
    end
  elseif cls == PREV and ex and ex[2] ~= 'shutdown' then
    exit_fire(a, r, p, ex, true)  -- the previous run's crash, processed after the restart
    r.prun = 0  -- once only, even if this batch is delivered again
  end

  local due = next_due(r, p)
  if due == 0 then
    if r.armed > 0 then ZREM[#ZREM + 1] = a; r.armed = 0 end
  elseif r.armed == 0 or due < r.armed then
    ZADD[#ZADD + 1] = due; ZADD[#ZADD + 1] = a; r.armed = due
  end
  if r.seen - r.idx >= 1000 then ZIDX[#ZIDX + 1] = r.seen; ZIDX[#ZIDX + 1] = a; r.idx = r.seen end
end

for i = 1, #S do apply(S[i]) end

-- Every write happens here, after all decisions: a script that failed above wrote nothing.
for a in pairs(RSS_DEL) do redis.call('HDEL', KEYS[5], a) end
local windows = memory_flush(KEYS[5], R)  -- before the records: it sets F_HAS_RSS
local out = {}
for _, a in ipairs(names) do out[#out + 1] = a; out[#out + 1] = rec_dump(R[a]) end
chunked('HSET', KEYS[1], out)
if #ZADD > 0 then chunked('ZADD', KEYS[2], ZADD) end
if #ZREM > 0 then chunked('ZREM', KEYS[2], ZREM) end
if #ZIDX > 0 then chunked('ZADD', KEYS[3], ZIDX, 'GT') end
for k, c in pairs(CH_DIRTY) do redis.call('HSET', KEYS[8], k, cjson.encode(c)) end
for a, text in pairs(STACK_SET) do redis.call('HSET', KEYS[4], a, text) end
for a in pairs(STACK_DEL) do redis.call('HDEL', KEYS[4], a) end
if DUPS > 0 then redis.call('HINCRBY', KEYS[7], 'duplicates', DUPS) end
local owned = flush_ops(KEYS[6], OWNER, LEASE)
return cmsgpack.pack({owned, windows})
"""


def read_agents(client: Any, keys: Keys, agents: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Decoded records (record.FIELDS, plus ``open``: the incidents the detectors hold open) of
    ``agents``, or of every agent when None. For ``agentwatch status`` and tests."""
    out: dict[str, dict[str, Any]] = {}
    for shard in range(max(keys.shards, 1)):
        if agents is None:
            pairs = client.hscan_iter(keys.states(shard), count=1000)
        else:
            names = [a for a in agents if shard_of(a, keys.shards) == shard]
            pairs = zip(names, client.hmget(keys.states(shard), names) if names else [], strict=True)
        for name, raw in pairs:
            fields = record.decode(raw)
            if fields is None:
                continue
            fields["open"] = [kind for kind, bit in record.OPEN_BITS.items() if fields["flags"] & bit]
            fields["retired"] = bool(fields["flags"] & record.RETIRED)
            fields["scheduled"] = bool(fields["flags"] & record.NO_SILENCE)
            out[name.decode() if isinstance(name, bytes) else name] = fields
    return out
