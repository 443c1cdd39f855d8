"""What agents spend: every beat priced once, and exact per-window totals for budgets and views.

Two steps, both run by every detector worker on every batch (agentwatch/workers.py):

1. :func:`price_events` -- the one place a beat's cost is decided. A beat that carries no
   ``cost`` but tokens is priced with :class:`~agentwatch.prices.PriceBook` and its ``cost`` is
   filled in, in the event itself, before any detector sees it: the tokens detector, the
   detectors' running totals (status, report, dashboard, metrics) and the budgets all read the
   same number. A beat whose price is unknown keeps no ``cost`` (never ``0.0``) and is marked
   :data:`UNPRICED`, so it is counted as an *unpriced beat* instead.
2. :class:`Ledger` -- per agent, USD and unpriced beats per calendar window (hour, day, month in
   ``[report] timezone``), the windows the budgets need (detectors/budgets.py decides on them).

Exactly once. Delivery is at least once: a worker SIGKILLed mid-batch leaves its entries
pending and another worker applies them again later, possibly after newer ones. So every
agent's ledger keeps, per run (the 4 latest), the highest ``seq`` applied and the gaps below it
(seqs not applied yet because another worker had them, up to 32, the oldest dropped). One Lua
script per shard and batch checks each agent-run segment against those marks and adds its
spend in the same atomic step: a segment above the mark or inside a gap is applied (and the gap
shrinks), anything else was applied already and is skipped. A batch with no priced or unpriced
beat of an agent is not sent at all, so its seqs stay a gap that never fills: harmless, and the
reason old gaps are dropped.

Bad costs never get here: the codec dead-letters a negative, NaN, infinite or over-cap ``cost``
(counted in ``status``), and a computed price above the cap is unknown (prices.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgpack

from agentwatch.codec import Event, entry_ms
from agentwatch.keys import Keys, shard_of
from agentwatch.prices import TOKEN_KEYS, PriceBook
from agentwatch.redisconn import Client

UNPRICED: Final = "_unpriced"
"""Key :func:`price_events` sets on a beat whose cost is unknown (value: why, prices.Quote.source).
The underscore keeps it apart from protocol keys, which never start with one."""
PERS: Final = {"hour": "h", "day": "d", "month": "m"}
"""Budget ``per`` -> the letter its window ids start with."""
KEEP: Final = {"h": 3, "d": 40, "m": 3}
"""Windows kept per agent and kind: 40 days for reports, the current and last ones otherwise."""
GROUPS_FIELD: Final = "#g"
"""Ledger hash field of the shard's shares of ``scope = "together"`` budgets (``#`` is not a
character of agent names)."""


def price_events(messages: Sequence[tuple[bytes, Event]], book: PriceBook) -> int:
    """Fill in the ``cost`` of every beat that has tokens but no cost, priced at its entry's
    Redis time; mark the ones that cannot be priced :data:`UNPRICED`. Idempotent (a redelivered
    event is priced the same). Returns how many beats were unpriced."""
    unpriced = 0
    for entry_id, event in messages:
        if event.get("kind") != "beat" or event.get("cost") is not None or UNPRICED in event:
            continue
        if not any(event.get(key) for key in TOKEN_KEYS):
            continue  # a bare heartbeat(): it spent nothing, and says so by carrying no usage
        quote = book.quote(event, entry_ms(entry_id))
        if quote.cost is None:
            event[UNPRICED] = quote.source
            unpriced += 1
        else:
            event["cost"] = quote.cost
    return unpriced


@dataclass(frozen=True, slots=True)
class Window:
    """One calendar window: its id (``d20261207``, ``h2026120706``, ``m202612``) and bounds."""

    id: str
    start_ms: int
    end_ms: int

    def elapsed(self, now_ms: int) -> float:
        """Fraction of the window gone by at ``now_ms`` (0..1)."""
        return min(1.0, max(0.0, (now_ms - self.start_ms) / (self.end_ms - self.start_ms)))


def window_of(per: str, at_ms: int, zone: ZoneInfo) -> Window:
    """The calendar ``per`` window (hour, day, month, local time in ``zone``) holding ``at_ms``."""
    local = datetime.fromtimestamp(at_ms / 1000, tz=zone)
    if per == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        start_ms = round(start.timestamp() * 1000)
        # The hour a DST change repeats (fold 1) is another window: its own id, still sorting
        # after the first one (the ledger keeps the newest ids), so two hours never share a total.
        again = "b" if start.fold else ""
        return Window(f"h{start:%Y%m%d%H}{again}", start_ms, start_ms + 3_600_000)
    if per == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=zone)
        return Window(f"d{start:%Y%m%d}", round(start.timestamp() * 1000), round(nxt.timestamp() * 1000))
    if per == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        nxt = datetime(year, month, 1, tzinfo=zone)
        return Window(f"m{start:%Y%m}", round(start.timestamp() * 1000), round(nxt.timestamp() * 1000))
    raise ValueError(f"unknown window {per!r}: hour, day or month")


class WindowClock:
    """:func:`window_of` for many timestamps: the last window of each kind is reused while the
    timestamps stay inside it (a batch rarely crosses a boundary)."""

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self._last: dict[str, Window] = {}

    def __call__(self, per: str, at_ms: int) -> Window:
        last = self._last.get(per)
        if last is None or not last.start_ms <= at_ms < last.end_ms:
            last = self._last[per] = window_of(per, at_ms, self.zone)
        return last


@dataclass
class Spent:
    """USD spent in one window, with the beats priced and the beats whose price was unknown."""

    cost: float = 0.0
    unpriced: int = 0
    beats: int = 0

    @classmethod
    def of(cls, raw: Sequence[Any] | None) -> Spent:
        return cls() if not raw else cls(float(raw[0]), int(raw[1]), int(raw[2]))


@dataclass
class Applied:
    """What one batch changed: the new totals of every (agent, window) and (glob, window) it
    added to (a ``together`` budget's totals are this shard's share: see :meth:`Ledger.groups`)."""

    agents: dict[tuple[str, str], Spent] = field(default_factory=dict)
    groups: set[tuple[str, str]] = field(default_factory=set)


# KEYS[1]: the shard's ledger hash. ARGV[1]: msgpack list of segments
#   {agent, run, lo, hi, {wid, cost, unpriced, beats, ...}, {glob|wid, cost, unpriced, beats, ...}};
# ARGV[2]: Redis time (ms). Returns msgpack {{agent, wid, cost, unpriced, beats}..., {glob|wid}...}.
_APPLY: Final = """
local segs = cmsgpack.unpack(ARGV[1])
local now = tonumber(ARGV[2])
local MAX_RUNS, MAX_GAPS = 4, 32
local KEEP = {h = 3, d = 40, m = 3}
local ledgers, groups = {}, nil
local function ledger(a)
  local l = ledgers[a]
  if l == nil then
    local raw = redis.call('HGET', KEYS[1], a)
    l = raw and cmsgpack.unpack(raw) or {}
    l.r = l.r or {}; l.w = l.w or {}
    ledgers[a] = l
  end
  return l
end
local function mark(l, run, lo, hi)
  -- true when seqs lo..hi of run were never applied (see spend.py); records them as applied
  local m = l.r[run]
  if m == nil then
    local n, old, oldt = 0, nil, nil
    for k, v in pairs(l.r) do
      n = n + 1
      if oldt == nil or v[2] < oldt then old, oldt = k, v[2] end
    end
    if n >= MAX_RUNS then l.r[old] = nil end
    m = {-1, now}
    l.r[run] = m
  end
  m[2] = now
  if lo > m[1] then
    if lo > m[1] + 1 then
      m[#m + 1] = m[1] + 1; m[#m + 1] = lo
      if #m > 2 + 2 * MAX_GAPS then table.remove(m, 3); table.remove(m, 3) end
    end
    m[1] = hi
    return true
  end
  for i = 3, #m - 1, 2 do
    local a, b = m[i], m[i + 1]
    if lo >= a and hi < b then
      table.remove(m, i); table.remove(m, i)
      if b > hi + 1 then table.insert(m, i, b); table.insert(m, i, hi + 1) end
      if lo > a then table.insert(m, i, lo); table.insert(m, i, a) end
      return true
    end
  end
  return false
end
local function add(t, key, c, u, n)
  local v = t[key]
  if v == nil then v = {0, 0, 0}; t[key] = v end
  v[1] = v[1] + c; v[2] = v[2] + u; v[3] = v[3] + n
  return v
end
local function trim(t, class)
  local by = {}
  for k in pairs(t) do
    local c, kind = class(k)
    local list = by[c]
    if list == nil then list = {kind = kind}; by[c] = list end
    list[#list + 1] = k
  end
  for _, list in pairs(by) do
    local keep = KEEP[list.kind] or 3
    if #list > keep then
      table.sort(list)
      for i = 1, #list - keep do t[list[i]] = nil end
    end
  end
end
local out_w, out_g, touched = {}, {}, {}
for _, s in ipairs(segs) do
  local a = s[1]
  local l = ledger(a)
  if mark(l, s[2], s[3], s[4]) then
    touched[a] = true
    local w = s[5]
    for i = 1, #w, 4 do
      local v = add(l.w, w[i], w[i + 1], w[i + 2], w[i + 3])
      out_w[#out_w + 1] = {a, w[i], v[1], v[2], v[3]}
    end
    local g = s[6]
    if #g > 0 and groups == nil then
      local raw = redis.call('HGET', KEYS[1], '#g')
      groups = raw and cmsgpack.unpack(raw) or {}
    end
    for i = 1, #g, 4 do
      add(groups, g[i], g[i + 1], g[i + 2], g[i + 3])
      out_g[#out_g + 1] = g[i]
    end
  end
end
local day = function(k) return string.sub(k, 1, 1), string.sub(k, 1, 1) end
for a in pairs(touched) do
  local l = ledgers[a]
  trim(l.w, day)
  redis.call('HSET', KEYS[1], a, cmsgpack.pack(l))
end
if groups ~= nil then
  trim(groups, function(k)
    local bar = string.find(k, '|', 1, true) or 0
    local kind = string.sub(k, bar + 1, bar + 1)
    return string.sub(k, 1, bar) .. kind, kind
  end)
  redis.call('HSET', KEYS[1], '#g', cmsgpack.pack(groups))
end
return cmsgpack.pack({out_w, out_g})
"""


@dataclass
class _Segment:
    run: str
    lo: int
    hi: int
    windows: dict[str, list[float]] = field(default_factory=dict)
    groups: dict[str, list[float]] = field(default_factory=dict)
    usage: bool = False


class Ledger:
    """The spend ledger of one deployment (see the module docstring)."""

    def __init__(self, client: Client, keys: Keys, zone: ZoneInfo) -> None:
        self.client: Any = client
        self.keys = keys
        self.clock = WindowClock(zone)
        self._apply = self.client.register_script(_APPLY)

    def apply(
        self,
        messages: Sequence[tuple[bytes, Event]],
        pers: Iterable[str] = ("day",),
        groups_of: Any = None,
        now_ms: int = 0,
    ) -> Applied:
        """Add the batch's spend (after :func:`price_events`) to the windows ``pers`` (the day is
        always kept: status and report read it), and to the ``together`` groups
        ``groups_of(agent)`` returns as ``(glob, per)`` pairs."""
        kinds = sorted({"day", *pers})
        segments: dict[tuple[str, str], _Segment] = {}
        for entry_id, event in messages:
            agent, run, seq = event.get("agent"), event.get("run"), event.get("seq")
            if not isinstance(agent, str) or not isinstance(run, str) or not isinstance(seq, int):
                continue
            seg = segments.get((agent, run))
            if seg is None:
                seg = segments[(agent, run)] = _Segment(run, seq, seq)
            seg.lo, seg.hi = min(seg.lo, seq), max(seg.hi, seq)
            if event.get("kind") != "beat":
                continue
            cost, unpriced = event.get("cost"), UNPRICED in event
            if cost is None and not unpriced:
                continue
            seg.usage = True
            at = entry_ms(entry_id)
            add = (0.0, 1, 0) if unpriced else (float(cost), 0, 1)  # type: ignore[arg-type]
            for per in kinds:
                _add(seg.windows, self.clock(per, at).id, add)
            for glob, per in groups_of(agent) if groups_of is not None else ():
                _add(seg.groups, f"{glob}|{self.clock(per, at).id}", add)
        by_shard: dict[int, list[Any]] = {}
        for (agent, _), seg in segments.items():
            if seg.usage:
                by_shard.setdefault(shard_of(agent, self.keys.shards), []).append(
                    [agent, seg.run, seg.lo, seg.hi, _flat(seg.windows), _flat(seg.groups)]
                )
        applied = Applied()
        for shard, segs in by_shard.items():
            reply = self._apply(
                keys=[self.keys.spend(shard)], args=[msgpack.packb(segs, use_bin_type=False), now_ms]
            )
            windows, groups = msgpack.unpackb(reply, raw=False)
            for agent, wid, cost, unpriced, beats in windows:
                applied.agents[(agent, wid)] = Spent(float(cost), int(unpriced), int(beats))
            for key in groups:
                glob, _, wid = key.rpartition("|")
                applied.groups.add((glob, wid))
        return applied

    def read(self, agents: Sequence[str]) -> dict[str, dict[str, Spent]]:
        """Every window kept for each of ``agents`` (absent: nothing spent or priced yet)."""
        if not agents:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for agent in agents:
            pipe.hget(self.keys.spend(shard_of(agent, self.keys.shards)), agent)
        out: dict[str, dict[str, Spent]] = {}
        for agent, raw in zip(agents, pipe.execute(), strict=True):
            if raw:
                windows = _unpack(raw).get("w") or {}
                out[agent] = {str(wid): Spent.of(v) for wid, v in dict(windows).items()}
        return out

    def groups(self, wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Spent]:
        """Totals of ``together`` budgets, ``(glob, window id)`` -> spend summed over shards."""
        wanted = list(wanted)
        out = {key: Spent() for key in wanted}
        if not wanted:
            return out
        for shard in range(max(self.keys.shards, 1)):
            raw = self.client.hget(self.keys.spend(shard), GROUPS_FIELD)
            shares = dict(_unpack(raw)) if raw else {}
            for glob, wid in wanted:
                share = Spent.of(shares.get(f"{glob}|{wid}"))
                total = out[(glob, wid)]
                total.cost += share.cost
                total.unpriced += share.unpriced
                total.beats += share.beats
        return out


def _add(table: dict[str, list[float]], key: str, add: tuple[float, int, int]) -> None:
    current = table.setdefault(key, [0.0, 0, 0])
    current[0] += add[0]
    current[1] += add[1]
    current[2] += add[2]


def _flat(table: Mapping[str, list[float]]) -> list[Any]:
    return [part for key, (cost, unpriced, beats) in table.items()
            for part in (key, cost, int(unpriced), int(beats))]  # fmt: skip


def _unpack(raw: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData):
        return {}  # damaged: read as nothing spent
    return value if isinstance(value, dict) else {}
